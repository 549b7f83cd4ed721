"""x402 over MCP on the local stack (issue 16): the servers and clients, the codec on their wire, and
(at the end) the proxy paying a tool call for a client that knows nothing of x402.

Proves the pieces the proxy's MCP payments will be built and tested on:
  * the paid MCP servers (tests/stack/server_mcp_x402.py: the reference SDK's `x402.mcp` on FastMCP, mcp 1.x,
    from its own venv; tests/stack/server_mcp_sse.py: wire-level, SSE answers, fault modes) and the clients
    (MCP Python SDK 2.x: clients/mcp_call.py; TypeScript MCP SDK: clients/mcp_call.mjs) work together;
  * a paid tool answers the payment-required result; paying it directly (x402Client + `_meta["x402/payment"]`)
    returns the paid result and moves exactly one price on chain;
  * proxy.mcp_pay's codec reads what these real servers put on the wire, and its re-sent request pays;
  * through a running x402-proxy (plain HTTP), free calls pass unchanged and a paid call is paid once
    (tests/test_mcp_payments.py has the refusals, faults, HTTPS and concurrency).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.mcp_pay import (
    PAYMENT_META,
    PAYMENT_RESPONSE_META,
    PROXY_ERROR_META,
    PROXY_PAYMENT_META,
    Answer,
    AnswerScanner,
    Forward,
    MalformedPaymentRequired,
    PaymentRequiredForm,
    PaymentRequiredTooLarge,
    extract_payment_required,
    framing_of,
    paid_answer,
    paid_request_body,
    parse_tool_call,
    payment_response_of,
)
from tests.stack import Stack
from tests.stack.fixtures import McpServer, mcp_server_factory, mcp_sse_server, mcp_x402_server
from tests.support.paying_proxy import ledger, start_paying_proxy
from tests.support.processes import without_proxy_env
from tests.support.proxy_process import ProxyProcess

__all__ = ["mcp_server_factory", "mcp_sse_server", "mcp_x402_server"]  # fixtures, imported to be found

pytestmark = pytest.mark.stack

CLIENTS = Path(__file__).parent / "stack" / "clients"
KINDS = ("x402", "sse")
FREE_TEXT = {"x402": "5", "sse": '{"echo": "hi"}'}


def server_of(request: pytest.FixtureRequest, kind: str) -> McpServer:
    server: McpServer = request.getfixturevalue(f"mcp_{kind}_server")
    return server


def run(argv: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:3]} failed:\n{done.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def py_client(url: str, tool: str, args: dict[str, Any], env: dict[str, str], *extra: str) -> dict[str, Any]:
    return run([sys.executable, str(CLIENTS / "mcp_call.py"), url, tool, json.dumps(args), *extra], env)


def ts_client(url: str, tool: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    return run(["node", str(CLIENTS / "mcp_call.mjs"), url, tool, json.dumps(args)], env)


CLIENT_RUNNERS: dict[str, Callable[[str, str, dict[str, Any], dict[str, str]], dict[str, Any]]] = {
    "python-sdk": py_client,
    "ts-sdk": ts_client,
}


def direct_env() -> dict[str, str]:
    return without_proxy_env()


def as_response(result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result}


class Money:
    """On-chain TestUSDC of payer and payee around one case."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.pay_to = stack.balance_of(stack.pay_to)
        self.payer = stack.balance_of(stack.payer_address)

    def moved(self) -> tuple[int, int]:
        """(payee gained, payer lost)."""
        stack = self.stack
        return stack.balance_of(stack.pay_to) - self.pay_to, self.payer - stack.balance_of(
            stack.payer_address
        )


def assert_asks_one_price(found_pr: dict[str, Any], stack: Stack, server: McpServer) -> None:
    [option] = found_pr["accepts"]
    assert option["scheme"] == "exact" and option["network"] == stack.network_v2
    assert option["asset"].lower() == stack.token.lower() and option["payTo"].lower() == stack.pay_to.lower()
    assert int(option["amount"]) == server.price


