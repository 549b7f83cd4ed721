"""proxy.mcp_pay: the pure codec for x402 over MCP (Streamable HTTP tools/call, SSE, payment-required)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.mcp_pay import (
    PAYMENT_META,
    PAYMENT_RESPONSE_META,
    PROXY_ERROR_META,
    PROXY_PAYMENT_META,
    Answer,
    AnswerScanner,
    Forward,
    Framing,
    MalformedPaymentRequired,
    PaymentRequiredForm,
    PaymentRequiredTooLarge,
    Reason,
    SseEvent,
    SseParser,
    SseRaw,
    encode_answer,
    extract_payment_required,
    framing_of,
    may_be_tool_call,
    paid_answer,
    paid_request_body,
    parse_tool_call,
    payment_response_of,
    refused_answer,
    response_to,
)
from tests.fuzz_profiles import PURE

REQUIREMENT = {
    "scheme": "exact",
    "network": "eip155:84532",
    "asset": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
    "amount": "1000",
    "payTo": "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "maxTimeoutSeconds": 60,
    "extra": {"name": "USDC", "version": "2"},
}
PAYMENT_REQUIRED = {
    "x402Version": 2,
    "accepts": [REQUIREMENT],
    "error": "Payment required",
    "resource": {"url": "mcp://tool/weather", "description": "Weather", "mimeType": "application/json"},
}
RECEIPT = {"success": True, "transaction": "0x" + "ab" * 32, "network": "eip155:84532", "payer": "0x3C44"}


def call_body(rid: Any = 7, **params: Any) -> bytes:
    params = {"name": "weather", "arguments": {"city": "Oslo"}, **params}
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}).encode()


def pr_result(rid: Any = 7, pr: dict[str, Any] | None = None) -> dict[str, Any]:
    pr = PAYMENT_REQUIRED if pr is None else pr
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "result": {
            "isError": True,
            "structuredContent": pr,
            "content": [{"type": "text", "text": json.dumps(pr)}],
        },
    }


def sse(message: dict[str, Any], *, eid: str | None = None, end: str = "\n") -> bytes:
    head = f"id: {eid}{end}" if eid is not None else ""
    return f"{head}event: message{end}data: {json.dumps(message)}{end}{end}".encode()


def notification(i: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": i},
    }


# -- the request ------------------------------------------------------------------------------------


def test_a_tools_call_is_recognised_with_its_parts() -> None:
    call = parse_tool_call(call_body(_meta={"progressToken": "p1"}))
    assert call is not None
    assert (call.id, call.name, call.arguments, call.meta) == (
        7,
        "weather",
        {"city": "Oslo"},
        {"progressToken": "p1"},
    )
    assert not call.carries_payment and call.resource == "mcp://tool/weather"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[" + call_body() + b"]",  # a batch: passed through
        json.dumps(
            {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}}
        ).encode(),  # notification
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode(),
        json.dumps({"jsonrpc": "2.0", "id": True, "method": "tools/call", "params": {"name": "x"}}).encode(),
        json.dumps({"jsonrpc": "2.0", "id": None, "method": "tools/call", "params": {"name": "x"}}).encode(),
        json.dumps({"jsonrpc": "1.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}).encode(),
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 3}}).encode(),
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": []}).encode(),
        call_body(arguments=[1]),
        call_body(_meta="x"),
        b"\xff\xfe",
    ],
)
def test_anything_else_is_not_a_tool_call(body: bytes) -> None:
    assert parse_tool_call(body) is None


def test_null_arguments_and_meta_read_as_empty_and_string_ids_stay_strings() -> None:
    call = parse_tool_call(call_body("abc", arguments=None, _meta=None))
    assert call is not None and call.id == "abc" and call.arguments == {} and call.meta == {}


def test_a_call_that_already_carries_a_payment_is_marked() -> None:
    call = parse_tool_call(call_body(_meta={PAYMENT_META: {"x402Version": 2}}))
    assert call is not None and call.carries_payment


def test_the_resent_request_is_the_same_request_plus_the_payment_in_meta() -> None:
    body = call_body("r-1", _meta={"progressToken": 5})
    call = parse_tool_call(body)
    assert call is not None
    payload = {"x402Version": 2, "accepted": REQUIREMENT, "payload": {"signature": "0x01"}}
    again = json.loads(paid_request_body(call, payload))
    original = json.loads(body)
    assert again["id"] == "r-1" and again["method"] == "tools/call" and again["jsonrpc"] == "2.0"
    assert again["params"]["name"] == original["params"]["name"]
    assert again["params"]["arguments"] == original["params"]["arguments"]
    assert again["params"]["_meta"] == {"progressToken": 5, PAYMENT_META: payload}  # JSON, not base64
    assert call.message == original  # the parsed request is not changed


def test_head_precheck() -> None:
    assert may_be_tool_call("POST", "application/json; charset=utf-8")
    assert not may_be_tool_call("GET", "application/json")
    assert not may_be_tool_call("POST", "text/plain")
    assert framing_of("text/event-stream") is Framing.SSE and framing_of("Application/JSON") is Framing.JSON
    assert framing_of(None) is None and framing_of("text/html") is None


# -- SSE --------------------------------------------------------------------------------------------


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    parser = SseParser()
    assert parser.feed(b'event: message\ndata: {"a"') == []
    assert parser.feed(b": 1}\n") == []
    [event] = parser.feed(b"\nid: 2\n")
    assert isinstance(event, SseEvent)
    assert (event.event, event.data, event.id) == ("message", '{"a": 1}', None)
    assert event.raw == b'event: message\ndata: {"a": 1}\n\n'
    [second] = parser.feed(b"data: x\n\n")
    assert isinstance(second, SseEvent) and second.id == "2" and second.data == "x"


def test_field_rules() -> None:
    stream = (
        b"\xef\xbb\xbfdata:no-space\ndata:  two\n: a comment\nretry: 10\nid\nevent:e\n\n: only a comment\n\n"
    )
    events = SseParser().feed(stream)
    assert [(e.data, e.event, e.id) for e in events if isinstance(e, SseEvent)] == [
        ("no-space\n two", "e", ""),
        (None, None, None),
    ]


def test_a_cr_at_the_end_of_a_chunk_waits_for_its_lf() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # CRLF ends the line; the lone CR may be the start of a CRLF
    [event] = parser.feed(b"\n")
    assert isinstance(event, SseEvent) and event.data == "a" and event.raw == b"data: a\r\n\r\n"


def test_close_hands_out_an_unfinished_event_raw() -> None:
    parser = SseParser()
    parser.feed(b"data: a\n\ndata: cut")
    assert parser.close() == [SseRaw(b"data: cut")]


def test_close_treats_a_trailing_cr_as_a_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r\r") == []
    [event] = parser.close()
    assert isinstance(event, SseEvent) and event.data == "a"


def test_an_event_past_the_limit_streams_through_and_parsing_resumes() -> None:
    parser = SseParser(max_event_bytes=64)
    big = b"data: " + b"x" * 200
    pieces = parser.feed(big)
    pieces += parser.feed(b"y" * 100)
    pieces += parser.feed(b"\n\ndata: small\n\n")
    assert all(isinstance(p, SseRaw) and p.overflow for p in pieces[:-1])
    assert parser.buffered == 0
    assert isinstance(pieces[-1], SseEvent) and pieces[-1].data == "small"
    assert b"".join(p.raw for p in pieces) == big + b"y" * 100 + b"\n\ndata: small\n\n"
    assert sum(1 for p in pieces if isinstance(p, SseRaw) and p.end_of_event) == 1


LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
FIELD_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]), max_size=30
)
SSE_LINE = st.one_of(
    st.builds(lambda v: f"data: {v}", FIELD_TEXT),
    st.builds(lambda v: f"event: {v}", FIELD_TEXT),
    st.builds(lambda v: f"id: {v}", FIELD_TEXT.filter(lambda v: "\x00" not in v)),
    st.builds(lambda v: f": {v}", FIELD_TEXT),
    st.just("retry: 5"),
)
EVENTS = st.lists(st.tuples(st.lists(SSE_LINE, min_size=1, max_size=4), LINE_ENDS), max_size=6)


def stream_of(events: list[tuple[list[str], str]]) -> bytes:
    return b"".join(("".join(line + end for line in lines) + end).encode() for lines, end in events)


def feed_in_pieces(parser: SseParser, data: bytes, cuts: list[int]) -> list[SseEvent | SseRaw]:
    out: list[SseEvent | SseRaw] = []
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += parser.feed(data[last:cut])
        last = max(last, cut)
    out += parser.feed(data[last:])
    return out + parser.close()


@PURE
@given(EVENTS, st.lists(st.integers(min_value=0), max_size=12))
def test_however_the_bytes_are_cut_the_events_are_the_same_and_every_byte_comes_out_once(
    events: list[tuple[list[str], str]], cuts: list[int]
) -> None:
    data = stream_of(events)
    one = SseParser()
    whole = one.feed(data) + one.close()
    pieces = feed_in_pieces(SseParser(), data, cuts)
    assert b"".join(p.raw for p in pieces) == data
    assert [p for p in pieces if isinstance(p, SseEvent)] == [p for p in whole if isinstance(p, SseEvent)]
    assert len([p for p in pieces if isinstance(p, SseEvent)]) == len(events)


@PURE
@given(EVENTS, st.lists(st.integers(min_value=0), max_size=12), st.integers(min_value=1, max_value=40))
def test_with_a_small_limit_every_byte_still_comes_out_once_in_order(
    events: list[tuple[list[str], str]], cuts: list[int], limit: int
) -> None:
    data = stream_of(events)
    parser = SseParser(max_event_bytes=limit)
    pieces: list[SseEvent | SseRaw] = []
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        pieces += parser.feed(data[last:cut])
        last = max(last, cut)
        assert parser.buffered <= limit  # never more held back than the limit, whatever the chunks
    pieces += parser.close()
    assert b"".join(p.raw for p in pieces) == data
    assert parser.buffered == 0


# -- finding the answer ------------------------------------------------------------------------------


def test_sse_answer_is_found_and_everything_else_forwarded_in_order() -> None:
    stream = sse(notification(1), eid="1") + sse(notification(2), eid="2") + sse(pr_result(), eid="3")
    scanner = AnswerScanner(7, Framing.SSE)
    pieces = scanner.feed(stream[:10]) + scanner.feed(stream[10:]) + scanner.finish()
    forwards = [p for p in pieces if isinstance(p, Forward)]
    [answer] = [p for p in pieces if isinstance(p, Answer)]
    assert b"".join(p.raw for p in forwards) == sse(notification(1), eid="1") + sse(notification(2), eid="2")
    assert isinstance(pieces[-1], Answer)
    assert answer.message == pr_result() and answer.raw == sse(pr_result(), eid="3")
    assert answer.event is not None and answer.event.id == "3"
    assert scanner.answer_found and not scanner.overflowed


def test_a_notification_reaches_the_client_before_the_answer_exists() -> None:
    scanner = AnswerScanner(7, Framing.SSE)
    assert scanner.feed(sse(notification(1))) == [Forward(sse(notification(1)))]


def test_an_answer_to_another_id_or_id_type_is_not_ours() -> None:
    assert not response_to(pr_result("7"), 7)
    assert not response_to(pr_result(8), 7)
    assert not response_to({"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {}}, 7)
    assert not response_to({"jsonrpc": "2.0", "id": True, "result": {}}, 1)
    assert response_to({"jsonrpc": "2.0", "id": 7, "error": {"code": 1, "message": "x"}}, 7)
    scanner = AnswerScanner(7, Framing.SSE)
    pieces = scanner.feed(sse(pr_result("7")) + sse(pr_result(7)))
    assert [type(p) for p in pieces] == [Forward, Answer]


def test_a_server_request_in_the_stream_is_forwarded() -> None:
    request = {"jsonrpc": "2.0", "id": 7, "method": "elicitation/create", "params": {}}
    scanner = AnswerScanner(7, Framing.SSE)
    assert scanner.feed(sse(request)) == [Forward(sse(request))]


def test_json_answer_is_held_until_the_body_ends() -> None:
    body = json.dumps(pr_result()).encode()
    scanner = AnswerScanner(7, Framing.JSON)
    assert scanner.feed(body[:5]) == [] and scanner.feed(body[5:]) == []
    assert scanner.finish() == [Answer(pr_result(), body)]


def test_json_answer_to_someone_else_is_forwarded_at_the_end() -> None:
    body = json.dumps(pr_result(9)).encode()
    scanner = AnswerScanner(7, Framing.JSON)
    assert scanner.feed(body) == [] and scanner.finish() == [Forward(body)]


def test_a_huge_answer_streams_through_uninspected() -> None:
    huge = pr_result(pr={**PAYMENT_REQUIRED, "extensions": {"padding": "x" * 3000}})
    for framing, data in ((Framing.SSE, sse(huge)), (Framing.JSON, json.dumps(huge).encode())):
        scanner = AnswerScanner(7, framing, max_message_bytes=1000)
        pieces = [p for i in range(0, len(data), 256) for p in scanner.feed(data[i : i + 256])]
        pieces += scanner.finish()
        assert all(isinstance(p, Forward) for p in pieces), framing
        assert b"".join(p.raw for p in pieces) == data
        assert scanner.overflowed and not scanner.answer_found
        assert Reason.MESSAGE_TOO_LARGE.value == "mcp_message_too_large"


# -- the payment-required result ----------------------------------------------------------------------


def test_payment_required_in_structured_content() -> None:
    found = extract_payment_required(pr_result())
    assert found is not None and found.payment_required == PAYMENT_REQUIRED
    assert found.form is PaymentRequiredForm.STRUCTURED and found.size > 0


def test_payment_required_in_text_only() -> None:
    message = pr_result()
    del message["result"]["structuredContent"]
    found = extract_payment_required(message)
    assert found is not None and found.form is PaymentRequiredForm.TEXT
    assert found.payment_required == PAYMENT_REQUIRED


@pytest.mark.parametrize("code", [402, -32042])
def test_payment_required_as_a_jsonrpc_error(code: int) -> None:
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": code, "message": "Payment required", "data": PAYMENT_REQUIRED},
    }
    found = extract_payment_required(message)
    assert found is not None and found.form is PaymentRequiredForm.JSONRPC_ERROR
    assert found.payment_required == PAYMENT_REQUIRED


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "sunny"}]}},
        {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {"isError": True, "content": [{"type": "text", "text": "boom"}]},
        },
        {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {"isError": True, "content": [{"type": "text", "text": '{"a": 1}'}]},
        },
        {"jsonrpc": "2.0", "id": 7, "result": {"isError": True, "content": []}},
        {"jsonrpc": "2.0", "id": 7, "result": {"isError": "true", "structuredContent": PAYMENT_REQUIRED}},
        {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {"structuredContent": PAYMENT_REQUIRED},
        },  # not an error: a result
        {
            "jsonrpc": "2.0",
            "id": 7,
            "error": {"code": -32601, "message": "no such method", "data": PAYMENT_REQUIRED},
        },
        {"jsonrpc": "2.0", "id": 7, "error": {"code": True, "message": "x", "data": PAYMENT_REQUIRED}},
    ],
)
def test_other_answers_are_not_payment_required(message: dict[str, Any]) -> None:
    assert extract_payment_required(message) is None


@pytest.mark.parametrize(
    "document",
    [
        {"x402Version": 2, "accepts": {"scheme": "exact"}},  # what server_mcp_sse.py --mode malformed sends
        {"x402Version": 2, "accepts": []},
        {"x402Version": "2", "accepts": [REQUIREMENT]},
        {"x402Version": True, "accepts": [REQUIREMENT]},
        {"accepts": [REQUIREMENT]},
        {"x402Version": 2, "accepts": ["exact"]},
        {"x402Version": 2, "accepts": [{"scheme": "exact"}]},
    ],
)
def test_a_malformed_payment_required_is_a_named_error(document: dict[str, Any]) -> None:
    with pytest.raises(MalformedPaymentRequired) as raised:
        extract_payment_required(pr_result(pr=document))
    assert raised.value.reason is Reason.MALFORMED_CHALLENGE and raised.value.detail


def test_a_402_error_without_a_document_is_malformed() -> None:
    with pytest.raises(MalformedPaymentRequired):
        extract_payment_required(
            {"jsonrpc": "2.0", "id": 1, "error": {"code": 402, "message": "pay", "data": "x"}}
        )


def test_a_huge_payment_required_is_refused_with_its_reason() -> None:
    huge = {**PAYMENT_REQUIRED, "extensions": {"padding": "x" * 70_000}}
    for message in (
        pr_result(pr=huge),
        {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {"isError": True, "content": [{"type": "text", "text": json.dumps(huge)}]},
        },
        {"jsonrpc": "2.0", "id": 7, "error": {"code": 402, "message": "pay", "data": huge}},
    ):
        with pytest.raises(PaymentRequiredTooLarge) as raised:
            extract_payment_required(message)
        assert raised.value.reason is Reason.CHALLENGE_TOO_LARGE
    assert extract_payment_required(pr_result(pr=huge), max_bytes=100_000) is not None


@PURE
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
@example({"code": []})  # found by make test: an unhashable error code crashed the membership test
@example({"code": {"a": 1}})
def test_extract_never_raises_anything_but_its_named_errors(value: Any) -> None:
    for message in (
        {"jsonrpc": "2.0", "id": 1, "result": {"isError": True, "structuredContent": value}},
        {
            "jsonrpc": "2.0",
            "id": 1,
            "result": {"isError": True, "content": [{"type": "text", "text": json.dumps(value)}]},
        },
        {"jsonrpc": "2.0", "id": 1, "result": value},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": 402, "data": value}},
        {"jsonrpc": "2.0", "id": 1, "error": value},
    ):
        try:
            extract_payment_required(message)
        except (MalformedPaymentRequired, PaymentRequiredTooLarge):
            pass
        payment_response_of(message)


# -- what the client gets -----------------------------------------------------------------------------


def paid_result(rid: Any = 7) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "result": {
            "content": [{"type": "text", "text": "sunny"}],
            "_meta": {PAYMENT_RESPONSE_META: RECEIPT, "other": 1},
        },
    }


def test_the_paid_answer_keeps_the_receipt_and_adds_our_ledger_id() -> None:
    original = paid_result()
    out = paid_answer(original, payment_id=42)
    assert out["result"]["_meta"] == {PAYMENT_RESPONSE_META: RECEIPT, "other": 1, PROXY_PAYMENT_META: "42"}
    assert out["result"]["content"] == original["result"]["content"] and out["id"] == 7
    assert PROXY_PAYMENT_META not in original["result"]["_meta"]  # a copy
    assert payment_response_of(out) == RECEIPT


def test_a_refusal_is_the_unchanged_payment_required_plus_our_reason() -> None:
    out = refused_answer(pr_result(), reason="budget_exhausted")
    expected = pr_result()
    expected["result"]["_meta"] = {PROXY_ERROR_META: "budget_exhausted"}
    assert out == expected
    error = {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": 402, "message": "pay", "data": dict(PAYMENT_REQUIRED)},
    }
    out = refused_answer(error, reason="over_max_per_payment")
    assert out["error"]["data"]["_meta"] == {PROXY_ERROR_META: "over_max_per_payment"}
    assert {k: v for k, v in out["error"]["data"].items() if k != "_meta"} == PAYMENT_REQUIRED
    with pytest.raises(ValueError):
        refused_answer({"jsonrpc": "2.0", "method": "x"}, reason="r")


def test_the_settlement_failure_receipt_inside_a_payment_required_is_found() -> None:
    failure = {
        "success": False,
        "errorReason": "settlement_pending",
        "transaction": "",
        "network": "eip155:84532",
    }
    message = pr_result(pr={**PAYMENT_REQUIRED, PAYMENT_RESPONSE_META: failure})
    assert payment_response_of(message) == failure
    del message["result"]["structuredContent"]
    assert payment_response_of(message) == failure
    assert payment_response_of(pr_result()) is None


def test_encoded_answers_frame_like_the_server() -> None:
    message = paid_answer(paid_result(), payment_id=1)
    assert json.loads(encode_answer(message, Framing.JSON)) == message
    [event] = SseParser().feed(sse(paid_result(), eid="ev-9"))
    assert isinstance(event, SseEvent)
    data = encode_answer(message, Framing.SSE, event=event)
    assert data.startswith(b"id: ev-9\nevent: message\ndata: ") and data.endswith(b"\n\n")
    [again] = SseParser().feed(data)
    assert isinstance(again, SseEvent) and again.id == "ev-9" and json.loads(again.data or "") == message
    assert encode_answer(message, Framing.SSE).startswith(b"event: message\ndata: ")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=15,
)


@PURE
@given(JSON_VALUES, st.text(max_size=10) | st.integers(), st.text(max_size=12))
def test_any_result_survives_the_sse_round_trip(value: Any, rid: str | int, eid: str) -> None:
    message = {
        "jsonrpc": "2.0",
        "id": rid,
        "result": {"content": [{"type": "text", "text": "x"}], "x": value},
    }
    out = paid_answer(message, payment_id=3)
    source = SseEvent(raw=b"", data="", event="message", id=eid)
    data = encode_answer(out, Framing.SSE, event=source)
    scanner = AnswerScanner(rid, Framing.SSE)
    pieces = scanner.feed(data) + scanner.finish()
    assert len(pieces) == 1 and isinstance(pieces[0], Answer)
    assert pieces[0].message == json.loads(json.dumps(out))
    assert pieces[0].raw == data
