"""The HTTP 402 carrier: a challenge in a 402 answer, a payment in the retried request's header.

`HttpPurchase` is the engine's entry: given a request answered 402, it builds the carrier, runs the
purchase flow, and renders the result into the outcome's fields (payment id, error code, Retry-After),
which the edge turns into headers. At most one paid attempt per client request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import aiohttp

from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.upstream import UpstreamError
from proxy.payments.challenge import (
    MalformedChallenge,
    challenge_refetch_headers,
    needs_challenge_refetch,
    parse_challenge,
)
from proxy.payments.doubt import MAX_PRESENTATIONS, backoff
from proxy.payments.headers import CLIENT_PAYMENT_HEADERS, has_any_header
from proxy.payments.networks import NetworkRegistry
from proxy.payments.payer import PassThrough, PaymentPlan, PaymentRequestInfo, Refused, settlement_verdict
from proxy.payments.policy import ReasonCode
from proxy.purchase.flow import PurchaseFlow
from proxy.purchase.order import ChallengeRead, Order, Presented, Purchase
from proxy.sessions.model import Session
from proxy.store.base import PaymentState, StoreError

log = logging.getLogger("x402_proxy.payments")

# What the client is told when the paid answer did not deliver (the server's answer goes along).
_OUTCOME_ERRORS = {
    PaymentState.REJECTED: "payment_rejected",
    PaymentState.IN_DOUBT: "payment_in_doubt",
    PaymentState.SETTLED_UNDELIVERED: "payment_undelivered",
}
# A 402 body is read whole to find a V1 challenge; a bigger one is not a challenge we will honour.
MAX_CHALLENGE_BODY = 1024 * 1024
_TOO_LARGE = b"x402-proxy: 402 body too large to inspect\n"

Attach = Callable[[Exchange, Session], Exchange]
"""The request with a session's credentials (the session stage's, with its caches)."""


class ChallengeBodyTooLarge(Exception):
    pass


async def read_bounded(outcome: Outcome, limit: int = MAX_CHALLENGE_BODY) -> bytes:
    if outcome.body is not None:
        return outcome.body
    length = outcome.response.content_length
    if length is not None and length > limit:
        outcome.response.release()
        raise ChallengeBodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in outcome.response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                outcome.response.release()
                raise ChallengeBodyTooLarge
            chunks.append(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise UpstreamError(
            502, "upstream_body_error", f"upstream 402 body failed: {type(exc).__name__}"
        ) from exc
    body = b"".join(chunks)
    outcome.body = body
    return body


class HttpCarrier:
    """One client request answered 402, and what the flow does with it (see `purchase/order.py`)."""

    def __init__(
        self,
        request: Exchange,
        outcome: Outcome,
        inner: Exchanger,
        networks: NetworkRegistry,
        attach: Attach | None = None,
    ) -> None:
        self.request = request
        self.outcome = outcome  # the answer the client gets unless a paid one replaces it
        self.source = outcome  # where the challenge was read (a refetch, for an HTML paywall)
        self._inner = inner
        self._networks = networks
        self._attach = attach
        self.started = time.perf_counter()

    async def challenge(self) -> ChallengeRead:
        request, outcome = self.request, self.outcome
        if has_any_header(request.client_headers, CLIENT_PAYMENT_HEADERS):
            return PassThrough("the request already carries a payment credential")
        if request.replayable and needs_challenge_refetch(402, outcome.response.headers, b""):
            # A V1 server answered a browser-like request with an HTML paywall (megabytes of it): ask
            # again as an API client for the JSON challenge, and leave the page unread so the client
            # still gets it, streamed, if we end up not paying.
            refetched = await self._inner(request.with_headers(challenge_refetch_headers(request.headers)))
            if refetched.response.status != 402:
                refetched.response.release()
                return PassThrough("the refetch for a JSON challenge was not a 402")
            self.source = refetched
        try:
            body = await read_bounded(self.source)
        except ChallengeBodyTooLarge:
            log.warning(
                "402 from %s has a body over %d bytes; not inspected", request.url.host, MAX_CHALLENGE_BODY
            )
            if self.source is not outcome:
                return PassThrough("the refetched 402 is too large to inspect")
            outcome.body = _TOO_LARGE
            detail = f"the 402 body is over {MAX_CHALLENGE_BODY} bytes; not inspected"
            return Refused(ReasonCode.MALFORMED_CHALLENGE, detail)
        try:
            challenge = parse_challenge(402, self.source.response.headers, body, self._networks)
        except MalformedChallenge as exc:
            return Refused(ReasonCode.MALFORMED_CHALLENGE, exc.detail)
        if challenge is None:
            return PassThrough("no x402 challenge in the response")
        if not request.replayable:
            return Refused(
                ReasonCode.BODY_TOO_LARGE_TO_REPLAY,
                "the request body was not buffered, so the paid request cannot be replayed",
            )
        return challenge

    def evidence(self) -> tuple[Mapping[str, str], bytes]:
        source = self.source
        body = source.body if source.body is not _TOO_LARGE else b""
        return source.response.headers, body or b""

    async def with_session(self, session: Session) -> bool:
        assert self._attach is not None
        self.outcome.release_body()
        retried = await self._inner(self._attach(self.request, session))
        self.outcome = self.source = retried
        return retried.response.status != 402

    async def present(self, plan: PaymentPlan) -> Presented[Outcome]:
        if self.source is not self.outcome:
            self.outcome.release_body()  # the paywall page: a paid answer replaces it
        paid_request = self.request.with_headers({plan.header_name: plan.header_value})
        # The proxy's own cost of a payment: 402 in hand -> paid retry leaving (benchmarked in bench/).
        log.debug("payment #%s overhead %.3f ms", plan.ledger_id, (time.perf_counter() - self.started) * 1000)
        try:
            paid = await self._inner(paid_request)
        except UpstreamError as exc:
            exc.payment_id = plan.ledger_id
            raise
        rejection_body: bytes | None = None
        if paid.response.status == 402:
            try:
                rejection_body = await read_bounded(paid)
            except (ChallengeBodyTooLarge, UpstreamError):
                rejection_body = None  # the answer still gets recorded; only its reason text is lost
        status = paid.response.status
        verdict = settlement_verdict(status, paid.response.headers, rejection_body)
        return Presented(paid, verdict, paid.response.headers.items(), success=200 <= status < 400)


class HttpPurchase:
    """The engine's side of the purchase flow for HTTP: a stage of its own when sessions are off."""

    def __init__(self, flow: PurchaseFlow) -> None:
        self.flow = flow
        self.payer = flow.payer

    def __call__(self, inner: Exchanger) -> Exchanger:
        async def exchange(request: Exchange) -> Outcome:
            outcome = await inner(request)
            if outcome.response.status != 402:
                return outcome
            return (await self.buy(request, outcome, inner, self.order(request)))[0]

        return exchange

    def order(self, request: Exchange, **fields: object) -> Order:
        """An order for what this request asks for (`fields`: the PaymentRequestInfo extras)."""
        info = PaymentRequestInfo(
            method=request.method,
            url=str(request.url),
            host=request.url.host or "",
            headers=request.client_headers,
            **fields,  # type: ignore[arg-type]
        )
        return Order(info)

    async def buy(
        self,
        request: Exchange,
        outcome: Outcome,
        inner: Exchanger,
        order: Order,
        attach: Attach | None = None,
    ) -> tuple[Outcome, Purchase[Outcome]]:
        """Given a 402 for `request`: (the answer for the client, what the flow did)."""
        carrier = HttpCarrier(request, outcome, inner, self.payer.assets.networks, attach)
        try:
            purchase = await self.flow.buy(order, carrier)
        except StoreError as exc:
            # The pending row could not be written, so nothing was signed: say why, never pay unrecorded.
            log.error("not paying %s: %s", request.url.host, exc)
            raise UpstreamError(503, "ledger_unavailable", f"cannot record a payment: {exc}") from None
        return render(purchase, carrier.outcome), purchase


def render(purchase: Purchase[Outcome], current: Outcome) -> Outcome:
    """The purchase as the outcome's fields (headers come from them at the edge)."""
    refused = purchase.refusal
    if refused is not None:
        current.refuse(refused.reason_code.value, refused.ledger_id, refused.retry_after)
        return current
    paid, plan = purchase.answer, purchase.plan
    if paid is None or plan is None:
        return current  # passed through, or served by a session another request bought
    paid.payment_id = plan.ledger_id
    record = purchase.record
    if purchase.unrecorded or record is None:
        paid.refuse("ledger_unavailable")
        return paid
    code = _OUTCOME_ERRORS.get(record.state)
    if code is not None and not record.delivered:
        wait: int | None = None
        if record.state is PaymentState.IN_DOUBT and record.valid_before is not None:
            seconds = backoff(record.presentations) if record.presentations < MAX_PRESENTATIONS else 60
            wait = max(1, int(seconds))
        paid.refuse(code, retry_after=wait)
    return paid