def sign(stack: Stack, payment_required: dict[str, Any]) -> dict[str, Any]:
    """The PaymentPayload JSON the reference SDK client makes for this PaymentRequired."""
    from x402 import x402Client
    from x402.mechanisms.evm.exact.register import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner
    from x402.schemas import PaymentRequired

    client = x402Client()
    client.set_spend_controls(False)  # the local TestUSDC is no known asset
    register_exact_evm_client(client, EthAccountSigner(stack.payer), networks=stack.network_v2)
    payload = asyncio.run(client.create_payment_payload(PaymentRequired.model_validate(payment_required)))
    data: dict[str, Any] = payload.model_dump(by_alias=True, exclude_none=True)
    return data


# -- the servers and clients, no proxy ---------------------------------------------------------------


@pytest.mark.parametrize("client", list(CLIENT_RUNNERS))
@pytest.mark.parametrize("kind", KINDS)
def test_free_tool(request: pytest.FixtureRequest, kind: str, client: str) -> None:
    server = server_of(request, kind)
    tool, args = server.free_tool
    out = CLIENT_RUNNERS[client](server.mcp_url, tool, args, direct_env())
    assert out["tools"] == sorted([tool, server.paid_tool[0]])
    result = out["result"]
    assert not result.get("isError") and result["content"][0]["text"] == FREE_TEXT[kind]
    if kind == "sse":  # three progress notifications came before the result, each delivered to the client
        assert [p["progress"] for p in out["progress"]] == [1, 2, 3]


