"""x402 over MCP in the engine: a `tools/call` answered with a payment-required result is paid through
the purchase flow, and the client gets the paid result in its place.

Only a POST of one JSON-RPC `tools/call` whose answer is `application/json` or `text/event-stream` is
looked at; everything else goes through untouched. The answer streams: every SSE event before the
result reaches the client as it arrives; only the response to the call is held back while it is read.
When it asks for payment, `McpCarrier` (the flow's carrier for MCP) re-sends the same JSON-RPC request
(same id, same headers: Mcp-Session-Id, MCP-Protocol-Version, auth) with `params._meta["x402/payment"]`,
and the events of the paid answer are relayed as they come. The head of the answer is already out by
then, so a refusal is said inside the message: the server's payment-required result, unchanged but for
`_meta["x402-proxy/error"]`; a paid result carries `_meta["x402-proxy/payment"]` (our ledger id).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from multidict import CIMultiDictProxy

from proxy.engine.exchange import Exchange, Exchanger, Outcome, UpstreamResponse
from proxy.engine.upstream import UpstreamError
from proxy.engine.upstream_pool import PooledResponse
from proxy.mcp_pay.codec import (
    MAX_MESSAGE_BYTES,
    PROXY_ERROR_META,
    PROXY_PAYMENT_META,
    Answer,
    AnswerScanner,
    Forward,
    Framing,
    McpPayError,
    PaymentRequiredResult,
    ToolCall,
    encode_answer,
    extract_payment_required,
    framing_of,
    paid_answer,
    paid_request_body,
    parse_tool_call,
    payment_response_of,
    refused_answer,
    with_proxy_meta,
)
from proxy.mcp_pay.settings import McpSettings
from proxy.payments.challenge import MalformedChallenge, challenge_from_document
from proxy.payments.networks import NetworkRegistry
from proxy.payments.payer import PaymentPlan, PaymentRequestInfo, Refused, Verdict, verdict_for
from proxy.payments.policy import ReasonCode
from proxy.payments.settlement import receipt_of
from proxy.purchase.flow import PurchaseFlow
from proxy.purchase.order import ChallengeRead, Order, Presented, Purchase
from proxy.sessions.model import Session
from proxy.store.base import PaymentState, StoreError

log = logging.getLogger("x402_proxy.mcp")

STREAM_CHUNK = 64 * 1024
# What the client is told in `_meta["x402-proxy/error"]` when the paid call did not deliver.
_OUTCOME_ERRORS = {
    PaymentState.REJECTED: "payment_rejected",
    PaymentState.IN_DOUBT: "payment_in_doubt",
    PaymentState.SETTLED_UNDELIVERED: "payment_undelivered",
    PaymentState.UNSETTLED: "payment_unsettled",
}


def tool_need(endpoint: str, call: ToolCall) -> str:
    """What a paid tool call buys (doubt.py): this tool at this server with these arguments."""
    arguments = json.dumps(call.arguments, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(arguments.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"mcp {endpoint} tool {call.name} args {digest}"


class McpStage:
    def __init__(self, flow: PurchaseFlow, settings: McpSettings, networks: NetworkRegistry) -> None:
        self.flow = flow
        self.settings = settings
        self.networks = networks
        self._running: set[asyncio.Task[Purchase[PaidAnswer]]] = set()

    def apply_settings(self, settings: McpSettings) -> None:
        self.settings = settings

    def __call__(self, inner: Exchanger) -> Exchanger:
        async def exchange(request: Exchange) -> Outcome:
            if not self._may_be_tool_call(request):
                return await inner(request)
            outcome = await inner(request)
            response = outcome.response
            framing = framing_of(response.headers.get("Content-Type"))
            if response.status != 200 or framing is None:
                return outcome
            prefix = b""
            if framing is Framing.JSON:
                # One message: read it whole (bounded) and decide before the head goes out.
                whole = response.read_complete() if isinstance(response, PooledResponse) else None
                if whole is not None and b"isError" not in whole and b'"error"' not in whole:
                    outcome.body = whole  # the usual free result, here with the head: nothing parsed
                    return outcome
                if whole is None:
                    whole, prefix = await _read_json(outcome)
                if whole is not None:
                    outcome.body = whole
                    return await self._whole(request, outcome, inner)
            call = self._tool_call(request)
            if call is None:
                if prefix:  # what was read to decide goes to the client before the rest
                    outcome.response = ScannedAnswer(response, _prefixed(prefix, response))
                return outcome
            relayed = Outcome(outcome.response)
            relayed.response = ScannedAnswer(
                response, self._relay(request, call, framing, outcome, relayed, inner, prefix)
            )
            return relayed

        return exchange

    async def _whole(self, request: Exchange, outcome: Outcome, inner: Exchanger) -> Outcome:
        """A JSON answer read whole (`outcome.body`), decided before its head goes out: relayed whole (its
        own Content-Length) when it is no payment-required result, else the purchase's answer in its place."""
        body = outcome.body
        assert body is not None
        if b"isError" not in body and b'"error"' not in body:
            return outcome  # neither form of a payment-required answer can be in it: nothing parsed
        call = self._tool_call(request)
        if call is None:
            return outcome
        scanner = AnswerScanner(call.id, Framing.JSON)
        pieces = [*scanner.feed(body), *scanner.finish()]
        answer = next((p for p in pieces if isinstance(p, Answer)), None)
        if answer is None:
            return outcome
        try:
            if extract_payment_required(answer.message) is None:
                return outcome
        except McpPayError:
            pass  # malformed or too large: the purchase flow refuses it readably
        out = [chunk async for chunk in self._piece(answer, request, call, Framing.JSON, outcome, inner)]
        outcome.body = b"".join(out)
        return outcome

    def _may_be_tool_call(self, request: Exchange) -> bool:
        """Cheap, on the request alone: a POST of JSON naming tools (the body is parsed only when the
        answer could be a payment-required result)."""
        body = request.body
        if not self.settings.pay_tools or request.method != "POST" or body is None or b"tools" not in body:
            return False
        return framing_of(request.headers.get("Content-Type")) is Framing.JSON

    def _tool_call(self, request: Exchange) -> ToolCall | None:
        assert request.body is not None
        call = parse_tool_call(request.body)
        return None if call is None or call.carries_payment else call

    async def _relay(
        self,
        request: Exchange,
        call: ToolCall,
        framing: Framing,
        first: Outcome,
        relayed: Outcome,
        inner: Exchanger,
        prefix: bytes = b"",
    ) -> AsyncIterator[bytes]:
        scanner = AnswerScanner(call.id, framing)
        try:
            async for chunk in _prefixed(prefix, first.response):
                for piece in scanner.feed(chunk):
                    async for out in self._piece(piece, request, call, framing, relayed, inner):
                        yield out
            for piece in scanner.finish():
                async for out in self._piece(piece, request, call, framing, relayed, inner):
                    yield out
        finally:
            first.response.release()

    async def _piece(
        self,
        piece: Forward | Answer,
        request: Exchange,
        call: ToolCall,
        framing: Framing,
        relayed: Outcome,
        inner: Exchanger,
    ) -> AsyncIterator[bytes]:
        if isinstance(piece, Forward):
            yield piece.raw
            return
        try:
            found: PaymentRequiredResult | McpPayError | None = extract_payment_required(piece.message)
        except McpPayError as exc:
            found = exc
        if found is None:
            yield piece.raw  # a result, an ordinary tool error: as it came
            return
        endpoint = str(request.url)
        carrier = McpCarrier(request, call, found, inner, self.networks, self.settings, framing)
        rule_cap = self.settings.cap_for(endpoint, call.name)
        info = PaymentRequestInfo(
            method="POST",
            url=endpoint,
            host=request.url.host or "",
            headers=request.client_headers,
            max_amount=rule_cap,
            need=tool_need(endpoint, call),
            resource=call.resource,
        )
        task = asyncio.get_running_loop().create_task(self.flow.buy(Order(info), carrier))
        # The payment goes on (and is recorded) even if the client leaves meanwhile.
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        async for out in carrier.relay_until(task):
            yield out
        try:
            purchase = task.result()
        except StoreError as exc:
            log.error("not paying tool %s at %s: %s", call.name, request.url.host, exc)
            relayed.refuse("ledger_unavailable")
            yield encode_answer(
                refused_answer(piece.message, reason="ledger_unavailable"), framing, event=piece.event
            )
            return
        except UpstreamError as exc:
            # The paid call failed in transit after the payment left: the flow recorded it in doubt.
            relayed.refuse("payment_in_doubt", exc.payment_id)
            message = with_proxy_meta(
                refused_answer(piece.message, reason="payment_in_doubt"),
                PROXY_PAYMENT_META,
                str(exc.payment_id),
            )
            yield encode_answer(message, framing, event=piece.event)
            return
        async for out in self._rendered(purchase, piece, framing, relayed):
            yield out

    async def _rendered(
        self, purchase: Purchase[PaidAnswer], piece: Answer, framing: Framing, relayed: Outcome
    ) -> AsyncIterator[bytes]:
        refused = purchase.refusal
        if refused is not None:
            reason = refused.reason_code.value
            relayed.refuse(reason, refused.ledger_id, refused.retry_after)
            message = refused_answer(piece.message, reason=reason)
            if refused.ledger_id is not None:
                message = with_proxy_meta(message, PROXY_PAYMENT_META, str(refused.ledger_id))
            yield encode_answer(message, framing, event=piece.event)
            return
        paid, plan = purchase.answer, purchase.plan
        if paid is None or plan is None:
            yield piece.raw  # passed through (e.g. nothing this proxy may pay)
            return
        relayed.payment_id = plan.ledger_id
        message = paid_answer(paid.message, payment_id=plan.ledger_id)
        record = purchase.record
        code: str | None = "ledger_unavailable" if purchase.unrecorded or record is None else None
        if record is not None and not record.delivered:
            code = _OUTCOME_ERRORS.get(record.state, code)
        if code is not None:
            relayed.refuse(code)
            message = with_proxy_meta(message, PROXY_ERROR_META, code)
        yield encode_answer(message, paid.framing, event=paid.event)
        async for out in paid.rest():
            yield out


