"""The purchase flow: one order, one readable path, whatever carried the challenge.

    credential for the scope         (the session stage, before anything is sent: a hit never gets here)
    -> challenge                      carrier.challenge(): read, bounded, parsed
    -> single flight per need         one purchase per need at a time (per process; a fleet store adds
                                      its own lock across replicas)
    -> re-check                       a session bought meanwhile by another request is used instead
    -> policy, ledger row, sign       Payer.decide: doubt, budgets, approval, pending row, signature
    -> present                        carrier.present(plan): the same request again, with the payment
    -> verdict                        read by the carrier from the answer (receipt, status)
    -> session saved                  SessionKeeper.open/renew, before the row is final
    -> row final                      Payer.record_verdict

Nothing is called back up the stack: the result (`Purchase`) says what happened, and the carrier's
owner renders it (HTTP headers, an MCP `_meta`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Protocol

from proxy.faults import checkpoint
from proxy.payments.challenge import Challenge, Requirement
from proxy.payments.payer import PassThrough, Payer, PaymentPlan, Refused, Verdict
from proxy.payments.refusals import RefusalRecorder
from proxy.purchase.order import Answer, Carrier, Order, Presented, Purchase
from proxy.sessions.credentials import SIWX_EXTENSION
from proxy.sessions.keeper import SessionKeeper
from proxy.sessions.model import Session
from proxy.store.base import NEED_LOCK_TIMEOUT, PaymentRecord, StoreError
from proxy.store.locks import KeyedLocks
from proxy.warmup import SIWX_PATH, load_off_loop


class ChannelOpener(Protocol):
    """A payment kind that holds state across requests (proxy/channels/holder.py: batch-settlement):
    it takes over the order at the challenge step when it wants the challenge."""

    def wants(self, challenge: Challenge) -> Requirement | None: ...

    async def open(
        self,
        flow: PurchaseFlow,
        order: Order,
        challenge: Challenge,
        req: Requirement,
        carrier: Carrier[Answer],
    ) -> Purchase[Answer]: ...


log = logging.getLogger("x402_proxy.payments")


class PurchaseFlow:
    def __init__(self, payer: Payer, refusals: RefusalRecorder, keeper: SessionKeeper | None = None) -> None:
        self.payer = payer
        self.refusals = refusals
        self.keeper = keeper
        self.flights = KeyedLocks()
        # batch-settlement channels (proxy/channels/holder.py), set by the wiring when [channels] enabled.
        self.channels: ChannelOpener | None = None

    async def buy(self, order: Order, carrier: Carrier[Answer]) -> Purchase[Answer]:
        """Pay at most once for `order`; never raises for a refusal.

        Raises `StoreError` when the pending row cannot be written (nothing was signed) and whatever
        the carrier raises when presenting fails (the payment is then recorded in doubt first).
        """
        # Per process first (no database round trip for a waiter here), then across the fleet (the
        # store's lock: PostgreSQL advisory lock; SQLite: this process only). A payment may wait for a
        # person's approval while it holds the need, so the fleet wait allows for that.
        wait = max(NEED_LOCK_TIMEOUT, self.payer.policy.ask_timeout + NEED_LOCK_TIMEOUT)
        async with self.flights.hold(order.need), self.payer.store.need_lock(order.need, timeout=wait):
            keeper = self.keeper
            if keeper is not None and order.url is not None and order.reuse_sessions:
                fresh = await keeper.bought_meanwhile(order.url, order.renewing, order.payments_seen)
                if fresh is not None:
                    if await carrier.with_session(fresh):
                        return Purchase(session=fresh, reused=True)
                    order = order.renewing_session(fresh)  # its credentials were refused: renew it
            challenge = await carrier.challenge()
            if isinstance(challenge, Refused):
                self._refused(order, challenge, carrier)
                return Purchase(refusal=challenge)
            if isinstance(challenge, PassThrough):
                return Purchase()
            channel = self.channels.wants(challenge) if self.channels is not None else None
            if channel is not None and self.channels is not None:  # a deposit, then vouchers
                return await self.channels.open(self, order, challenge, channel, carrier)
            decision = await self.payer.decide(order.info, challenge)
            if isinstance(decision, Refused):
                self._refused(order, decision, carrier)
                return Purchase(refusal=decision, challenge=challenge)
            if isinstance(decision, PassThrough):
                return Purchase(challenge=challenge)
            return await self._pay(order, challenge, decision, carrier)

    async def _pay(
        self, order: Order, challenge: Challenge, plan: PaymentPlan, carrier: Carrier[Answer]
    ) -> Purchase[Answer]:
        # A server offering Sign-In-With-X: the session saved below reads the offer with the SDK's SIWX
        # module, loaded off the loop meanwhile if this is the first such offer (proxy/warmup.py).
        siwx = (
            asyncio.ensure_future(load_off_loop(SIWX_PATH))
            if self.keeper is not None and SIWX_EXTENSION in challenge.extensions
            else None
        )
        try:
            presented = await carrier.present(plan)
        except asyncio.CancelledError:
            # The drain deadline passed (or the client left) while the paid request was out: it may
            # still settle, so the row says in doubt now rather than waiting for the next start.
            await self._record_failure(plan, "cancelled while the paid request was in flight")
            raise
        except Exception as exc:
            await self._record_failure(plan, _failure_text(exc))
            raise
        checkpoint("payment.answered")
        if siwx is not None:
            await siwx
        session = await self._save_session(order, challenge, plan, presented)
        try:
            record = await self.payer.record_verdict(plan, presented.verdict)
        except StoreError as exc:
            # The money has moved and the answer is here: hand it over rather than lose what was paid
            # for. The payer keeps the payment in doubt, so this need is not paid for again.
            log.error("payment #%s: outcome not recorded: %s", plan.ledger_id, exc)
            return Purchase(
                presented.answer, None, plan, session=session, unrecorded=True, challenge=challenge
            )
        checkpoint("payment.recorded")
        return Purchase(presented.answer, record, plan, session=session, challenge=challenge)

    async def _save_session(
        self, order: Order, challenge: Challenge, plan: PaymentPlan, presented: Presented[Answer]
    ) -> Session | None:
        """What was paid for (a session) is saved before the row says `settled`: killed in between, the
        row is in doubt at restart (a retry is refused) and the session is back."""
        keeper, verdict = self.keeper, presented.verdict
        if keeper is None or order.scope is None or order.url is None:
            return None
        if not (verdict.delivered and presented.success):
            return None
        settled = _as_settled(plan.record, verdict)
        try:
            if order.renewing is not None:
                return await keeper.renew(
                    order.renewing, order.url, settled, presented.headers, challenge.extensions
                )
            terms = order.terms
            cap = terms.max_session_payment
            return await keeper.open(
                order.scope,
                order.url,
                settled,
                presented.headers,
                challenge.extensions,
                ttl_seconds=terms.ttl_seconds,
                label=terms.label,
                max_session_payment=None if cap is None else int(cap.scaleb(settled.decimals)),
            )
        except Exception:  # the payment is recorded whatever happens to what it bought
            log.exception("payment #%s: saving what it paid for failed", plan.ledger_id)
            return None

    def _refused(self, order: Order, refused: Refused, carrier: Carrier[Answer]) -> None:
        """The one place a refusal that becomes the client's answer is put on record; never raises."""
        headers, body = carrier.evidence()
        info = order.info
        self.refusals.record(
            reason=refused.reason_code.value,
            detail=refused.detail,
            method=info.method,
            url=info.url,
            host=info.host,
            headers=headers,
            body=body,
            payment_id=refused.ledger_id,
            session_id=info.session_id,
        )

    async def _record_failure(self, plan: PaymentPlan, reason: str) -> None:
        try:
            await self.payer.record_transport_failure(plan, reason)
        except StoreError as exc:  # the payer keeps it in doubt in memory; the row says pending
            log.error("payment #%s: transport failure not recorded: %s", plan.ledger_id, exc)


def _as_settled(record: PaymentRecord, verdict: Verdict) -> PaymentRecord:
    """The row as it is about to be written (the session names its payment and transaction)."""
    return replace(
        record,
        state=verdict.state,
        tx_hash=verdict.tx_hash or record.tx_hash,
        payer=verdict.payer or record.payer,
    )


def _failure_text(exc: Exception) -> str:
    code, message = getattr(exc, "reason_code", None), getattr(exc, "message", None)
    if isinstance(code, str) and isinstance(message, str):
        return f"{code}: {message}"  # an UpstreamError: its code and message, as before
    return f"{type(exc).__name__}: {exc}"
