"""x402 over MCP, the message side: read a Streamable HTTP `tools/call`, find its answer, rewrite both.

Pure: bytes and dicts in, bytes and dicts out; no sockets, no asyncio, nothing from the payment code.
The purchase flow decides whether to pay; this module only says what was asked, what was answered, and
how the re-sent request and the client's answer are written. `docs/mcp.md` shows the intended use.

The wire (MCP Streamable HTTP, spec 2025-03-26 and later; x402 spec `transports-v2/mcp.md`):

* The client POSTs one JSON-RPC message (`Content-Type: application/json`). A `tools/call` request is
  `{"jsonrpc": "2.0", "id": ID, "method": "tools/call", "params": {"name", "arguments", "_meta"?}}`.
  Batches (a JSON array, 2025-03-26 only) are never inspected.
* The server answers `application/json` (the response object) or `text/event-stream`, whose events carry
  JSON-RPC messages: notifications (progress, logs) and server requests first, then the response with
  the request's id. Only that response is ours to look at; every other event is forwarded as it came.
* A paid tool answers a result with `isError: true` whose `structuredContent` (or `content[0].text`, as
  JSON) is a PaymentRequired; some servers send a JSON-RPC error (code 402 or -32042) with the
  PaymentRequired in `error.data`. The payment goes in the same request again, in
  `params._meta["x402/payment"]` as a JSON object (not base64); the receipt comes back in
  `result._meta["x402/payment-response"]`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from proxy.mcp_pay.sse import DEFAULT_MAX_EVENT_BYTES, SseEvent, SseParser, SseRaw

PAYMENT_META = "x402/payment"
PAYMENT_RESPONSE_META = "x402/payment-response"
PROXY_PAYMENT_META = "x402-proxy/payment"  # our ledger id, on a result we paid for
PROXY_ERROR_META = "x402-proxy/error"  # our reason code, on a payment-required result we did not pay
JSONRPC_PAYMENT_REQUIRED_CODES = frozenset({402, -32042})
TOOLS_CALL = "tools/call"

# A PaymentRequired is a few hundred bytes to a few KiB (one per accepted option, extensions such as
# SIWX). Anything bigger is refused rather than parsed and handed to the policy.
MAX_PAYMENT_REQUIRED_BYTES = 64 * 1024
# The answer message to a tools/call is held whole only up to this size; past it, it streams through
# uninspected (a big tool result is common and must not be slowed or refused).
MAX_MESSAGE_BYTES = DEFAULT_MAX_EVENT_BYTES


class Reason(StrEnum):
    """Reason codes for answers the codec cannot use (`_meta["x402-proxy/error"]`, refusals on record)."""

    MALFORMED_CHALLENGE = "malformed_challenge"  # same code as payments.policy.ReasonCode
    CHALLENGE_TOO_LARGE = "challenge_too_large"
    MESSAGE_TOO_LARGE = "mcp_message_too_large"


class McpPayError(ValueError):
    """An answer that claims to be a payment-required result but cannot be used; `reason` names why."""

    reason: Reason = Reason.MALFORMED_CHALLENGE

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class MalformedPaymentRequired(McpPayError):
    reason = Reason.MALFORMED_CHALLENGE


class PaymentRequiredTooLarge(McpPayError):
    reason = Reason.CHALLENGE_TOO_LARGE


class Framing(StrEnum):
    JSON = "json"
    SSE = "sse"


def framing_of(content_type: str | None) -> Framing | None:
    """How a POST answer carries its messages, from its Content-Type; None: not an MCP message answer."""
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return Framing.JSON
    if media == "text/event-stream":
        return Framing.SSE
    return None


def may_be_tool_call(method: str, content_type: str | None) -> bool:
    """Cheap pre-check on the request head, before any body byte is read: a POST of JSON."""
    return method.upper() == "POST" and framing_of(content_type) is Framing.JSON


# -- the request -------------------------------------------------------------------------------


RequestId = str | int


@dataclass(frozen=True)
class ToolCall:
    """A single JSON-RPC `tools/call` request, as the client sent it."""

    id: RequestId
    name: str
    arguments: dict[str, Any]
    meta: dict[str, Any]  # params._meta ({} when absent)
    message: dict[str, Any] = field(repr=False)  # the whole message, for `paid_request_body`

    @property
    def carries_payment(self) -> bool:
        """The client pays this call itself (its own x402 MCP client): the proxy must not pay it."""
        return PAYMENT_META in self.meta

    @property
    def resource(self) -> str:
        """The x402 resource name of the tool, as the SDK's wrapper names it (`mcp://tool/NAME`)."""
        return f"mcp://tool/{self.name}"


