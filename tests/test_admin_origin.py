"""The admin listener checks Host and Origin on every route, REST and MCP alike (ListenerGuard in
proxy/admin/auth.py): a DNS-rebinding page (its own name, resolved to 127.0.0.1) gets 421, a page on
another origin gets 403 on whatever it makes a browser send, and the listener's own origin (a future
dashboard at /ui) passes. Against a real proxy process; the token is always sent, so what refuses is
the guard and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from proxy.admin.auth import ListenerGuard
from tests.conftest import proxy_config
from tests.support.admin import AdminProxy
from tests.support.certs import UpstreamCA

MCP_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
# (method, path, json body): state-changing routes, cheap to call (no network beyond loopback port 1).
CHANGING = [
    ("POST", "/sessions", {"endpoint": "http://127.0.0.1:1/x", "timeout_ms": 1000}),
    ("DELETE", "/sessions/no-such-session", None),
    ("POST", "/sessions/no-such-session/fetch", {"url": "http://127.0.0.1:1/x"}),
    ("POST", "/mcp", MCP_INIT),
]
READING = [("GET", "/budget", None), ("GET", "/sessions", None), ("GET", "/healthz", None)]


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA) -> Iterator[AdminProxy]:
    home = tmp_path_factory.mktemp("admin-origin") / "home"
    process = AdminProxy(home, proxy_config(upstream_ca)).start()
    yield process
    process.stop()


def call(admin: AdminProxy, method: str, path: str, body: Any, **headers: str) -> requests.Response:
    if path == "/mcp":
        headers = {**MCP_HEADERS, **headers}
    return admin.call(method, path, json=body, headers=headers, timeout=30)


def port_of(admin: AdminProxy) -> int:
    return int(admin.admin_address.rsplit(":", 1)[1])


def assert_problem(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/problem+json"), response.headers
    assert response.json()["code"] == code, response.json()


FOREIGN_HOSTS = [
    "evil.example:{p}",  # a rebinding page keeps its own name
    "evil.example",
    "127.0.0.1:{q}",  # our address, another port
    "127.0.0.2:{p}",  # another loopback address
    "127.1:{p}",  # a non-canonical spelling of ours
    "localhost.evil.example:{p}",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
@pytest.mark.parametrize(("method", "path", "body"), CHANGING + READING)
def test_a_foreign_host_is_misdirected(
    admin: AdminProxy, method: str, path: str, body: Any, host: str
) -> None:
    """Was: every REST route answered (GET /budget 200 with the spending, POST /sessions fetched); only
    /mcp checked the Host."""
    port = port_of(admin)
    response = call(admin, method, path, body, Host=host.format(p=port, q=port + 1))
    assert_problem(response, 421, "misdirected_request")


FOREIGN_ORIGINS = [
    "http://evil.example",
    "http://evil.example:{p}",
    "null",  # a sandboxed frame or a file: page
    "http://127.0.0.1:{q}",  # another listener on this host (the proxy port, a dev server)
    "https://127.0.0.1:{p}",  # another scheme is another origin
    "http://127.0.0.1:{p}.evil.example",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize(("method", "path", "body"), CHANGING)
def test_a_cross_origin_page_cannot_change_state(
    admin: AdminProxy, method: str, path: str, body: Any, origin: str
) -> None:
    """Was: a page on another origin could open sessions (and pay), end them and fetch through them
    wherever it could get hold of the token; the MCP endpoint alone checked Origin."""
    port = port_of(admin)
    response = call(admin, method, path, body, Origin=origin.format(p=port, q=port + 1))
    assert_problem(response, 403, "cross_origin")


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{p}", "http://localhost:{p}", "http://LOCALHOST:{p}"])
@pytest.mark.parametrize(("method", "path", "body"), CHANGING + READING)
def test_the_listeners_own_origin_passes(
    admin: AdminProxy, method: str, path: str, body: Any, origin: str
) -> None:
    """A page the admin listener serves itself (a dashboard at /ui) may call it."""
    response = call(admin, method, path, body, Origin=origin.format(p=port_of(admin)))
    assert response.status_code not in (403, 421), response.text[:300]


@pytest.mark.parametrize("host", ["127.0.0.1:{p}", "localhost:{p}", "LocalHost.:{p}"])
def test_the_listeners_own_names_pass(admin: AdminProxy, host: str) -> None:
    response = call(admin, "GET", "/budget", None, Host=host.format(p=port_of(admin)))
    assert response.status_code == 200, response.text[:300]


def test_the_guard_does_not_replace_the_token(admin: AdminProxy) -> None:
    own = f"http://127.0.0.1:{port_of(admin)}"
    response = requests.get(f"{admin.admin_url}/budget", headers={"Origin": own}, timeout=10)
    assert_problem(response, 401, "unauthorized")
    # And a foreign Host is refused before the token is even looked at.
    response = requests.get(f"{admin.admin_url}/budget", headers={"Host": "evil.example"}, timeout=10)
    assert_problem(response, 421, "misdirected_request")


def test_guard_rules() -> None:
    """The rule without a listener: a specific bind knows its names; a wildcard bind (reached under
    names it cannot know, e.g. a compose service name) takes any Host but only its own origin."""
    bound = ListenerGuard.for_listener("127.0.0.1", [("127.0.0.1", 8403)])
    assert bound.refusal("127.0.0.1:8403", None) is None
    assert bound.refusal("[::1]:8403", "http://[0:0::1]:8403") is None
    assert bound.refusal("localhost:8403", "http://127.0.0.1:8403") is None  # both are this listener
    assert bound.refusal(None, None) == (
        421,
        "misdirected_request",
        "Host '' does not name this admin listener",
    )
    assert bound.refusal("127.0.0.1:8403/x", None) is not None
    assert bound.refusal("127.0.0.1:8403", "http://127.0.0.1:8403/") is not None  # no path in an Origin
    assert bound.refusal("127.0.0.1:8403", "") is not None
    wildcard = ListenerGuard.for_listener("0.0.0.0", [("0.0.0.0", 8403)])
    assert wildcard.refusal("proxy:8403", None) is None
    assert wildcard.refusal("proxy:8403", "http://proxy:8403") is None
    assert wildcard.refusal("proxy:8403", "http://evil.example") == (
        403,
        "cross_origin",
        "a page on 'http://evil.example' may not use the admin API",
    )
    named = ListenerGuard.for_listener("admin.internal", [("10.0.0.5", 9000)])
    assert named.refusal("admin.internal:9000", "http://admin.internal:9000") is None
    assert named.refusal("127.0.0.1:9000", None) is None
    assert named.refusal("10.0.0.5:9000", None) is not None  # not a name it was given
