"""The MCP endpoint (/mcp) with the official MCP Python SDK client: initialize, list tools (schemas after
the seed tools), call each tool against the real x402 stack, bad arguments, and session termination."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest
import requests
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy, start_paying_admin

SEED_START_PROPERTIES = {"endpoint", "scope", "ttl_seconds", "label", "max_payment_eth", "method", "headers", "body",
                         "timeout_ms"}
ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
def admin(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    process = start_paying_admin(x402_stack, tmp_path_factory.mktemp("admin-mcp") / "home")
    yield process
    process.stop()


@asynccontextmanager
async def mcp_session(admin: AdminProxy, seen: list[tuple[str, int]] | None = None) -> AsyncIterator[ClientSession]:
    async def record(response: httpx2.Response) -> None:
        if seen is not None:
            seen.append((response.request.method, response.status_code))

    headers = {"Authorization": f"Bearer {admin.token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=90, trust_env=False, event_hooks={"response": [record]}) as http,
        streamable_http_client(f"{admin.admin_url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def test_initialize_and_list_tools_like_the_seeds(admin: AdminProxy) -> None:
    seen: list[tuple[str, int]] = []
    async with mcp_session(admin, seen) as session:
        listed = await session.list_tools()
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == {
        "x402_session_start",
        "x402_session_fetch",
        "x402_session_status",
        "x402_session_end",
        "x402_approval_list",
        "x402_approval_decide",
    }
    decide = tools["x402_approval_decide"].input_schema
    assert decide["required"] == ["id", "decision"] and decide["properties"]["decision"]["enum"] == ["approve", "deny"]

    start = tools["x402_session_start"].input_schema
    assert start["type"] == "object" and start["required"] == ["endpoint"]
    # The seed's properties, with max_payment (a decimal in the asset's units) instead of max_payment_eth.
    assert set(start["properties"]) == SEED_START_PROPERTIES - {"max_payment_eth"} | {"max_payment"}
    props = start["properties"]
    assert props["scope"]["enum"] == ["prefix", "exact"] and props["scope"]["default"] == "prefix"
    assert props["method"]["enum"] == ["GET", "POST", "PUT", "PATCH", "DELETE"] and props["method"]["default"] == "GET"
    assert props["headers"]["type"] == "object" and props["headers"]["additionalProperties"]["type"] == "string"
    assert props["timeout_ms"]["default"] == 30000
    assert (props["timeout_ms"]["minimum"], props["timeout_ms"]["maximum"]) == (1000, 60000)
    assert (props["ttl_seconds"]["minimum"], props["ttl_seconds"]["maximum"]) == (60, 2592000)
    assert props["label"]["maxLength"] == 100
    for name in ("endpoint", "label", "body", "max_payment"):
        assert props[name]["type"] == "string"

    end = tools["x402_session_end"].input_schema
    assert end["required"] == ["session_id"] and set(end["properties"]) == {"session_id"}
    assert end["properties"]["session_id"]["type"] == "string"
    status = tools["x402_session_status"].input_schema
    assert set(status["properties"]) == {"session_id"} and "required" not in status
    fetch = tools["x402_session_fetch"].input_schema
    assert fetch["required"] == ["session_id", "url"]
    assert {"method", "headers", "body", "timeout_ms"} <= set(fetch["properties"])

    # Leaving the client terminates the MCP session with a DELETE that the server honours.
    assert ("DELETE", 200) in seen, seen


async def test_each_tool_on_the_stack(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    endpoint = f"{siwx_server.url}/paid/a"
    before = x402_stack.balance_of(x402_stack.pay_to)
    async with mcp_session(admin) as session:
        started = await session.call_tool("x402_session_start", {"endpoint": endpoint, "label": "mcp",
                                                                  "max_payment": "0.01"})
        assert not started.is_error, text_of(started)
        data = started.structured_content
        assert data is not None and data["payment_required"] is True
        session_id = data["session"]["id"]
        assert session_id in text_of(started) and "x402 session established" in text_of(started)
        assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price

        one = await session.call_tool("x402_session_status", {"session_id": session_id})
        assert not one.is_error and one.structured_content["session"]["state"] == "active"  # type: ignore[index]
        listing = await session.call_tool("x402_session_status", {})
        assert session_id in {s["id"] for s in listing.structured_content["sessions"]}  # type: ignore[index]
        assert session_id in text_of(listing)

        fetched = await session.call_tool("x402_session_fetch", {"session_id": session_id, "url": endpoint})
        assert not fetched.is_error, text_of(fetched)
        assert fetched.structured_content["status"] == 200  # type: ignore[index]
        assert text_of(fetched).startswith("Response (200)")

        outside = await session.call_tool(
            "x402_session_fetch", {"session_id": session_id, "url": f"{siwx_server.url}/paid/b"}
        )
        assert outside.is_error and outside.structured_content["code"] == "url_not_in_scope"  # type: ignore[index]
        assert "[url_not_in_scope]" in text_of(outside)

        ended = await session.call_tool("x402_session_end", {"session_id": session_id})
        assert not ended.is_error and ended.structured_content["already_ended"] is False  # type: ignore[index]
        again = await session.call_tool("x402_session_end", {"session_id": session_id})
        assert not again.is_error and again.structured_content["already_ended"] is True  # type: ignore[index]
        closed = await session.call_tool("x402_session_fetch", {"session_id": session_id, "url": endpoint})
        assert closed.is_error and closed.structured_content["code"] == "session_ended"  # type: ignore[index]

        free = await session.call_tool("x402_session_start", {"endpoint": f"{siwx_server.url}/free"})
        assert not free.is_error and free.structured_content["payment_required"] is False  # type: ignore[index]
        assert "No payment required" in text_of(free)
    # Reuse was free: one price for the whole conversation.
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price


async def test_over_cap_pays_nothing(admin: AdminProxy, x402_stack: Stack, siwx_server: PyServer) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    async with mcp_session(admin) as session:
        refused = await session.call_tool(
            "x402_session_start", {"endpoint": f"{siwx_server.url}/paid/b", "max_payment": "0.0001"}
        )
    assert refused.is_error and refused.structured_content["code"] == "over_request_cap"  # type: ignore[index]
    assert x402_stack.balance_of(x402_stack.pay_to) == before


@pytest.mark.parametrize(
    "tool, arguments, code",
    [
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "max_payment_eth": "0.1"}, "unknown_field"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "surprise": 1}, "unknown_field"),
        ("x402_session_start", {}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": 42}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "ttl_seconds": "3600"}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "ttl_seconds": 10}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "label": "x" * 101}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "max_payment": "lots"}, "invalid_parameter"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/", "headers": {"X": "a\r\nB: c"}}, "invalid_header"),
        ("x402_session_start", {"endpoint": "ftp://127.0.0.1/"}, "invalid_url"),
        ("x402_session_start", {"endpoint": "http://127.0.0.1:1/x\r\nX-Injected: 1"}, "invalid_url"),
        ("x402_session_fetch", {"session_id": "nope"}, "invalid_parameter"),
        ("x402_session_fetch", {"session_id": "nope", "url": "http://127.0.0.1:1/"}, "session_not_found"),
        ("x402_session_status", {"session_id": 5}, "invalid_parameter"),
        ("x402_session_status", {"session_id": "nope"}, "session_not_found"),
        ("x402_session_end", {}, "invalid_parameter"),
        ("x402_session_end", {"session_id": "nope", "notify_upstream": True}, "unknown_field"),
        ("x402_session_end", {"session_id": "nope"}, "session_not_found"),
        ("x402_no_such_tool", {}, "unknown_tool"),
    ],
)
async def test_bad_arguments_are_tool_errors(admin: AdminProxy, tool: str, arguments: dict[str, Any], code: str) -> None:
    async with mcp_session(admin) as session:
        result = await session.call_tool(tool, arguments)
    assert result.is_error, text_of(result)
    assert result.structured_content is not None and result.structured_content["code"] == code
    assert result.structured_content["type"] == f"urn:x402-proxy:{code}"
    assert f"[{code}]" in text_of(result) and "Traceback" not in text_of(result)


def _raw(admin: AdminProxy, method: str, body: Any = None, **headers: str) -> requests.Response:
    base = {"Authorization": f"Bearer {admin.token}", "Accept": ACCEPT, "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return admin.call(method, "/mcp", data=data, headers={**base, **headers})


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}


def test_raw_session_termination(admin: AdminProxy) -> None:
    opened = _raw(admin, "POST", INIT)
    assert opened.status_code == 200, opened.text
    session_id = opened.headers["Mcp-Session-Id"]
    version = {"MCP-Protocol-Version": "2025-11-25", "Mcp-Session-Id": session_id}
    assert _raw(admin, "POST", {"jsonrpc": "2.0", "method": "notifications/initialized"}, **version).status_code == 202
    listed = _raw(admin, "POST", {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, **version)
    assert listed.status_code == 200 and "x402_session_start" in listed.text
    assert _raw(admin, "DELETE", **version).status_code == 200
    # Terminated: the id is unknown from now on, and a second DELETE has nothing to end.
    assert _raw(admin, "POST", {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, **version).status_code == 404
    assert _raw(admin, "DELETE", **version).status_code == 404


def test_raw_bad_requests(admin: AdminProxy) -> None:
    malformed = _raw(admin, "POST", b"{not json")
    assert malformed.status_code == 400 and "Traceback" not in malformed.text
    wrong_type = _raw(admin, "POST", {"jsonrpc": "2.0", "id": 1, "method": 5})
    assert wrong_type.status_code == 400
    no_accept = _raw(admin, "POST", INIT, Accept="text/html")
    assert no_accept.status_code == 406
    rebinding = _raw(admin, "POST", INIT, Host="evil.example:80")
    assert rebinding.status_code == 421
    unauthenticated = requests.post(f"{admin.admin_url}/mcp", json=INIT, headers={"Accept": ACCEPT}, timeout=10)
    assert unauthenticated.status_code == 401