@dataclass
class PaidAnswer:
    """The response to the paid call, and the rest of its stream (relayed after it)."""

    message: dict[str, Any]
    event: Any
    framing: Framing
    scanner: AnswerScanner
    chunks: AsyncIterator[bytes] | None
    outcome: Outcome
    after: list[bytes] = field(default_factory=list)

    async def rest(self) -> AsyncIterator[bytes]:
        try:
            for raw in self.after:
                yield raw
            if self.chunks is not None:
                async for chunk in self.chunks:
                    for piece in self.scanner.feed(chunk):
                        yield piece.raw
            for piece in self.scanner.finish():
                yield piece.raw
        finally:
            self.outcome.response.release()


class McpCarrier:
    """One `tools/call` whose result asks for payment (see `purchase/order.py`)."""

    def __init__(
        self,
        request: Exchange,
        call: ToolCall,
        found: PaymentRequiredResult | McpPayError,
        inner: Exchanger,
        networks: NetworkRegistry,
        settings: McpSettings,
        framing: Framing,
    ) -> None:
        self.request = request
        self.call = call
        self.found = found
        self._inner = inner
        self._networks = networks
        self._settings = settings
        self._framing = framing
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def challenge(self) -> ChallengeRead:
        found = self.found
        if isinstance(found, McpPayError):
            return Refused(ReasonCode.MALFORMED_CHALLENGE, str(found))
        rule = self._settings.rule_for(str(self.request.url), self.call.name)
        if rule is not None and not rule.allowed:
            return Refused(
                ReasonCode.TOOL_NOT_ALLOWED,
                f"tool {self.call.name!r} at {self.request.url} is not paid ([mcp.tools])",
            )
        try:
            return challenge_from_document(found.payment_required, self._networks)
        except MalformedChallenge as exc:
            return Refused(ReasonCode.MALFORMED_CHALLENGE, exc.detail)

    def evidence(self) -> tuple[Mapping[str, str], bytes]:
        found = self.found
        if isinstance(found, McpPayError):
            return {}, b""
        return {}, json.dumps(found.payment_required).encode()

    async def with_session(self, session: Session) -> bool:  # pragma: no cover - MCP orders name no scope
        return False

    async def relay_until(self, task: asyncio.Task[Any]) -> AsyncIterator[bytes]:
        """Events of the paid answer that come before its result, as they arrive, until `task` is done."""
        queue = self._queue
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()

    async def present(self, plan: PaymentPlan) -> Presented[PaidAnswer]:
        payload = json.loads(base64.b64decode(plan.header_value))
        body = paid_request_body(self.call, payload)
        paid_request = replace(
            self.request, headers=self.request.headers.copy(), body=body, appended=self.request.appended
        )
        try:
            outcome = await self._inner(paid_request)
        except UpstreamError as exc:
            exc.payment_id = plan.ledger_id
            raise
        response = outcome.response
        framing = framing_of(response.headers.get("Content-Type"))
        if response.status != 200 or framing is None:
            # Not an MCP answer at all: the HTTP status is the verdict's input (no receipt, no result).
            body_text = await _read_small(outcome)
            verdict = verdict_for(
                response.status, None, None, lambda: f"HTTP {response.status}: {body_text[:200]!r}"
            )
            message = {
                "jsonrpc": "2.0",
                "id": self.call.id,
                "error": {"code": -32603, "message": f"paid call answered HTTP {response.status}"},
            }
            scanner = AnswerScanner(self.call.id, self._framing)
            return Presented(PaidAnswer(message, None, self._framing, scanner, None, outcome), verdict)
        scanner = AnswerScanner(self.call.id, framing)
        chunks = response.content.iter_chunked(STREAM_CHUNK).__aiter__()
        answer: Answer | None = None
        after: list[bytes] = []  # what followed the result in the same chunk: relayed after it
        try:
            async for chunk in chunks:
                for piece in scanner.feed(chunk):
                    if isinstance(piece, Answer) and answer is None:
                        answer = piece
                    elif answer is None:
                        self._queue.put_nowait(piece.raw)  # progress, logs: to the client now
                    else:
                        after.append(piece.raw)
                if answer is not None:
                    break
            else:
                for piece in scanner.finish():
                    if isinstance(piece, Answer) and answer is None:
                        answer = piece
                    elif answer is None:
                        self._queue.put_nowait(piece.raw)
                    else:
                        after.append(piece.raw)
        except Exception as exc:  # cut or silent mid-answer: the payment left, so it is in doubt
            response.release()
            failure = UpstreamError(502, "upstream_error", f"the paid tool call failed: {type(exc).__name__}")
            failure.payment_id = plan.ledger_id
            raise failure from exc
        if answer is None:
            response.release()
            failure = UpstreamError(
                502, "upstream_disconnected", "the paid tool call ended without its result"
            )
            failure.payment_id = plan.ledger_id
            raise failure
        verdict = _verdict(answer.message)
        if framing is not self._framing:
            # The client reads the framing of the first answer (its head is out, or decided): the paid
            # result goes in that framing, without the rest of a differently framed stream.
            quiet = AnswerScanner(self.call.id, self._framing)  # nothing of the other stream follows
            paid = PaidAnswer(answer.message, None, self._framing, quiet, None, outcome)
            return Presented(paid, verdict, success=verdict.delivered)
        paid = PaidAnswer(answer.message, answer.event, framing, scanner, chunks, outcome, after)
        return Presented(paid, verdict, success=verdict.delivered)


