"""Engine glue for payments: notice a 402, ask the Payer, replay once with the payment header.

The decisions (is this a challenge, may we pay, what to sign) live in `payer.py` and below; this
module only moves bytes and records what happened. At most one paid attempt per client request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal

import aiohttp
from multidict import CIMultiDictProxy

from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.responses import ERROR_HEADER
from proxy.engine.upstream import UpstreamError
from proxy.faults import checkpoint
from proxy.payments.challenge import challenge_refetch_headers, needs_challenge_refetch
from proxy.payments.doubt import MAX_PRESENTATIONS, backoff
from proxy.payments.payer import Payer, PaymentPlan, PaymentRequestInfo, Refused, settlement_verdict
from proxy.payments.policy import ReasonCode
from proxy.payments.refusals import RefusalRecorder
from proxy.store.base import PaymentRecord, PaymentState, StoreError
from proxy.store.refusal_store import SqliteRefusalStore

log = logging.getLogger("x402_proxy.payments")

PAYMENT_HEADER = "X-402-Proxy-Payment"
RETRY_AFTER = "Retry-After"
# What the client is told when the paid answer did not deliver (the server's answer goes along).
_OUTCOME_ERRORS = {
    PaymentState.REJECTED: "payment_rejected",
    PaymentState.IN_DOUBT: "payment_in_doubt",
    PaymentState.SETTLED_UNDELIVERED: "payment_undelivered",
}
# A 402 body is read whole to find a V1 challenge; a bigger one is not a challenge we will honour.
MAX_CHALLENGE_BODY = 1024 * 1024


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


@dataclass
class PaymentAttempt:
    """What became of one 402: the answer for the client, and the payment if one was sent."""

    outcome: Outcome
    record: PaymentRecord | None = None
    # Headers of the 402 that was paid: sessions read the server's SIWX offer from them.
    challenge_headers: CIMultiDictProxy[str] | None = None
    refusal: str | None = None
    refused_payment: int | None = None  # the ledger row behind a refusal (dry run, in doubt, undelivered)


SettledHook = Callable[[PaymentAttempt], Awaitable[None]]


class PaymentStage:
    def __init__(self, payer: Payer, refusal_store: SqliteRefusalStore | None = None) -> None:
        self.payer = payer
        # Every refusal the client is answered with is counted and kept here (see `_refused`).
        self.refusals = RefusalRecorder(refusal_store, payer.assets, payer.clock)

    def __call__(self, inner: Exchanger) -> Exchanger:
        async def exchange(request: Exchange) -> Outcome:
            outcome = await inner(request)
            if outcome.response.status != 402:
                return outcome
            return (await self.attempt(request, outcome, inner)).outcome

        return exchange

    async def attempt(
        self,
        request: Exchange,
        outcome: Outcome,
        inner: Exchanger,
        *,
        max_amount: Decimal | None = None,
        session_id: str | None = None,
        on_settled: SettledHook | None = None,
        need: str | None = None,
        ask_above: Decimal | None = None,
    ) -> PaymentAttempt:
        """Given a 402 for `request`, pay at most once and replay; never raises for a refusal.

        `on_settled` runs when the paid answer is a success (2xx/3xx) that delivered what was paid for
        (settled, or in doubt with the resource served), *before* the ledger row says so (see `_pay`);
        its `record` is the row as it is about to be written. `need`: what is bought (doubt.py).
        """
        started = time.perf_counter()
        challenge_source = outcome
        if request.replayable and needs_challenge_refetch(402, outcome.response.headers, b""):
            # A V1 server answered a browser-like request with an HTML paywall (megabytes of it): ask
            # again as an API client for the JSON challenge, and leave the page unread so the client
            # still gets it, streamed, if we end up not paying.
            refetch = request.with_headers(challenge_refetch_headers(request.headers))
            challenge_source = await inner(refetch)
            if challenge_source.response.status != 402:
                challenge_source.response.release()
                return PaymentAttempt(outcome)
        try:
            await read_bounded(challenge_source)
        except ChallengeBodyTooLarge:
            log.warning(
                "402 from %s has a body over %d bytes; not inspected", request.url.host, MAX_CHALLENGE_BODY
            )
            if challenge_source is not outcome:
                return PaymentAttempt(outcome)
            code = ReasonCode.MALFORMED_CHALLENGE
            refused = Refused(code, f"the 402 body is over {MAX_CHALLENGE_BODY} bytes; not inspected")
            self._refused(request, session_id, refused, challenge_source)
            too_large = b"x402-proxy: 402 body too large to inspect\n"
            return PaymentAttempt(_refusal_outcome(outcome, code.value, too_large), refusal=code.value)
        info = PaymentRequestInfo(
            method=request.method,
            url=str(request.url),
            host=request.url.host or "",
            headers=request.client_headers,
            session_id=session_id,
            max_amount=max_amount,
            need=need,
            ask_above=ask_above,
        )
        try:
            decision = await self.payer.on_402(
                info,
                402,
                challenge_source.response.headers,
                challenge_source.body or b"",
                request.replayable,
            )
        except StoreError as exc:
            # The pending row could not be written, so nothing was signed: say why, never pay unrecorded.
            log.error("not paying %s: %s", request.url.host, exc)
            raise UpstreamError(503, "ledger_unavailable", f"cannot record a payment: {exc}") from None
        if isinstance(decision, Refused):
            self._refused(request, session_id, decision, challenge_source)
            outcome.extra_headers.append((ERROR_HEADER, decision.reason_code.value))
            if decision.ledger_id is not None:
                outcome.extra_headers.append((PAYMENT_HEADER, str(decision.ledger_id)))
            if decision.retry_after is not None:
                outcome.extra_headers.append((RETRY_AFTER, str(decision.retry_after)))
            return PaymentAttempt(
                outcome, refusal=decision.reason_code.value, refused_payment=decision.ledger_id
            )
        if not isinstance(decision, PaymentPlan):
            return PaymentAttempt(outcome)
        if challenge_source is not outcome:
            outcome.release_body()
        challenge_headers = challenge_source.response.headers
        paid, record = await self._pay(request, decision, inner, started, challenge_headers, on_settled)
        return PaymentAttempt(paid, record, challenge_headers)

    def _refused(
        self, request: Exchange, session_id: str | None, refused: Refused, challenge: Outcome
    ) -> None:
        """The one place a refusal that becomes the client's answer is put on record; never raises."""
        self.refusals.record(
            reason=refused.reason_code.value,
            detail=refused.detail,
            method=request.method,
            url=str(request.url),
            host=request.url.host or "",
            headers=challenge.response.headers,
            body=challenge.body or b"",
            payment_id=refused.ledger_id,
            session_id=session_id,
        )

    async def _pay(
        self,
        request: Exchange,
        plan: PaymentPlan,
        inner: Exchanger,
        started: float,
        challenge_headers: CIMultiDictProxy[str],
        on_settled: SettledHook | None,
    ) -> tuple[Outcome, PaymentRecord | None]:
        paid_request = request.with_headers({plan.header_name: plan.header_value})
        # The proxy's own cost of a payment: 402 in hand -> paid retry leaving (benchmarked in bench/).
        log.debug("payment #%s overhead %.3f ms", plan.ledger_id, (time.perf_counter() - started) * 1000)
        try:
            paid = await inner(paid_request)
        except UpstreamError as exc:
            await self._record_failure(plan, f"{exc.reason_code}: {exc.message}")
            exc.extra_headers.append((PAYMENT_HEADER, str(plan.ledger_id)))
            raise
        except asyncio.CancelledError:
            # The drain deadline passed (or the client left) while the paid request was out: it may
            # still settle, so the row says `unknown` now rather than waiting for the next start.
            await self._record_failure(plan, "cancelled while the paid request was in flight")
            raise
        checkpoint("payment.answered")
        rejection_body: bytes | None = None
        if paid.response.status == 402:
            try:
                rejection_body = await read_bounded(paid)
            except (ChallengeBodyTooLarge, UpstreamError):
                rejection_body = None  # the answer still gets recorded below; only its reason text is lost
        paid.extra_headers.append((PAYMENT_HEADER, str(plan.ledger_id)))
        status = paid.response.status
        verdict = settlement_verdict(status, paid.response.headers, rejection_body)
        if on_settled is not None and verdict.delivered and 200 <= status < 400:
            # What was paid for (a session) is saved before the row says `settled`: killed in between,
            # the row is in doubt at restart (a retry is refused) and the session is back, never a
            # settled row without its session (a retry would pay again).
            settled = replace(
                plan.record,
                state=verdict.state,
                tx_hash=verdict.tx_hash or plan.record.tx_hash,
                payer=verdict.payer or plan.record.payer,
            )
            try:
                await on_settled(PaymentAttempt(paid, settled, challenge_headers))
            except Exception:  # the payment is recorded whatever happens to what it bought
                log.exception("payment #%s: saving what it paid for failed", plan.ledger_id)
        try:
            record = await self.payer.record_verdict(plan, verdict)
        except StoreError as exc:
            # The money has moved and the answer is here: hand it over rather than lose what was paid
            # for. The payer keeps the payment in doubt, so this request is not paid for again.
            log.error("payment #%s: outcome not recorded: %s", plan.ledger_id, exc)
            paid.extra_headers.append((ERROR_HEADER, "ledger_unavailable"))
            return paid, None
        checkpoint("payment.recorded")
        code = _OUTCOME_ERRORS.get(record.state)
        if code is not None and not record.delivered:
            paid.extra_headers.append((ERROR_HEADER, code))
            if record.state is PaymentState.IN_DOUBT and record.valid_before is not None:
                wait = backoff(record.presentations) if record.presentations < MAX_PRESENTATIONS else 60
                paid.extra_headers.append((RETRY_AFTER, str(max(1, int(wait)))))
        return paid, record

    async def _record_failure(self, plan: PaymentPlan, reason: str) -> None:
        try:
            await self.payer.record_transport_failure(plan, reason)
        except StoreError as exc:  # the payer keeps it in doubt in memory; the row says pending
            log.error("payment #%s: transport failure not recorded: %s", plan.ledger_id, exc)


def _refusal_outcome(outcome: Outcome, code: str, body: bytes) -> Outcome:
    outcome.body = body
    outcome.extra_headers.append((ERROR_HEADER, code))
    return outcome
