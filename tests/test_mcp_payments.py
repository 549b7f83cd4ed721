"""The proxy pays x402 inside MCP (issue 16): real MCP servers (the wire-level SSE server; the reference
SDK's x402.mcp server in tests/test_mcp_stack.py), the MCP Python and TypeScript SDK clients through a
real proxy process, the local chain and facilitator. Balances are read on chain."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from proxy.mcp_pay import (
    PAYMENT_RESPONSE_META,
    PROXY_ERROR_META,
    PROXY_PAYMENT_META,
    extract_payment_required,
)
from tests.stack import Stack
from tests.stack.fixtures import McpServer, mcp_server_factory, mcp_sse_server, mcp_x402_server
from tests.support.certs import UpstreamCA
from tests.support.paying_proxy import ledger, start_paying_proxy
from tests.support.proxy_process import ProxyProcess
from tests.test_mcp_stack import CLIENT_RUNNERS, Money, as_response, direct_env, py_client, ts_client

__all__ = ["mcp_server_factory", "mcp_sse_server", "mcp_x402_server"]  # fixtures, imported to be found

pytestmark = pytest.mark.stack


def env_of(proxy: ProxyProcess) -> dict[str, str]:
    import os

    return {"PATH": os.environ["PATH"], **proxy.env_exports()}


def refusals(proxy: ProxyProcess) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{proxy.home / 'state.db'}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM refusals ORDER BY id")]


@dataclass
class Capped:
    proxy: ProxyProcess
    capped: McpServer  # its paid tool `forecast` capped under its price
    refused: McpServer  # every tool of it never paid


@pytest.fixture(scope="module")
def capped(
    x402_stack: Stack,
    mcp_server_factory: Callable[..., McpServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Capped]:
    """[mcp] rules: `forecast` of one server at most 0.0001 (under its price), every tool of another
    server never paid; the rest by policy."""
    capped_server = mcp_server_factory("sse", host="127.0.0.3")
    refused_server = mcp_server_factory("x402", host="127.0.0.3")
    home = tmp_path_factory.mktemp("mcp-capped") / "home"
    extra = (
        "[mcp]\n"
        "[[mcp.tools]]\n"
        f'server = "{capped_server.mcp_url}"\nname = "forecast"\nmax_per_call = "0.0001"\n'
        "[[mcp.tools]]\n"
        f'server = "{refused_server.mcp_url}"\nname = "*"\nallowed = false\n'
    )
    proxy = start_paying_proxy(x402_stack, home, extra=extra)
    yield Capped(proxy, capped_server, refused_server)
    proxy.stop()


@pytest.fixture(scope="module")
def paying(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("mcp-paying") / "home"
    proxy = start_paying_proxy(x402_stack, home, extra="[upstream]\nidle_timeout = 3\n")
    yield proxy
    proxy.stop()


def test_concurrent_calls_of_one_tool_each_pay_once(
    x402_stack: Stack, paying: ProxyProcess, mcp_sse_server: McpServer
) -> None:
    tool, args = mcp_sse_server.paid_tool
    money = Money(x402_stack)
    before = len(ledger(paying))
    env = env_of(paying)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: py_client(mcp_sse_server.mcp_url, tool, args, env), range(3)))
    ids = {out["result"]["_meta"][PROXY_PAYMENT_META] for out in outs}
    assert all(out["result"].get("isError") is not True for out in outs)
    rows = ledger(paying)[before:]
    assert len(rows) == 3 and {str(r["id"]) for r in rows} == ids  # three calls, three payments
    assert all(r["state"] == "settled" for r in rows)
    assert len({r["tx_hash"] for r in rows}) == 3
    assert money.moved() == (3 * mcp_sse_server.price, 3 * mcp_sse_server.price)


def test_free_calls_are_untouched_and_unpaid(paying: ProxyProcess, mcp_sse_server: McpServer) -> None:
    tool, args = mcp_sse_server.free_tool
    before = len(ledger(paying))
    direct = py_client(mcp_sse_server.mcp_url, tool, args, direct_env())["result"]
    through = py_client(mcp_sse_server.mcp_url, tool, args, env_of(paying))
    assert through["result"] == direct
    assert [p["progress"] for p in through["progress"]] == [1, 2, 3]
    assert len(ledger(paying)) == before


@pytest.mark.parametrize("client", ["python-sdk", "ts-sdk"])
def test_the_jsonrpc_error_form_is_paid_too(
    x402_stack: Stack,
    paying: ProxyProcess,
    mcp_server_factory: Callable[..., McpServer],
    client: str,
) -> None:
    server = mcp_server_factory("sse", mode="rpc-error")
    tool, args = server.paid_tool
    money = Money(x402_stack)
    out = CLIENT_RUNNERS[client](server.mcp_url, tool, args, env_of(paying))
    assert "result" in out and out["result"].get("isError") is not True, out
    assert out["result"]["_meta"][PAYMENT_RESPONSE_META]["success"] is True
    assert money.moved() == (server.price, server.price)


def test_json_framing_is_paid(
    x402_stack: Stack, paying: ProxyProcess, mcp_server_factory: Callable[..., McpServer]
) -> None:
    server = mcp_server_factory("sse", framing="json")
    tool, args = server.paid_tool
    money = Money(x402_stack)
    out = ts_client(server.mcp_url, tool, args, env_of(paying))
    assert out["result"]["structuredContent"] == {"city": "Oslo", "forecast": "sunny"}
    assert PROXY_PAYMENT_META in out["result"]["_meta"]
    assert money.moved() == (server.price, server.price)


def test_over_the_tool_cap_is_refused_readably(x402_stack: Stack, capped: Capped) -> None:
    capped_proxy, server = capped.proxy, capped.capped
    money = Money(x402_stack)
    env = env_of(capped_proxy)
    tool, args = server.paid_tool
    direct = py_client(server.mcp_url, tool, args, direct_env())["result"]
    capped = py_client(server.mcp_url, tool, args, env)["result"]
    assert capped["_meta"][PROXY_ERROR_META] == "over_request_cap"
    assert {k: v for k, v in capped.items() if k != "_meta"} == {
        k: v for k, v in direct.items() if k != "_meta"
    }
    assert extract_payment_required(as_response(capped)) is not None  # the server's result, unchanged
    assert ledger(capped_proxy) == [] and money.moved() == (0, 0)
    reasons = [r["reason"] for r in refusals(capped_proxy)]
    assert reasons[-1] == "over_request_cap"


def test_a_tool_a_rule_never_pays_is_refused_tool_not_allowed(x402_stack: Stack, capped: Capped) -> None:
    # The x402 SDK server's paid tool, `weather`, falls under the "*" rule with allowed = false.
    capped_proxy, server = capped.proxy, capped.refused
    money = Money(x402_stack)
    tool, args = server.paid_tool
    out = ts_client(server.mcp_url, tool, args, env_of(capped_proxy))["result"]
    assert out["isError"] is True and out["_meta"][PROXY_ERROR_META] == "tool_not_allowed"
    assert money.moved() == (0, 0) and ledger(capped_proxy) == []
    assert refusals(capped_proxy)[-1]["reason"] == "tool_not_allowed"


def test_malformed_and_huge_payment_required_results(
    x402_stack: Stack, paying: ProxyProcess, mcp_server_factory: Callable[..., McpServer]
) -> None:
    money = Money(x402_stack)
    before = len(ledger(paying))
    malformed = mcp_server_factory("sse", mode="malformed")
    out = py_client(malformed.mcp_url, *malformed.paid_tool, env_of(paying))["result"]
    assert out["isError"] is True and out["_meta"][PROXY_ERROR_META] == "malformed_challenge"
    huge = mcp_server_factory("sse", mode="huge")
    # Over the 1 MiB message limit (the SDK clients refuse such an event, so a raw session reads it):
    # relayed as it came, never inspected, never paid, and no hang.
    direct = raw_call(huge, None)
    through = raw_call(huge, paying.url)
    def without_ids(body: bytes) -> bytes:  # SSE event ids count the server's events
        return b"\n".join(line for line in body.split(b"\n") if not line.startswith(b"id: "))

    assert len(through) > 4 * 1024 * 1024 and without_ids(through) == without_ids(direct)
    assert PROXY_ERROR_META.encode() not in through
    assert len(ledger(paying)) == before and money.moved() == (0, 0)


def raw_call(server: McpServer, proxy_url: str | None) -> bytes:
    """initialize, then one call of the paid tool, by hand; the answer body as it arrived."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx.Client(proxy=proxy_url, trust_env=False, timeout=60) as http:
        hello = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        }
        init = http.post(
            server.mcp_url,
            json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello},
            headers=headers,
        )
        headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
        headers["MCP-Protocol-Version"] = "2025-06-18"
        http.post(
            server.mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
        )
        name, args = server.paid_tool
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": name, "arguments": args},
        }
        answer = http.post(server.mcp_url, json=call, headers=headers)
        assert answer.status_code == 200
        return answer.content