def _is_request_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_tool_call(body: bytes | str) -> ToolCall | None:
    """The `tools/call` request in a POST body, or None for anything else (pass it through untouched):
    not JSON, a batch, a notification, another method, or a message that is not well formed."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None
    if message.get("method") != TOOLS_CALL or not _is_request_id(message.get("id")):
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("name"), str):
        return None
    arguments = params.get("arguments", {})
    meta = params.get("_meta", {})
    if arguments is None:
        arguments = {}
    if meta is None:
        meta = {}
    if not isinstance(arguments, dict) or not isinstance(meta, dict):
        return None
    return ToolCall(id=message["id"], name=params["name"], arguments=arguments, meta=meta, message=message)


def paid_request_body(call: ToolCall, payment_payload: dict[str, Any]) -> bytes:
    """The same request again (same id, method, params) with `params._meta["x402/payment"]` added.

    `payment_payload` is the PaymentPayload as a JSON object (x402Version, accepted, payload, resource,
    extensions), not base64. Other `_meta` entries of the client (progressToken, ...) are kept."""
    message = copy.deepcopy(call.message)
    params = message["params"]
    meta = params.get("_meta")
    params["_meta"] = {**(meta if isinstance(meta, dict) else {}), PAYMENT_META: payment_payload}
    return _dumps(message)


# -- the answer --------------------------------------------------------------------------------


def response_to(message: Any, request_id: RequestId) -> bool:
    """Is this JSON-RPC message the response (result or error) to the request with this id?"""
    if not isinstance(message, dict) or "method" in message:
        return False
    rid = message.get("id")
    if not _is_request_id(rid) or type(rid) is not type(request_id) or rid != request_id:
        return False
    return "result" in message or "error" in message


@dataclass(frozen=True)
class Forward:
    """Bytes of the answer body to hand the client as they are."""

    raw: bytes


@dataclass(frozen=True)
class Answer:
    """The response to our request: held back until the caller decides what the client gets.

    `raw` is what the server sent for it (forward it when nothing changes); `event` is its SSE event
    (None for a JSON answer), whose `event:`/`id:` fields `encode_answer` keeps."""

    message: dict[str, Any]
    raw: bytes
    event: SseEvent | None = None


Piece = Forward | Answer


class AnswerScanner:
    """Reads a POST answer incrementally and separates the response to `request_id` from the rest.

    `feed` returns pieces in stream order: `Forward` (send now) and at most one `Answer`. For SSE each
    event comes out as soon as its blank line arrived; for JSON the body is held until `finish` (it is
    one message). Past `max_message_bytes` the message streams through as `Forward` pieces and
    `overflowed` is set: the answer was not inspected (`Reason.MESSAGE_TOO_LARGE`)."""

    def __init__(
        self, request_id: RequestId, framing: Framing, *, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self.request_id = request_id
        self.framing = framing
        self.max_message_bytes = max_message_bytes
        self.answer_found = False
        self.overflowed = False
        self._sse = SseParser(max_message_bytes) if framing is Framing.SSE else None
        self._json = bytearray()
        self._json_passthrough = False

    def feed(self, chunk: bytes) -> list[Piece]:
        if self._sse is not None:
            return self._from_sse(self._sse.feed(chunk))
        if self._json_passthrough:
            return [Forward(chunk)] if chunk else []
        self._json += chunk
        if len(self._json) > self.max_message_bytes:
            self._json_passthrough = True
            self.overflowed = True
            held, self._json = bytes(self._json), bytearray()
            return [Forward(held)]
        return []

    def finish(self) -> list[Piece]:
        """The body ended: the rest (a JSON answer, an SSE event cut short)."""
        if self._sse is not None:
            return self._from_sse(self._sse.close())
        if self._json_passthrough or not self._json:
            return []
        body, self._json = bytes(self._json), bytearray()
        message = _loads(body)
        if not self.answer_found and response_to(message, self.request_id):
            self.answer_found = True
            assert isinstance(message, dict)
            return [Answer(message, body)]
        return [Forward(body)]

    def _from_sse(self, pieces: list[SseEvent | SseRaw]) -> list[Piece]:
        out: list[Piece] = []
        for piece in pieces:
            if isinstance(piece, SseRaw):
                if piece.overflow and not self.answer_found:
                    self.overflowed = True
                out.append(Forward(piece.raw))
                continue
            if not self.answer_found and piece.data is not None and piece.event in (None, "", "message"):
                message = _loads(piece.data)
                if response_to(message, self.request_id):
                    assert isinstance(message, dict)
                    self.answer_found = True
                    out.append(Answer(message, piece.raw, piece))
                    continue
            out.append(Forward(piece.raw))
        return out


# -- the payment-required result ------------------------------------------------------------------


class PaymentRequiredForm(StrEnum):
    STRUCTURED = "structuredContent"  # result.isError, result.structuredContent
    TEXT = "text"  # result.isError, JSON in result.content[0].text
    JSONRPC_ERROR = "error.data"  # error.code 402 / -32042, error.data


@dataclass(frozen=True)
class PaymentRequiredResult:
    """A PaymentRequired found in a tools/call answer. `payment_required` is the document as the server
    wrote it (x402Version, accepts, resource, error, extensions): hand it to the challenge parser."""

    payment_required: dict[str, Any]
    form: PaymentRequiredForm
    size: int  # bytes of its JSON text


def _looks_like_payment_required(value: Any) -> bool:
    return isinstance(value, dict) and ("x402Version" in value or "accepts" in value)


def extract_payment_required(
    message: dict[str, Any], *, max_bytes: int = MAX_PAYMENT_REQUIRED_BYTES
) -> PaymentRequiredResult | None:
    """The PaymentRequired in a tools/call response, None when it is no payment-required answer (a
    successful result, an ordinary tool error, another JSON-RPC error).

    Raises `PaymentRequiredTooLarge` past `max_bytes` and `MalformedPaymentRequired` when the answer
    claims to be one (isError with x402Version/accepts, or a 402 error) but is not usable."""
    error = message.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        # An int only: a list or object would not even hash (a hostile server must not crash the scan).
        if not isinstance(code, int) or isinstance(code, bool) or code not in JSONRPC_PAYMENT_REQUIRED_CODES:
            return None
        return _checked(error.get("data"), PaymentRequiredForm.JSONRPC_ERROR, max_bytes)
    result = message.get("result")
    if not isinstance(result, dict) or result.get("isError") is not True:
        return None
    structured = result.get("structuredContent")
    if _looks_like_payment_required(structured):
        return _checked(structured, PaymentRequiredForm.STRUCTURED, max_bytes)
    content = result.get("content")
    first = content[0] if isinstance(content, list) and content else None
    if isinstance(first, dict) and first.get("type") == "text" and isinstance(first.get("text"), str):
        document = _loads(first["text"])
        if _looks_like_payment_required(document):
            return _checked(document, PaymentRequiredForm.TEXT, max_bytes)
    return None


def _checked(document: Any, form: PaymentRequiredForm, max_bytes: int) -> PaymentRequiredResult:
    if not isinstance(document, dict):
        raise MalformedPaymentRequired(f"payment-required {form.value} is not a JSON object")
    size = len(_dumps(document))
    if size > max_bytes:
        raise PaymentRequiredTooLarge(f"payment-required {form.value} of {size} bytes (limit {max_bytes})")
    version = document.get("x402Version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MalformedPaymentRequired(f"payment-required {form.value}: x402Version {version!r}")
    accepts = document.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise MalformedPaymentRequired(f"payment-required {form.value}: accepts is not a non-empty list")
    for i, option in enumerate(accepts):
        if not isinstance(option, dict):
            raise MalformedPaymentRequired(f"payment-required {form.value}: accepts[{i}] is not an object")
        for key in ("scheme", "network"):
            if not isinstance(option.get(key), str):
                raise MalformedPaymentRequired(f"payment-required {form.value}: accepts[{i}].{key} missing")
    return PaymentRequiredResult(document, form, size)


def payment_response_of(message: dict[str, Any]) -> dict[str, Any] | None:
    """The server's SettleResponse for a paid call: `result._meta["x402/payment-response"]`, or, on a
    settlement failure answered as a payment-required result, the same key inside the PaymentRequired
    (where the reference SDK puts it). None when the answer carries none."""
    result = message.get("result")
    if isinstance(result, dict):
        meta = result.get("_meta")
        if isinstance(meta, dict) and isinstance(meta.get(PAYMENT_RESPONSE_META), dict):
            found: dict[str, Any] = meta[PAYMENT_RESPONSE_META]
            return found
        structured = result.get("structuredContent")
        if isinstance(structured, dict) and isinstance(structured.get(PAYMENT_RESPONSE_META), dict):
            inner: dict[str, Any] = structured[PAYMENT_RESPONSE_META]
            return inner
        content = result.get("content")
        first = content[0] if isinstance(content, list) and content else None
        text = first.get("text") if isinstance(first, dict) else None
        if isinstance(text, str) and PAYMENT_RESPONSE_META in text:
            document = _loads(text)
            if isinstance(document, dict) and isinstance(document.get(PAYMENT_RESPONSE_META), dict):
                text_found: dict[str, Any] = document[PAYMENT_RESPONSE_META]
                return text_found
    error = message.get("error")
    if isinstance(error, dict) and isinstance(error.get("data"), dict):
        data = error["data"]
        if isinstance(data.get(PAYMENT_RESPONSE_META), dict):
            err_found: dict[str, Any] = data[PAYMENT_RESPONSE_META]
            return err_found
    return None


# -- what the client gets ------------------------------------------------------------------------


def with_proxy_meta(message: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the response with `_meta[key] = value` added where an MCP client reads it:
    `result._meta` for a result; for the JSON-RPC error form (which has no result) `error.data._meta`
    when `error.data` is an object, else `error.data` becomes {"_meta": ...} only if it was absent.
    Everything the server wrote (its `_meta["x402/payment-response"]` included) is kept."""
    out = copy.deepcopy(message)
    result = out.get("result")
    if isinstance(result, dict):
        meta = result.get("_meta")
        result["_meta"] = {**(meta if isinstance(meta, dict) else {}), key: value}
        return out
    error = out.get("error")
    if isinstance(error, dict):
        data = error.get("data")
        if isinstance(data, dict):
            meta = data.get("_meta")
            data["_meta"] = {**(meta if isinstance(meta, dict) else {}), key: value}
        elif "data" not in error:
            error["data"] = {"_meta": {key: value}}
        return out
    raise ValueError("not a JSON-RPC response: neither result nor error")


