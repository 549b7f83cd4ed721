"""Engine glue for sessions — the one place a session is chosen for a request.

For each request: find the active session whose scope covers the URL and attach its credentials.
On a 402: answer a Sign-In-With-X challenge if the session can, else pay (once per client request,
one payment in flight per scope) and open or renew the session from the paid answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING

from yarl import URL

from proxy.engine.exchange import EncodedHeaders, Exchange, Exchanger, Outcome
from proxy.observability.context import SESSION_ID
from proxy.payments.amounts import parse_decimal
from proxy.payments.challenge import MalformedChallenge, parse_challenge
from proxy.payments.doubt import scope_need
from proxy.payments.wallet import Wallet
from proxy.purchase.http import HttpPurchase
from proxy.purchase.order import Order, SessionTerms
from proxy.sessions.credentials import (
    SIWX_EXTENSION,
    SIWX_HEADER,
    credential_headers,
    siwx_challenge_response,
)
from proxy.sessions.keeper import SessionKeeper
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
from proxy.warmup import SIWX_PATH, load_off_loop, loaded

if TYPE_CHECKING:
    from proxy.channels.holder import ChannelHolder

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


class SessionStage:
    def __init__(
        self,
        manager: SessionManager,
        payments: HttpPurchase,
        settings: SessionSettings,
        wallet: Wallet | None,
        clock: Callable[[], float] = time.time,
        keeper: SessionKeeper | None = None,
    ) -> None:
        self.manager = manager
        self._payments = payments
        self._keeper = keeper
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
        # batch-settlement channels (proxy/channels/holder.py): a channel session's hit pays a voucher.
        self.channels: ChannelHolder | None = None

    def apply_settings(self, settings: SessionSettings) -> None:
        """A reload (SIGHUP): new sessions follow the new rules; existing sessions keep their scope."""
        self._settings = settings
        self._kinds = set(settings.credential_kinds)
        if self._keeper is not None:
            self._keeper.apply_settings(settings)
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
        if session is not None and session.credentials.siwx is not None and not loaded(SIWX_PATH):
            await load_off_loop(SIWX_PATH)  # the first proactive SIWX sign-in after a start: off the loop
        channels = self.channels
        if channels is not None and session is not None and channels.holds(session.id):
            voucher = await channels.request(self._attach(request, session, url, now, route), session, inner)
            if voucher is not None:
                return voucher
            session = None if not session.is_active(now) else session
        outcome = await inner(self._attach(request, session, url, now, route))
        if outcome.response.status != 402:
            if session is not None:
                self.manager.touch(session, now)
                outcome.session_id = session.id
            return outcome
        if url is None:
            payments = self._payments
            return (await payments.buy(request, outcome, inner, payments.order(request)))[0]
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
            outcome.refuse("session_rejected")
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
            signer = self._wallet.sign_text if self._wallet is not None else None
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
            outcome.session_id = session.id

    async def _siwx_fallback(
        self, request: Exchange, outcome: Outcome, session: Session, url: NormalizedURL, inner: Exchanger
    ) -> Outcome | None:
        """Answer the server's own SIWX challenge (its nonce) when our proactive one was not enough."""
        if "siwx" not in self._kinds or self._wallet is None or session.credentials.siwx is None:
            return None
        extension = _challenge_extensions(outcome).get(SIWX_EXTENSION)
        if not isinstance(extension, dict):
            return None
        await load_off_loop(SIWX_PATH)  # the SDK's SIWX module, off the loop the first time
        try:
            header = siwx_challenge_response(
                extension, self._wallet.sign_text, url, network=session.network, address=self._wallet.address
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
        """Buy the scope this URL falls in (or renew `session`): the purchase flow, then the session."""
        scope, rule = (session.scope, None) if session is not None else scope_for(url, self._settings.rules)
        payments = self._payments
        order = replace(
            payments.order(
                request,
                session_id=session.id if session else None,
                max_amount=_remaining(session, rule),
                need=scope_need(scope.key),
                ask_above=_ask_above(rule),
            ),
            scope=scope,
            url=url,
            renewing=session,
            payments_seen=len(session.payment_ids) if session is not None else 0,
            terms=_rule_terms(rule),
        )
        answer, purchase = await payments.buy(request, outcome, inner, order, self._attach_session)
        if purchase.session is not None:
            self._used(purchase.session, answer, self._clock())
            return answer
        refused = purchase.refusal
        if (
            refused is not None
            and refused.reason_code.value == UNDELIVERED
            and refused.ledger_id is not None
            and order.renewing is None
        ):
            claimed = await self._claim_undelivered(request, answer, refused.ledger_id, inner, url, order)
            if claimed is not None:
                return claimed
        return answer

    def _attach_session(self, request: Exchange, session: Session) -> Exchange:
        url = routable_url(request.url)
        return self._attach(request, session, url, self._clock())

    async def _claim_undelivered(
        self,
        request: Exchange,
        outcome: Outcome,
        payment_id: int,
        inner: Exchanger,
        url: NormalizedURL,
        order: Order,
    ) -> Outcome | None:
        """The need's money moved but its answer was lost: where the server offers Sign-In-With-X,
        sign in as the wallet that paid and, if it grants access, open the session that payment bought."""
        extension = _challenge_extensions(outcome).get(SIWX_EXTENSION)
        record = await self._payments.payer.store.get(payment_id)
        if (
            not isinstance(extension, dict)
            or self._wallet is None
            or self._keeper is None
            or order.scope is None
            or "siwx" not in self._kinds
            or record is None
        ):
            return None
        await load_off_loop(SIWX_PATH)  # the SDK's SIWX module, off the loop the first time
        try:
            header = siwx_challenge_response(
                extension, self._wallet.sign_text, url, network=record.network, address=self._wallet.address
            )
        except ValueError as exc:
            log.info("payment #%s is undelivered; cannot sign in to %s: %s", record.id, url.host, exc)
            return None
        outcome.release_body()
        retried = await inner(request.with_headers({SIWX_HEADER: header}))
        if not 200 <= retried.response.status < 400:
            if outcome.error_code is not None:
                retried.refuse(outcome.error_code)
            return retried
        terms = order.terms
        cap = terms.max_session_payment
        session = await self._keeper.open(
            order.scope,
            url,
            record,
            retried.response.headers.items(),
            _challenge_extensions(outcome),
            ttl_seconds=terms.ttl_seconds,
            max_session_payment=None if cap is None else int(cap.scaleb(record.decimals)),
        )
        log.info("payment #%s was undelivered; Sign-In-With-X claimed it: session %s", record.id, session.id)
        self._used(session, retried, self._clock())
        return retried

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
        payments = self._payments
        order = replace(
            payments.order(request, max_amount=max_amount, need=scope_need(scope.key)),
            scope=scope,
            url=url,
            terms=SessionTerms(ttl_seconds, label, max_amount),
            reuse_sessions=False,
        )
        answer, purchase = await payments.buy(request, outcome, inner, order, self._attach_session)
        refusal = purchase.refusal.reason_code.value if purchase.refusal is not None else None
        if purchase.session is None:
            return StartResult(answer, None, purchase.record, refusal, payment_required=True)
        self._used(purchase.session, answer, self._clock())
        return StartResult(answer, purchase.session, purchase.record, None, payment_required=True)

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
        signer = self._wallet.sign_text if self._wallet is not None else None
        return credential_headers(session, url, [], self._kinds, self._clock(), signer)


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


def _rule_terms(rule: SessionRule | None) -> SessionTerms:
    """The ttl and cap a matching rule sets for a new session."""
    if rule is None:
        return SessionTerms()
    cap = rule.max_session_payment
    return SessionTerms(
        rule.ttl_seconds, None, None if cap is None else parse_decimal(cap, what="max_session_payment")
    )


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