def test_a_server_that_never_settles_is_recorded_and_not_signed_again(
    x402_stack: Stack, paying: ProxyProcess, mcp_server_factory: Callable[..., McpServer]
) -> None:
    money = Money(x402_stack)
    before = len(ledger(paying))
    pending = mcp_server_factory("sse", mode="pending")
    out = py_client(pending.mcp_url, *pending.paid_tool, env_of(paying))["result"]
    # Answered payment-required again with settlement_pending and no transaction: the server's word
    # that nothing moved (the row is rejected, and the chain agrees).
    assert out["isError"] is True and out["_meta"][PROXY_ERROR_META] == "payment_rejected"
    [row] = ledger(paying)[before:]
    assert row["state"] == "rejected" and str(row["id"]) == out["_meta"][PROXY_PAYMENT_META]

    hang = mcp_server_factory("sse", mode="hang")
    out = py_client(hang.mcp_url, *hang.paid_tool, env_of(paying))["result"]
    # The paid call never answered (idle timeout 3 s): the payment may settle, so it is in doubt.
    assert out["_meta"][PROXY_ERROR_META] == "payment_in_doubt"
    [doubt] = ledger(paying)[before + 1 :]
    assert doubt["state"] == "in_doubt"
    again = py_client(hang.mcp_url, *hang.paid_tool, env_of(paying))["result"]
    assert again["_meta"][PROXY_ERROR_META] == "payment_in_doubt"
    rows = ledger(paying)[before + 1 :]
    assert len(rows) == 1 and rows[0]["presentations"] >= 1  # presented again or refused, never re-signed
    assert money.moved() == (0, 0)
    assert hang.stats()["settlements"] == []


