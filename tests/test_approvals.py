"""Approvals (issue 17): a payment above [policy] ask_above waits for a person, through the REST API,
the CLI and the MCP tools, on the real stack. The dashboard's path is in tests/test_dashboard.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy
from tests.support.crash import ERROR, PAYMENT, wait_for
from tests.support.paying_proxy import ledger, proxies, stack_config
from tests.support.proxy_process import ProxyProcess

TIMEOUT = 60


def approval_proxy(stack: Stack, home: Path, policy: str = "") -> AdminProxy:
    config = stack_config(
        stack,
        policy='daily_budget = "5"\nper_host_daily_budget = "5"\nask_above = "0.0005"\n' + policy,
    )
    return AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()


def in_background(proxy: ProxyProcess, url: str) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def client() -> None:
        outcome["response"] = requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread, outcome


def waiting(proxy: AdminProxy, count: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = [a for a in proxy.call("GET", "/approvals").json()["approvals"] if a["state"] == "waiting"]
        return len(found) >= count

    wait_for(ready, 20, "a waiting approval", 0.1)
    return found


@pytest.fixture
def proxy(x402_stack: Stack, home: Path) -> Iterator[AdminProxy]:
    process = approval_proxy(x402_stack, home)
    yield process
    process.stop()


def test_a_payment_above_ask_above_waits_and_the_cli_approves_it(
    x402_stack: Stack, proxy: AdminProxy
) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    thread, outcome = in_background(proxy, f"{x402_stack.py}/paid/a")
    (approval,) = waiting(proxy)
    assert approval["price"].startswith("0.001") and "above ask_above 0.0005" in approval["reason"]
    assert ledger(proxy) == []  # nothing written, nothing signed while a person decides
    assert x402_stack.balance_of(x402_stack.pay_to) == before
    listed = proxy.admin_cli("approvals", "list")
    assert listed.returncode == 0 and approval["id"] in listed.stdout and "waiting" in listed.stdout
    approved = proxy.admin_cli("approvals", "approve", approval["id"])
    assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
    thread.join(TIMEOUT)
    response = outcome["response"]
    assert response.status_code == 200 and PAYMENT in response.headers
    (row,) = ledger(proxy)
    assert row["state"] == "settled" and row["approved_by"] == "cli" and row["approved_at"] is not None
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    again = proxy.admin_cli("approvals", "approve", approval["id"])
    assert again.returncode == 1 and "approval_decided" in again.stderr


def test_a_denied_payment_gets_the_servers_402_and_nothing_moves(
    x402_stack: Stack, proxy: AdminProxy
) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    thread, outcome = in_background(proxy, f"{x402_stack.py}/paid/b")
    (approval,) = waiting(proxy)
    decided = proxy.call("POST", f"/approvals/{approval['id']}", json={"decision": "deny"})
    assert decided.status_code == 200 and decided.json()["state"] == "denied"
    thread.join(TIMEOUT)
    response = outcome["response"]
    assert response.status_code == 402 and response.headers[ERROR] == "approval_denied"
    assert ledger(proxy) == [] and x402_stack.balance_of(x402_stack.pay_to) == before
    assert proxy.call("POST", "/approvals/apr_000000000000", json={"decision": "deny"}).status_code == 404
    bad = proxy.call("POST", f"/approvals/{approval['id']}", json={"decision": "maybe"})
    assert bad.status_code == 400


def test_concurrent_requests_for_one_need_share_one_approval_and_mcp_decides(
    x402_stack: Stack, siwx_server: PyServer, proxy: AdminProxy
) -> None:
    # A server that honours the session (SIWX): the need is the scope, bought once.
    before = x402_stack.balance_of(x402_stack.pay_to)
    url = f"{siwx_server.url}/paid/a"
    clients = [in_background(proxy, url) for _ in range(3)]
    (approval,) = waiting(proxy)
    time.sleep(1.0)  # the other two are queued behind it (one flight per scope), never a second approval
    assert [a["id"] for a in waiting(proxy)] == [approval["id"]]
    result = mcp_call(proxy, "x402_approval_decide", {"id": approval["id"], "decision": "approve"})
    assert result["structuredContent"]["state"] == "approved"
    for thread, _ in clients:
        thread.join(TIMEOUT)
    statuses = sorted(outcome["response"].status_code for _, outcome in clients)
    assert statuses == [200, 200, 200]
    rows = ledger(proxy)  # one scope: one payment, the others ride its session
    assert len(rows) == 1 and rows[0]["approved_by"] == "mcp"
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    listing = mcp_call(proxy, "x402_approval_list", {})
    assert any(a["id"] == approval["id"] for a in listing["structuredContent"]["approvals"])


def test_no_decision_in_time_is_approval_timeout(x402_stack: Stack, home: Path) -> None:
    proxy = approval_proxy(x402_stack, home, "ask_timeout = 2\n")
    try:
        started = time.monotonic()
        response = requests.get(f"{x402_stack.py}/paid/b", proxies=proxies(proxy), timeout=TIMEOUT)
        assert response.status_code == 402 and response.headers[ERROR] == "approval_timeout"
        assert 1.5 < time.monotonic() - started < 20
        assert ledger(proxy) == []
        (approval,) = proxy.call("GET", "/approvals").json()["approvals"]
        assert approval["state"] == "timeout" and approval["decided_by"] == "timeout"
    finally:
        proxy.stop()


def test_approve_and_remember_for_the_host(x402_stack: Stack, proxy: AdminProxy) -> None:
    thread, outcome = in_background(proxy, f"{x402_stack.py}/paid/a")
    (approval,) = waiting(proxy)
    decided = proxy.admin_cli("approvals", "approve", approval["id"], "--remember", "host", "--hours", "2")
    assert decided.returncode == 0 and "remembered for host" in decided.stdout
    thread.join(TIMEOUT)
    assert outcome["response"].status_code == 200
    # Another scope on the same host: paid without asking, the grant on record.
    second = requests.get(f"{x402_stack.py}/paid/b", proxies=proxies(proxy), timeout=TIMEOUT)
    assert second.status_code == 200 and PAYMENT in second.headers
    rows = ledger(proxy)
    assert [r["approved_by"] for r in rows] == ["cli", f"grant {approval['id']} (host)"]


def mcp_call(proxy: AdminProxy, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One JSON-RPC tools/call over the admin MCP endpoint (stateless JSON answers)."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with proxy.http() as client:
        init = client.post(
            f"{proxy.admin_url}/mcp",
            headers=headers,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "test", "version": "1"},
                },
            },
            timeout=30,
        )
        assert init.status_code == 200, init.text
        session = init.headers.get("mcp-session-id")
        more = {**headers, **({"mcp-session-id": session} if session else {})}
        client.post(
            f"{proxy.admin_url}/mcp",
            headers=more,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        )
        answer = client.post(
            f"{proxy.admin_url}/mcp",
            headers=more,
            json={
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments},
            },
            timeout=30,
        )
    assert answer.status_code == 200, answer.text
    text = answer.text
    if text.startswith("event:") or "data:" in text.splitlines()[0]:
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    result: dict[str, Any] = json.loads(text)["result"]
    assert not result.get("isError"), result
    return result