def _verdict(message: dict[str, Any]) -> Verdict:
    """What the paid call's response says became of the payment (payer.verdict_for, MCP's statuses)."""
    document = payment_response_of(message)
    receipt = receipt_of(document) if document is not None else None
    try:
        again = extract_payment_required(message)
    except McpPayError:
        again = None
    result = message.get("result")
    if again is not None:
        status = 402
    elif isinstance(result, dict) and result.get("isError") is not True:
        status = 200
    else:
        status = 500  # a tool error or a JSON-RPC error: nothing delivered
    evidence = None
    if receipt is not None and isinstance(receipt.raw.get("extensions"), dict) and receipt.raw["extensions"]:
        evidence = json.dumps({"receipt_extensions": receipt.raw["extensions"]}, sort_keys=True)[: 16 * 1024]

    def reason() -> str:
        error = again.payment_required.get("error") if again is not None else None
        return str(error)[:500] if error else "payment rejected (payment required again)"

    return verdict_for(status, receipt, evidence, reason)


async def _read_small(outcome: Outcome, limit: int = 4096) -> bytes:
    data = b""
    try:
        async for chunk in outcome.response.content.iter_chunked(STREAM_CHUNK):
            data += chunk
            if len(data) >= limit:
                break
    finally:
        outcome.response.release()
    return data[:limit]


async def _read_json(outcome: Outcome) -> tuple[bytes | None, bytes]:
    """(the whole body, b"") when it ends within MAX_MESSAGE_BYTES, else (None, what was read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in outcome.response.content.iter_chunked(STREAM_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MESSAGE_BYTES:
            return None, b"".join(chunks)
    return b"".join(chunks), b""


async def _prefixed(prefix: bytes, response: UpstreamResponse) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    async for chunk in response.content.iter_chunked(STREAM_CHUNK):
        yield chunk


class _Content:
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        return self._chunks


class ScannedAnswer:
    """The upstream answer as the client gets it: same status and headers, the body through `_relay`
    (its length may change, so none is declared: chunked to HTTP/1.1 clients)."""

    def __init__(self, upstream: UpstreamResponse, chunks: AsyncIterator[bytes]) -> None:
        self._upstream = upstream
        self._chunks = chunks
        self.content = _Content(chunks)

    @property
    def status(self) -> int:
        return self._upstream.status

    @property
    def reason(self) -> str | None:
        return self._upstream.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._upstream.headers

    @property
    def content_length(self) -> int | None:
        return None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._chunks])

    def release(self) -> object:
        return self._upstream.release()