def test_intercepted_https_is_paid(
    x402_stack: Stack,
    mcp_server_factory: Callable[..., McpServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("mcp-tls")
    ca = UpstreamCA.create(work, "mcp-upstream-ca")
    cert = ca.issue(work, ["127.0.0.2"])
    server = mcp_server_factory("sse", ssl_certfile=cert.cert_path, ssl_keyfile=cert.key_path)
    proxy = start_paying_proxy(x402_stack, work / "home", upstream_ca=ca.cert_path)
    try:
        money = Money(x402_stack)
        env = env_of(proxy)
        for client in (py_client, ts_client):
            out = client(server.mcp_url, *server.paid_tool, env)
            assert out["result"].get("isError") is not True, out
            assert out["result"]["_meta"][PAYMENT_RESPONSE_META]["success"] is True
        rows = ledger(proxy)
        assert [r["state"] for r in rows] == ["settled", "settled"]
        assert all(r["url"].startswith("https://127.0.0.2:") for r in rows)
        assert money.moved() == (2 * server.price, 2 * server.price)
    finally:
        proxy.stop()


def test_the_ledger_row_names_server_and_tool(paying: ProxyProcess, mcp_x402_server: McpServer) -> None:
    tool, args = mcp_x402_server.paid_tool
    out = py_client(mcp_x402_server.mcp_url, tool, args, env_of(paying))
    row_id = int(out["result"]["_meta"][PROXY_PAYMENT_META])
    [row] = [r for r in ledger(paying) if r["id"] == row_id]
    assert row["resource"] == f"mcp://tool/{tool}" and row["method"] == "POST"
    assert row["url"] == mcp_x402_server.mcp_url and row["host"] == "127.0.0.2"
    assert json.loads(out["result"]["content"][0]["text"])["weather"] == "sunny"
