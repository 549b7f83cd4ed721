"""Engine glue for sessions — the one place a session is chosen for a request.

For each request: find the active session whose scope covers the URL and attach its credentials.
On a 402: answer a Sign-In-With-X challenge if the session can, else pay (once per client request,
one payment in flight per scope) and open or renew the session from the paid answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from yarl import URL

from proxy.engine.exchange import EncodedHeaders, Exchange, Exchanger, Outcome
from proxy.engine.responses import ERROR_HEADER
from proxy.faults import checkpoint
from proxy.observability.context import SESSION_ID
from proxy.payments.amounts import parse_decimal
from proxy.payments.challenge import MalformedChallenge, parse_challenge
from proxy.payments.doubt import scope_need
from proxy.payments.stage import PaymentAttempt, PaymentStage
from proxy.payments.wallet import Wallet
from proxy.sessions.credentials import (
    SIWX_EXTENSION,
    SIWX_HEADER,
    capture_credentials,
    credential_headers,
    merge_credentials,
    siwx_challenge_response,
    siwx_offer,
)
from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session, SessionCredentials
from proxy.sessions.scope import (
    NormalizedURL,
    Scope,
    ScopeError,
    ScopeKind,
    SessionRule,
    normalize_url,
    path_in_normal_form,
    scope_for,
)
from proxy.sessions.settings import SessionSettings
from proxy.store.base import PaymentRecord
from proxy.tokens import SessionClaim, make_session_token

log = logging.getLogger("x402_proxy.sessions")

SESSION_HEADER = "X-402-Proxy-Session"
UNDELIVERED = "payment_undelivered"
_ROUTE_CACHE_SIZE = 4096
_STATIC_CACHE_SIZE = 4096
_ROUTE_CACHE_URL = 1024


@dataclass(slots=True)
class _Route:
    """What one request URL resolved to; valid while the session index keeps its `generation`.

    `credentials`/`headers`: the session's static credential headers for this URL, once built, and
    the credentials object they came from (None until the first hit, or when they are per-request).
    """

    url: NormalizedURL | None
    generation: int
    session: Session | None
    credentials: SessionCredentials | None = None
    headers: EncodedHeaders | None = None
    header: tuple[str, str] = ("", "")  # (SESSION_HEADER, session id) for the answer


class SessionStage:
    def __init__(
        self,
        manager: SessionManager,
        payments: PaymentStage,
        settings: SessionSettings,
        wallet: Wallet | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self._payments = payments
        self._settings = settings
        self._kinds = set(settings.credential_kinds)
        self._wallet = wallet
        self._clock = clock
        # Hot sessions' static credential headers (lease headers, signed token): building them costs more
        # than the rest of a session hit. Bounded, and keyed by the credentials object a renewal replaces.
        # A plain dict emptied when full: an LRU's bookkeeping costs as much as the lookup it saves.
        self._static: dict[str, tuple[SessionCredentials, EncodedHeaders]] = {}
        # Request URL -> what it resolved to (see _Route). The same few URLs recur, and resolving one
        # (normalising, walking the index, the TLRU cache's bookkeeping) cost a session hit ~15 % of
        # its throughput. Keyed by the URL object (equal URLs have the same text): no str() per request.
        self._index = manager.index
        self._routes: dict[URL, _Route] = {}

    def apply_settings(self, settings: SessionSettings) -> None:
        """A reload (SIGHUP): new sessions follow the new rules; existing sessions keep their scope."""
        self._settings = settings
        self._kinds = set(settings.credential_kinds)
        self._static.clear()
        self._routes.clear()

    def __call__(self, inner: Exchanger) -> Exchanger:
        # Returns handle()'s coroutine itself: an `async def` wrapper would add a frame to every await.
        handle = self.handle
        return lambda request: handle(request, inner)

    async def handle(self, request: Exchange, inner: Exchanger) -> Outcome:
        now = self._clock()
        route = self._routes.get(request.url)
        if route is None or route.generation != self._index.generation:
            route = self._route(request.url, now)
        session = route.session
        if session is not None:
            if session.ended_at is not None or now >= session.expires_at:  # over since it was routed
                route = self._route(request.url, now)
                session = route.session
            if session is not None:
                SESSION_ID.set(session.id)  # log lines of this request name its session
        url = route.url
        outcome = await inner(self._attach(request, session, url, now, route))
        if outcome.response.status != 402:
            if session is not None:
                self.manager.touch(session, now)
                outcome.extra_headers.append(route.header)  # session is route.session: its pair, built once
            return outcome
        if url is None:
            return (await self._payments.attempt(request, outcome, inner)).outcome
        if session is not None:
            return await self._rejected(
                request, outcome, session, url, inner, now, renew=self._settings.renew_on_reject
            )
        return await self._pay(request, outcome, inner, url, None)

    async def _rejected(
        self,
        request: Exchange,
        outcome: Outcome,
        session: Session,
        url: NormalizedURL,
        inner: Exchanger,
        now: float,
        *,
        renew: bool,
    ) -> Outcome:
        """An in-scope request got a 402 although its credentials went along: SIWX, then maybe renew."""
        session.rejected_count += 1
        retried = await self._siwx_fallback(request, outcome, session, url, inner)
        if retried is not None:
            if retried.response.status != 402:
                self._used(session, retried, now)
                return retried
            outcome = retried
        if not renew:
            outcome.extra_headers.append((ERROR_HEADER, "session_rejected"))
            return outcome
        return await self._pay(request, outcome, inner, url, session)

    def _route(self, request_url: URL, now: float) -> _Route:
        """Resolve a request URL (normal form, covering session) and memoise the answer."""
        generation = self._index.generation  # read first: a change during the match makes the memo stale
        raw = str(request_url)
        try:
            url: NormalizedURL | None = routable_url(request_url)
        except ScopeError:
            url = None  # no session applies: forwarded without credentials, pays (if asked) without one
        session = self.manager.match(url, now) if url is not None else None
        route = _Route(url, generation, session)
        if session is not None:
            route.header = (SESSION_HEADER, session.id)
        if len(raw) <= _ROUTE_CACHE_URL:  # bounded memory: 4096 entries of at most 1 KiB
            routes = self._routes
            if len(routes) >= _ROUTE_CACHE_SIZE:
                routes.clear()
            routes[request_url] = route
        return route

    def _attach(
        self,
        request: Exchange,
        session: Session | None,
        url: NormalizedURL | None,
        now: float,
        route: _Route | None = None,
    ) -> Exchange:
        if session is None or url is None:
            return request
        creds = session.credentials
        if route is not None and route.session is session and route.credentials is creds:
            # The route was matched for this very URL in this index generation, so the session covers
            # it; the static headers were built from these credentials (a renewal replaces the object).
            static = route.headers
            return request.with_encoded(static) if static is not None and static.items else request
        if creds.cookies or (creds.siwx and "siwx" in self._kinds):
            # Per-request parts (cookie matching, a fresh SIWX nonce): build everything each time.
            signer = self._wallet.account if self._wallet is not None else None
            headers = credential_headers(session, url, request.headers.items(), self._kinds, now, signer)
        else:
            cached = self._static.get(session.id)
            if cached is None or cached[0] is not creds:
                built = EncodedHeaders.build(credential_headers(session, url, (), self._kinds, now, None))
                if len(self._static) >= _STATIC_CACHE_SIZE:
                    self._static.clear()
                cached = self._static[session.id] = (creds, built)
            # The scope check stays per request: a cached header set must never leave its scope.
            if session.scope.covers(url) and session.is_active(now):
                if route is not None and route.session is session:
                    route.credentials, route.headers = creds, cached[1]  # next time: straight through
                if cached[1].items:
                    # Encoded once per session and appended to the upstream head: no per-request copy.
                    return request.with_encoded(cached[1])
            return request
        return request.with_headers(headers) if headers else request

    def _used(self, session: Session | None, outcome: Outcome, now: float) -> None:
        if session is not None:
            self.manager.touch(session, now)
            outcome.extra_headers.append((SESSION_HEADER, session.id))

    async def _siwx_fallback(
        self, request: Exchange, outcome: Outcome, session: Session, url: NormalizedURL, inner: Exchanger
    ) -> Outcome | None:
        """Answer the server's own SIWX challenge (its nonce) when our proactive one was not enough."""
        if "siwx" not in self._kinds or self._wallet is None or session.credentials.siwx is None:
            return None
        extension = _challenge_extensions(outcome).get(SIWX_EXTENSION)
        if not isinstance(extension, dict):
            return None
        try:
            header = siwx_challenge_response(
                extension, self._wallet.account, url, network=session.network, address=self._wallet.address
            )
        except ValueError as exc:
            log.info("cannot answer SIWX challenge from %s: %s", url.host, exc)
            return None
        outcome.release_body()
        return await inner(
            self._attach(request, session, url, self._clock()).with_headers({SIWX_HEADER: header})
        )

    async def _pay(
        self,
        request: Exchange,
        outcome: Outcome,
        inner: Exchanger,
        url: NormalizedURL,
        session: Session | None,
    ) -> Outcome:
        scope, rule = (session.scope, None) if session is not None else scope_for(url, self._settings.rules)
        payments_seen = len(session.payment_ids) if session is not None else 0
        async with self.manager.flight(scope.key):
            now = self._clock()
            fresh = self.manager.match(url, now)
            if fresh is not None and (fresh is not session or len(fresh.payment_ids) > payments_seen):
                # Another request paid for this scope while we waited: use its session, do not pay again.
                outcome.release_body()
                retried = await inner(self._attach(request, fresh, url, now))
                if retried.response.status != 402:
                    self._used(fresh, retried, now)
                    return retried
                outcome, session = retried, fresh
                payments_seen = len(fresh.payment_ids)
            paid_for: list[Session] = []
            renewing = session

            async def save_session(settled: PaymentAttempt) -> None:
                # Runs before the ledger row says `settled` (see PaymentStage._pay): a crash in between
                # leaves the session and an in-doubt row, never a settled payment without its session.
                now = self._clock()
                if renewing is None:
                    ttl, session_cap = _rule_terms(rule, settled)
                    paid_for.append(
                        await self._open(
                            scope, url, settled, now, ttl_seconds=ttl, max_session_payment=session_cap
                        )
                    )
                else:
                    await self._renew(renewing, url, settled, now)
                    paid_for.append(renewing)

            attempt = await self._payments.attempt(
                request,
                outcome,
                inner,
                max_amount=_remaining(session, rule),
                session_id=session.id if session else None,
                on_settled=save_session,
                need=scope_need(scope.key),
                ask_above=_ask_above(rule),
            )
            if not paid_for:
                if attempt.refusal == UNDELIVERED and attempt.refused_payment is not None and session is None:
                    claimed = await self._claim_undelivered(request, attempt, inner, url, scope, rule)
                    if claimed is not None:
                        return claimed
                return attempt.outcome
            self._used(paid_for[0], attempt.outcome, self._clock())
            return attempt.outcome

    async def _claim_undelivered(
        self,
        request: Exchange,
        attempt: PaymentAttempt,
        inner: Exchanger,
        url: NormalizedURL,
        scope: Scope,
        rule: SessionRule | None,
    ) -> Outcome | None:
        """The need's money moved but its answer was lost: where the server offers Sign-In-With-X,
        sign in as the wallet that paid and, if it grants access, open the session that payment bought."""
        outcome = attempt.outcome
        extension = _challenge_extensions(outcome).get(SIWX_EXTENSION)
        record = await self._payments.payer.store.get(attempt.refused_payment or 0)
        if (
            not isinstance(extension, dict)
            or self._wallet is None
            or "siwx" not in self._kinds
            or record is None
        ):
            return None
        try:
            header = siwx_challenge_response(
                extension, self._wallet.account, url, network=record.network, address=self._wallet.address
            )
        except ValueError as exc:
            log.info("payment #%s is undelivered; cannot sign in to %s: %s", record.id, url.host, exc)
            return None
        outcome.release_body()
        retried = await inner(request.with_headers({SIWX_HEADER: header}))
        if not 200 <= retried.response.status < 400:
            retried.extra_headers.extend((n, v) for n, v in outcome.extra_headers if n == ERROR_HEADER)
            return retried
        now = self._clock()
        claimed = PaymentAttempt(retried, record, outcome.response.headers)
        ttl, session_cap = _rule_terms(rule, claimed)
        session = await self._open(scope, url, claimed, now, ttl_seconds=ttl, max_session_payment=session_cap)
        log.info("payment #%s was undelivered; Sign-In-With-X claimed it: session %s", record.id, session.id)
        self._used(session, retried, now)
        return retried

    async def _open(
        self,
        scope: Scope,
        url: NormalizedURL,
        attempt: PaymentAttempt,
        now: float,
        *,
        ttl_seconds: int | None = None,
        label: str | None = None,
        max_session_payment: int | None = None,
    ) -> Session:
        record = attempt.record
        assert record is not None
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
        session.credentials = self._capture(url, attempt, record.network, now)
        self._sign_token(session, record.tx_hash)
        checkpoint("session.before_save")
        self.manager.add(session)
        checkpoint("session.saved")
        await self._payments.payer.store.attach_session(record.id, session.id)
        log.info(
            "session %s opened for %s %s (payment #%s)", session.id, scope.kind, scope.to_url(), record.id
        )
        return session

    # -- control plane (admin API, CLI, MCP tools) ---------------------------------------------------

    async def start(
        self,
        request: Exchange,
        inner: Exchanger,
        *,
        kind: ScopeKind,
        ttl_seconds: int | None,
        label: str | None,
        max_amount: Decimal | None,
    ) -> StartResult:
        """Open a session ahead of use: one unpaid try, then at most one payment under `max_amount`."""
        url = routable_url(request.url)
        scope = Scope.from_url(url, kind)
        outcome = await inner(request)
        if outcome.response.status != 402:
            return StartResult(outcome)
        async with self.manager.flight(scope.key):
            opened: list[Session] = []

            async def save_session(
                settled: PaymentAttempt,
            ) -> None:  # before the row says settled, as in _pay
                assert settled.record is not None
                cap = None if max_amount is None else int(max_amount.scaleb(settled.record.decimals))
                opened.append(
                    await self._open(
                        scope,
                        url,
                        settled,
                        self._clock(),
                        ttl_seconds=ttl_seconds,
                        label=label,
                        max_session_payment=cap,
                    )
                )

            attempt = await self._payments.attempt(
                request,
                outcome,
                inner,
                max_amount=max_amount,
                on_settled=save_session,
                need=scope_need(scope.key),
            )
            if not opened:
                return StartResult(
                    attempt.outcome, None, attempt.record, attempt.refusal, payment_required=True
                )
            self._used(opened[0], attempt.outcome, self._clock())
            return StartResult(attempt.outcome, opened[0], attempt.record, None, payment_required=True)

    async def fetch(
        self, session: Session, request: Exchange, inner: Exchanger, *, allow_renew: bool
    ) -> Outcome:
        """A request through one named session: credentials attached; pays only when `allow_renew`."""
        url = routable_url(request.url)
        if not session.scope.covers(url):
            raise ScopeError("url is not in the session's scope")
        now = self._clock()
        outcome = await inner(self._attach(request, session, url, now))
        if outcome.response.status != 402:
            self._used(session, outcome, now)
            return outcome
        return await self._rejected(request, outcome, session, url, inner, now, renew=allow_renew)

    def credentials_for(self, session: Session, url: str) -> dict[str, str]:
        """Credential headers for `url` (e.g. the upstream DELETE when a session ends)."""
        signer = self._wallet.account if self._wallet is not None else None
        return credential_headers(session, url, [], self._kinds, self._clock(), signer)

    async def _renew(self, session: Session, url: NormalizedURL, attempt: PaymentAttempt, now: float) -> None:
        record = attempt.record
        assert record is not None
        session.record_payment(record.id, record.amount)
        session.renewals += 1
        session.expires_at = now + session.ttl_seconds
        captured = self._capture(url, attempt, record.network, now)
        if captured.siwx is None and session.credentials.siwx is not None:
            # merge_credentials keeps the stored parameters: an offer we cannot use never replaces them
            # (a hostile one would otherwise switch proactive SIWX off for the rest of the session).
            problem = self._siwx_offer_problem(url, attempt, record.network)
            if problem is not None:
                log.warning(
                    "session %s keeps its Sign-In-With-X parameters: the renewal's offer is unusable (%s)",
                    session.id,
                    problem,
                )
        session.credentials = merge_credentials(session.credentials, captured, now)
        self._sign_token(session, record.tx_hash)
        self.manager.renewed(session)
        await self._payments.payer.store.attach_session(record.id, session.id)
        log.info("session %s renewed (payment #%s)", session.id, record.id)

    def _siwx_offer_problem(self, url: NormalizedURL, attempt: PaymentAttempt, network: str) -> str | None:
        """Why the SIWX offer of a paid 402 was not taken (None: there was none, or it was taken)."""
        offer = _challenge_extensions_from(attempt).get(SIWX_EXTENSION) if "siwx" in self._kinds else None
        if not isinstance(offer, dict):
            return None
        verdict = siwx_offer(offer, url, network)
        return verdict if isinstance(verdict, str) else None

    def _capture(
        self, url: NormalizedURL, attempt: PaymentAttempt, network: str, now: float
    ) -> SessionCredentials:
        extensions = _challenge_extensions_from(attempt)
        siwx = extensions.get(SIWX_EXTENSION) if "siwx" in self._kinds else None
        return capture_credentials(
            attempt.outcome.response.headers.items(),
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
        session.credentials.session_token = make_session_token(claim, self._wallet.account)


def routable_url(url: URL) -> NormalizedURL:
    """The normal form of a request URL, provided its raw path (what is forwarded) is already in it.

    Scopes are decided on the normal form, so a raw path a server may read as another path (dot
    segments, ``%2E%2E``, ``..%2F``, ``..;``: ``path_in_normal_form``) gets no session at all: raises
    ``ScopeError``, which the stage treats like a URL no session covers (fail closed).
    """
    normal = normalize_url(str(url))
    if not path_in_normal_form(url.raw_path):
        raise ScopeError(
            "the URL's path is not in normal form (dot segments, %2E, ..%2F, ..;): a server may route it "
            "elsewhere, so no session credential goes with it"
        )
    return normal


@dataclass
class StartResult:
    outcome: Outcome
    session: Session | None = None
    record: PaymentRecord | None = None
    refusal: str | None = None
    payment_required: bool = False


def _rule_terms(rule: SessionRule | None, attempt: PaymentAttempt) -> tuple[int | None, int | None]:
    """(ttl, cap in atomic units) a matching rule sets for a new session."""
    if rule is None:
        return None, None
    cap = None
    if rule.max_session_payment is not None and attempt.record is not None:
        cap = int(
            parse_decimal(rule.max_session_payment, what="max_session_payment").scaleb(
                attempt.record.decimals
            )
        )
    return rule.ttl_seconds, cap


def _ask_above(rule: SessionRule | None) -> Decimal | None:
    if rule is None or rule.ask_above is None:
        return None
    return parse_decimal(rule.ask_above, what="ask_above")


def _remaining(session: Session | None, rule: SessionRule | None) -> Decimal | None:
    if session is not None and session.max_session_payment is not None and session.decimals is not None:
        return Decimal(session.remaining_budget() or 0).scaleb(-session.decimals)
    if session is None and rule is not None and rule.max_session_payment is not None:
        return parse_decimal(rule.max_session_payment, what="max_session_payment")
    return None


def _challenge_extensions(outcome: Outcome) -> dict[str, object]:
    try:
        challenge = parse_challenge(402, outcome.response.headers, outcome.body or b"")
    except MalformedChallenge:
        return {}
    return dict(challenge.extensions) if challenge is not None and challenge.extensions else {}


def _challenge_extensions_from(attempt: PaymentAttempt) -> dict[str, object]:
    if attempt.challenge_headers is None:
        return {}
    try:
        challenge = parse_challenge(402, attempt.challenge_headers, b"")
    except MalformedChallenge:
        return {}
    return dict(challenge.extensions) if challenge is not None and challenge.extensions else {}