@pytest.mark.parametrize("client", list(CLIENT_RUNNERS))
@pytest.mark.parametrize("kind", KINDS)
def test_paid_tool_without_payment_answers_payment_required(
    request: pytest.FixtureRequest, x402_stack: Stack, kind: str, client: str
) -> None:
    server = server_of(request, kind)
    money = Money(x402_stack)
    tool, args = server.paid_tool
    out = CLIENT_RUNNERS[client](server.mcp_url, tool, args, direct_env())
    result = out["result"]
    assert result["isError"] is True
    found = extract_payment_required(as_response(result))
    assert found is not None and found.form is PaymentRequiredForm.STRUCTURED
    assert found.payment_required["x402Version"] == 2
    assert found.payment_required["resource"]["url"] == f"mcp://tool/{tool}"
    assert_asks_one_price(found.payment_required, x402_stack, server)
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    assert money.moved() == (0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_paying_directly_returns_the_result_and_moves_one_price(
    request: pytest.FixtureRequest, x402_stack: Stack, kind: str
) -> None:
    server = server_of(request, kind)
    money = Money(x402_stack)
    settled_before = len(server.stats()["settlements"])
    tool, args = server.paid_tool
    out = py_client(server.mcp_url, tool, args, direct_env(), "--pay-key", x402_stack.payer_key)

    assert out["payment_required"]["isError"] is True
    assert out["payload"]["x402Version"] == 2 and out["payload"]["accepted"]["amount"] == str(server.price)
    result = out["result"]
    assert not result.get("isError"), result
    assert "Oslo" in result["content"][0]["text"]
    receipt = result["_meta"][PAYMENT_RESPONSE_META]
    assert receipt["success"] is True and receipt["transaction"].startswith("0x")
    assert receipt["payer"].lower() == x402_stack.payer_address.lower()
    assert money.moved() == (server.price, server.price)
    settlements = server.stats()["settlements"][settled_before:]
    assert len(settlements) == 1 and settlements[0]["transaction"] == receipt["transaction"]


# -- the codec on the real wire -----------------------------------------------------------------------


class RawMcp:
    """A Streamable HTTP session spoken by hand (httpx, no proxy), to feed real bytes to the codec."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(trust_env=False, timeout=30)
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.next_id = 1
        init = self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
        )
        self.headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = "2025-06-18"
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post(self, message: dict[str, Any]) -> httpx.Response:
        response = self.http.post(self.url, content=json.dumps(message), headers=self.headers)
        assert response.status_code in (200, 202), response.text
        return response

    def tool_call(self, name: str, args: dict[str, Any], **meta: Any) -> bytes:
        message: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": self.next_id,
            "method": "tools/call",
            "params": {
                "name": name,
                "arguments": args,
                "_meta": {"progressToken": f"p{self.next_id}", **meta},
            },
        }
        self.next_id += 1
        return json.dumps(message).encode()

    def scan(
        self, body: bytes, *, max_message_bytes: int | None = None, read_timeout: float = 30
    ) -> tuple[list[Forward | Answer], AnswerScanner]:
        """POST the body and stream the answer through an AnswerScanner, as the proxy will."""
        call = parse_tool_call(body)
        assert call is not None
        timeout = httpx.Timeout(30, read=read_timeout)
        with self.http.stream(
            "POST", self.url, content=body, headers=self.headers, timeout=timeout
        ) as response:
            assert response.status_code == 200
            framing = framing_of(response.headers.get("content-type"))
            assert framing is not None
            extra = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
            scanner = AnswerScanner(call.id, framing, **extra)
            pieces = [p for chunk in response.iter_raw() for p in scanner.feed(chunk)]
            return pieces + scanner.finish(), scanner

    def close(self) -> None:
        self.http.delete(self.url, headers=self.headers)
        self.http.close()


@pytest.fixture
def raw_mcp() -> Iterator[Callable[[McpServer], RawMcp]]:
    opened: list[RawMcp] = []

    def open_session(server: McpServer) -> RawMcp:
        session = RawMcp(server.mcp_url)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


def the_answer(pieces: list[Forward | Answer]) -> Answer:
    answers = [p for p in pieces if isinstance(p, Answer)]
    assert len(answers) == 1, pieces
    return answers[0]


@pytest.mark.parametrize("kind", KINDS)
def test_the_codec_reads_the_real_wire_and_its_resent_request_pays(
    request: pytest.FixtureRequest,
    x402_stack: Stack,
    raw_mcp: Callable[[McpServer], RawMcp],
    kind: str,
) -> None:
    server = server_of(request, kind)
    session = raw_mcp(server)
    tool, args = server.paid_tool
    body = session.tool_call(tool, args)
    pieces, scanner = session.scan(body)

    answer = the_answer(pieces)
    assert scanner.framing == "sse" and answer.event is not None
    if kind == "sse":  # 3 progress + 3 log notifications, forwarded before the answer, untouched
        assert [type(p) for p in pieces] == [Forward] * 6 + [Answer]
        assert all(b"notifications/" in p.raw for p in pieces[:6])
    found = extract_payment_required(answer.message)
    assert found is not None
    assert_asks_one_price(found.payment_required, x402_stack, server)

    money = Money(x402_stack)
    call = parse_tool_call(body)
    assert call is not None
    resent = paid_request_body(call, sign(x402_stack, found.payment_required))
    assert (
        json.loads(resent)["params"]["_meta"]["progressToken"]
        == json.loads(body)["params"]["_meta"]["progressToken"]
    )
    pieces, _ = session.scan(resent)
    paid = the_answer(pieces)
    receipt = payment_response_of(paid.message)
    assert receipt is not None and receipt["success"] is True
    assert extract_payment_required(paid.message) is None
    assert money.moved() == (server.price, server.price)
    client_gets = paid_answer(paid.message, payment_id=17)
    assert client_gets["result"]["_meta"] == {PAYMENT_RESPONSE_META: receipt, PROXY_PAYMENT_META: "17"}


def test_json_framing(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp]
) -> None:
    for kind in KINDS:
        server = mcp_server_factory(kind, framing="json")
        session = raw_mcp(server)
        pieces, scanner = session.scan(session.tool_call(*server.paid_tool))
        assert scanner.framing == "json"
        answer = the_answer(pieces)
        assert answer.event is None and extract_payment_required(answer.message) is not None


def test_a_huge_payment_required_streams_through_or_is_refused_by_size(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp]
) -> None:
    server = mcp_server_factory("sse", mode="huge")
    session = raw_mcp(server)
    pieces, scanner = session.scan(session.tool_call(*server.paid_tool))
    assert scanner.overflowed and not scanner.answer_found  # > 1 MiB: forwarded uninspected
    assert sum(len(p.raw) for p in pieces) > 4 * 1024 * 1024  # 2 MiB in structuredContent and again in text
    pieces, scanner = session.scan(session.tool_call(*server.paid_tool), max_message_bytes=16 * 1024 * 1024)
    with pytest.raises(PaymentRequiredTooLarge) as raised:
        extract_payment_required(the_answer(pieces).message)
    assert raised.value.reason == "challenge_too_large"


def test_a_malformed_payment_required_is_named(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp]
) -> None:
    server = mcp_server_factory("sse", mode="malformed")
    session = raw_mcp(server)
    pieces, _ = session.scan(session.tool_call(*server.paid_tool))
    with pytest.raises(MalformedPaymentRequired) as raised:
        extract_payment_required(the_answer(pieces).message)
    assert raised.value.reason == "malformed_challenge"


def test_the_jsonrpc_error_form(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp], x402_stack: Stack
) -> None:
    server = mcp_server_factory("sse", mode="rpc-error")
    session = raw_mcp(server)
    pieces, _ = session.scan(session.tool_call(*server.paid_tool))
    answer = the_answer(pieces)
    assert answer.message["error"]["code"] == 402
    found = extract_payment_required(answer.message)
    assert found is not None and found.form is PaymentRequiredForm.JSONRPC_ERROR
    assert_asks_one_price(found.payment_required, x402_stack, server)


def test_a_server_that_answers_settlement_pending_moves_nothing(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp], x402_stack: Stack
) -> None:
    server = mcp_server_factory("sse", mode="pending")
    session = raw_mcp(server)
    body = session.tool_call(*server.paid_tool)
    pieces, _ = session.scan(body)
    found = extract_payment_required(the_answer(pieces).message)
    assert found is not None
    money = Money(x402_stack)
    call = parse_tool_call(body)
    assert call is not None
    pieces, _ = session.scan(paid_request_body(call, sign(x402_stack, found.payment_required)))
    answer = the_answer(pieces).message
    assert payment_response_of(answer) == {
        "success": False,
        "errorReason": "settlement_pending",
        "transaction": "",
        "network": x402_stack.network_v2,
    }
    assert extract_payment_required(answer) is not None  # answered as a payment-required result again
    assert money.moved() == (0, 0) and server.stats()["verified"] == 1 and server.stats()["settlements"] == []


def test_a_server_that_never_answers_the_paid_call_moves_nothing(
    mcp_server_factory: Callable[..., McpServer], raw_mcp: Callable[[McpServer], RawMcp], x402_stack: Stack
) -> None:
    server = mcp_server_factory("sse", mode="hang")
    session = raw_mcp(server)
    body = session.tool_call(*server.paid_tool)
    pieces, _ = session.scan(body)
    found = extract_payment_required(the_answer(pieces).message)
    assert found is not None
    money = Money(x402_stack)
    call = parse_tool_call(body)
    assert call is not None
    with pytest.raises(httpx.ReadTimeout):
        session.scan(paid_request_body(call, sign(x402_stack, found.payment_required)), read_timeout=3)
    assert server.stats()["verified"] == 1 and server.stats()["settlements"] == []
    assert money.moved() == (0, 0)


# -- through a running x402-proxy (plain HTTP) ----------------------------------------------------------


@pytest.fixture(scope="module")
def proxy_with_wallet(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy that pays (wallet, policy, the stack's asset): it pays MCP tool calls too."""
    proxy = start_paying_proxy(x402_stack, tmp_path_factory.mktemp("mcp-proxy") / "home")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def proxied_env(proxy_with_wallet: ProxyProcess) -> dict[str, str]:
    """Exactly what `x402-proxy env` prints (plus PATH): the clients use the proxy for 127.0.0.2."""
    return {"PATH": os.environ["PATH"], **proxy_with_wallet.env_exports()}


def access_lines(proxy: ProxyProcess, host: str, at_least: int = 0) -> int:
    """The proxy's access lines for POSTs to `host` (written in batches: wait up to 5 s for `at_least`)."""
    deadline = time.monotonic() + 5
    while True:
        count = proxy.log_text().count(f"x402_proxy.access POST {host} ")
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


@pytest.mark.parametrize("client", list(CLIENT_RUNNERS))
@pytest.mark.parametrize("kind", KINDS)
def test_through_the_proxy_free_calls_work_and_notifications_stream(
    request: pytest.FixtureRequest,
    proxy_with_wallet: ProxyProcess,
    proxied_env: dict[str, str],
    kind: str,
    client: str,
) -> None:
    server = server_of(request, kind)
    host = server.options["host"]
    posts_before = access_lines(proxy_with_wallet, host)
    seen_before = len(server.stats().get("messages", []))
    tool, args = server.free_tool
    out = CLIENT_RUNNERS[client](server.mcp_url, tool, args, proxied_env)
    assert out["result"]["content"][0]["text"] == FREE_TEXT[kind]
    assert "_meta" not in out["result"] or not any(
        k.startswith("x402-proxy/") for k in out["result"]["_meta"]
    )
    if kind == "sse":
        assert [p["progress"] for p in out["progress"]] == [1, 2, 3]
        assert len(server.stats()["messages"]) > seen_before
    # initialize, notifications/initialized, tools/list, tools/call at least: all through the proxy
    assert access_lines(proxy_with_wallet, host, posts_before + 4) >= posts_before + 4


@pytest.mark.parametrize("client", list(CLIENT_RUNNERS))
@pytest.mark.parametrize("kind", KINDS)
def test_through_the_proxy_a_paid_tool_call_is_paid_once_and_answered(
    request: pytest.FixtureRequest,
    x402_stack: Stack,
    proxy_with_wallet: ProxyProcess,
    proxied_env: dict[str, str],
    kind: str,
    client: str,
) -> None:
    """Was `test_TODAY_...` (before the proxy paid MCP calls, the payment-required result went to the
    client unchanged and nothing was paid). Now: the client, which knows nothing of x402, gets the
    tool's result; the proxy paid one price, once, and says so in `_meta`."""
    server = server_of(request, kind)
    tool, args = server.paid_tool
    direct = CLIENT_RUNNERS[client](server.mcp_url, tool, args, direct_env())["result"]
    assert direct["isError"] is True and extract_payment_required(as_response(direct)) is not None
    money = Money(x402_stack)
    rows_before = ledger(proxy_with_wallet)
    seen_before = len(server.stats().get("messages", []))

    out = CLIENT_RUNNERS[client](server.mcp_url, tool, args, proxied_env)

    result = out["result"]
    assert result != direct and result.get("isError") is not True, result
    assert extract_payment_required(as_response(result)) is None
    meta = result["_meta"]
    assert PROXY_ERROR_META not in meta and PAYMENT_META not in meta  # what we signed stays ours
    receipt = meta[PAYMENT_RESPONSE_META]  # the server's receipt, kept as it sent it
    assert receipt["success"] is True and receipt["transaction"].startswith("0x")
    rows = ledger(proxy_with_wallet)
    [row] = rows[len(rows_before) :]  # one ledger row, named by our id in the result
    assert meta[PROXY_PAYMENT_META] == str(row["id"])
    assert row["state"] == "settled" and row["tx_hash"] == receipt["transaction"]
    assert row["resource"] == f"mcp://tool/{tool}" and row["url"] == server.mcp_url
    assert int(row["amount"]) == server.price
    assert money.moved() == (server.price, server.price)  # one price on chain, payer to payee
    if kind == "sse":
        seen = server.stats()["messages"][seen_before:]
        assert sum(1 for m in seen if m["params"].get("paid")) == 1
        assert [p["progress"] for p in out["progress"]][-3:] == [1, 2, 3]