def paid_answer(message: dict[str, Any], *, payment_id: str | int) -> dict[str, Any]:
    """The server's answer to the paid request, for the client: `_meta["x402-proxy/payment"]` = our
    ledger id added, the server's `_meta["x402/payment-response"]` kept as it is."""
    return with_proxy_meta(message, PROXY_PAYMENT_META, str(payment_id))


def refused_answer(message: dict[str, Any], *, reason: str) -> dict[str, Any]:
    """The server's payment-required answer, unchanged but for `_meta["x402-proxy/error"]` = reason."""
    return with_proxy_meta(message, PROXY_ERROR_META, str(reason))


def encode_answer(message: dict[str, Any], framing: Framing, *, event: SseEvent | None = None) -> bytes:
    """The message framed the way the server framed its answer: a JSON body (recompute Content-Length),
    or one SSE event keeping the original event's `event:` and `id:` fields (a client may resume by id)."""
    data = _dumps(message)
    if framing is Framing.JSON:
        return data
    head = b""
    if event is not None and event.id is not None:
        head += b"id: " + _field_value(event.id) + b"\n"
    name = event.event if event is not None and event.event else "message"
    head += b"event: " + _field_value(name) + b"\n"
    return head + b"data: " + data + b"\n\n"


def _field_value(value: str) -> bytes:
    return value.replace("\r", "").replace("\n", "").encode("utf-8")


def _dumps(value: Any) -> bytes:
    """Compact JSON, non-ASCII as UTF-8 (escaped when a lone surrogate cannot be UTF-8). Never holds a
    raw line break, so it is always one SSE data line."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
