"""What a paid answer buys: the session it opens or renews, saved before the payment's row is final.

Called by the purchase flow (proxy/purchase/flow.py) between the verdict and the final ledger write,
so a crash in between leaves the session and an in-doubt row, never a settled payment without its
session (a retry would pay again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from proxy.faults import checkpoint
from proxy.payments.wallet import Wallet
from proxy.sessions.credentials import SIWX_EXTENSION, capture_credentials, merge_credentials, siwx_offer
from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session, SessionCredentials
from proxy.sessions.scope import NormalizedURL, Scope
from proxy.sessions.settings import SessionSettings
from proxy.store.base import AsyncLedgerStore, PaymentRecord
from proxy.tokens import SessionClaim, make_session_token

log = logging.getLogger("x402_proxy.sessions")


class SessionKeeper:
    def __init__(
        self,
        manager: SessionManager,
        settings: SessionSettings,
        wallet: Wallet | None,
        ledger: AsyncLedgerStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self._settings = settings
        self._kinds = set(settings.credential_kinds)
        self._wallet = wallet
        self._ledger = ledger
        self._clock = clock

    def apply_settings(self, settings: SessionSettings) -> None:
        self._settings = settings
        self._kinds = set(settings.credential_kinds)

    async def bought_meanwhile(
        self, url: NormalizedURL, renewing: Session | None, payments_seen: int
    ) -> Session | None:
        """A session another request opened or renewed for this URL while this one waited its turn."""
        manager = self.manager
        if manager.shared:
            # Another replica may have bought it while this one waited for the need's lock: on the paid
            # path the database is the truth (its announcement may not have reached us yet).
            for stored in await manager.list_stored(state="active", origin=url.origin_str, limit=100):
                await manager.apply_remote(stored.id)
        fresh = manager.match(url, self._clock())
        if fresh is None:
            return None
        if renewing is None or fresh.id != renewing.id or len(fresh.payment_ids) > payments_seen:
            return fresh
        return None

    async def open(
        self,
        scope: Scope,
        url: NormalizedURL,
        record: PaymentRecord,
        answer_headers: Iterable[tuple[str, str]],
        extensions: Mapping[str, object],
        *,
        ttl_seconds: int | None = None,
        label: str | None = None,
        max_session_payment: int | None = None,
    ) -> Session:
        now = self._clock()
        session = Session.create(
            scope,
            now=now,
            ttl_seconds=ttl_seconds or self._settings.default_ttl,
            label=label,
            asset=record.asset,
            network=record.network,
            decimals=record.decimals,
            pay_to=record.pay_to,
            payer=self._wallet.address if self._wallet else None,
            max_session_payment=max_session_payment,
        )
        session.record_payment(record.id, record.amount)
        session.credentials = self._capture(url, answer_headers, extensions, record.network, now)
        self._sign_token(session, record.tx_hash)
        checkpoint("session.before_save")
        self.manager.add(session)
        await self.manager.written()  # durable (and announced to other replicas) before the row is final
        checkpoint("session.saved")
        await self._ledger.attach_session(record.id, session.id)
        log.info(
            "session %s opened for %s %s (payment #%s)", session.id, scope.kind, scope.to_url(), record.id
        )
        return session

    async def renew(
        self,
        session: Session,
        url: NormalizedURL,
        record: PaymentRecord,
        answer_headers: Iterable[tuple[str, str]],
        extensions: Mapping[str, object],
    ) -> Session:
        now = self._clock()
        session.record_payment(record.id, record.amount)
        session.renewals += 1
        session.expires_at = now + session.ttl_seconds
        captured = self._capture(url, answer_headers, extensions, record.network, now)
        if captured.siwx is None and session.credentials.siwx is not None:
            # merge_credentials keeps the stored parameters: an offer we cannot use never replaces them
            # (a hostile one would otherwise switch proactive SIWX off for the rest of the session).
            problem = self._siwx_offer_problem(url, extensions, record.network)
            if problem is not None:
                log.warning(
                    "session %s keeps its Sign-In-With-X parameters: the renewal's offer is unusable (%s)",
                    session.id,
                    problem,
                )
        session.credentials = merge_credentials(session.credentials, captured, now)
        self._sign_token(session, record.tx_hash)
        self.manager.renewed(session)
        await self.manager.written()
        await self._ledger.attach_session(record.id, session.id)
        log.info("session %s renewed (payment #%s)", session.id, record.id)
        return session

    def _siwx_offer_problem(
        self, url: NormalizedURL, extensions: Mapping[str, object], network: str
    ) -> str | None:
        """Why the SIWX offer of a paid 402 was not taken (None: there was none, or it was taken)."""
        offer = extensions.get(SIWX_EXTENSION) if "siwx" in self._kinds else None
        if not isinstance(offer, dict):
            return None
        verdict = siwx_offer(offer, url, network)
        return verdict if isinstance(verdict, str) else None

    def _capture(
        self,
        url: NormalizedURL,
        answer_headers: Iterable[tuple[str, str]],
        extensions: Mapping[str, object],
        network: str,
        now: float,
    ) -> SessionCredentials:
        siwx = extensions.get(SIWX_EXTENSION) if "siwx" in self._kinds else None
        return capture_credentials(
            answer_headers,
            self._settings.token_headers,
            url,
            now=now,
            siwx_extension=siwx if isinstance(siwx, dict) else None,
            network=network,
        )

    def _sign_token(self, session: Session, tx_hash: str | None) -> None:
        if "session_token" not in self._kinds or self._wallet is None:
            return
        claim = SessionClaim.for_session(session, address=self._wallet.address, tx_hash=tx_hash)
        session.credentials.session_token = make_session_token(claim, self._wallet)
