"""The session stage memoises what each request URL resolves to (proxy/sessions/stage.py, `_Route`).

A memo that outlived a change of the index would send a session's credentials after it ended, or the
wrong session's, or none after one was opened. These tests change the index under a URL the stage has
already routed and assert on what the upstream *received* (the hostile origin of the security matrix
records every request). The proxy sends static credentials only (lease header, signed token): the kinds
that take the memoised fast path.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session
from proxy.sessions.scope import Scope
from proxy.store.session_store import SqliteSessionStore
from tests.stack import PAY_TO_2, Stack
from tests.support.admin import AdminProxy
from tests.support.malicious_server import LEASE_HEADER, Hit, HostileOrigin, bind_twin_ports
from tests.support.paying_proxy import stack_config

HOST = "127.0.0.2"
SESSION = "X-402-Proxy-Session"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60


@pytest.fixture(scope="module")
def origin(x402_stack: Stack) -> Iterator[tuple[HostileOrigin, int]]:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # HTTPS side unused: plain HTTP only here
    origin = HostileOrigin(x402_stack, tls, switch_pay_to=PAY_TO_2.address).start()
    port, _twin, sockets = bind_twin_ports([HOST], HOST)
    for sock in sockets:
        origin.add_front(sock)
    for path in ("/paid/p", "/paid/p/a", "/paid/p/b"):  # each sells, and honours any sale's lease
        origin.protect("http", port, path)
    yield origin, port
    origin.stop()


@pytest.fixture(scope="module")
def proxy(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    config = stack_config(x402_stack, policy='daily_budget = "5"\nper_host_daily_budget = "5"')
    config += '\n[sessions]\ncredential_kinds = ["session_token", "token_headers"]\n'
    home = tmp_path_factory.mktemp("routes") / "home"
    process = AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": x402_stack.payer_key}).start()
    yield process
    process.stop()


def get(proxy: AdminProxy, url: str) -> requests.Response:
    return requests.get(url, proxies={"http": proxy.url}, timeout=TIMEOUT)


def one_hit(origin: HostileOrigin, start: int) -> Hit:
    hits = origin.hits_since(start)
    assert len(hits) == 1, [(h.raw_path, h.credential_headers()) for h in hits]
    return hits[0]


def lease(hit: Hit) -> str | None:
    return hit.credential_headers().get(LEASE_HEADER.lower())


def test_routed_url_follows_every_index_change(
    proxy: AdminProxy, origin: tuple[HostileOrigin, int], x402_stack: Stack
) -> None:
    server, port = origin
    base = f"http://{HOST}:{port}"
    top, a, b, outside = f"{base}/paid/p", f"{base}/paid/p/a", f"{base}/paid/p/b", f"{base}/paid/q"
    before = x402_stack.balance_of(x402_stack.pay_to)

    # Nothing covers `outside`; it is routed (to no session) before and after sessions exist.
    start = len(server.hits)
    assert get(proxy, outside).status_code == 200
    assert one_hit(server, start).credential_headers() == {}

    # A URL routed to "no session" pays, and from then on the same URL rides the new session.
    paid = get(proxy, top)
    assert paid.status_code == 200 and PAYMENT in paid.headers, proxy.log_text()[-2000:]
    prefix_id = paid.headers[SESSION]
    for url in (top, b, a, b, top):
        start = len(server.hits)
        response = get(proxy, url)
        assert response.status_code == 200 and response.headers[SESSION] == prefix_id, url
        assert PAYMENT not in response.headers
        hit = one_hit(server, start)
        assert lease(hit) == server.sales[0].lease
        assert "x-session-token" in hit.credential_headers()
    start = len(server.hits)
    assert get(proxy, outside).status_code == 200
    assert one_hit(server, start).credential_headers() == {}

    # A narrower (exact) session opened on a routed URL takes it over; its sibling keeps the prefix one.
    started = proxy.call("POST", "/sessions", json={"endpoint": a, "scope": "exact"})
    assert started.status_code == 201, started.text
    exact_id = started.json()["session"]["id"]
    for url, session_id, sale in ((a, exact_id, 1), (b, prefix_id, 0), (a, exact_id, 1)):
        start = len(server.hits)
        response = get(proxy, url)
        assert response.status_code == 200 and response.headers[SESSION] == session_id, url
        assert lease(one_hit(server, start)) == server.sales[sale].lease, url

    # Ending the exact session hands `a` back to the prefix session at once.
    assert proxy.call("DELETE", f"/sessions/{exact_id}").status_code == 200
    start = len(server.hits)
    response = get(proxy, a)
    assert response.headers[SESSION] == prefix_id
    assert lease(one_hit(server, start)) == server.sales[0].lease

    # Ending the prefix session: the next request for a routed URL carries nothing of it, and pays anew.
    assert proxy.call("DELETE", f"/sessions/{prefix_id}").status_code == 200
    start = len(server.hits)
    renewed = get(proxy, b)
    assert renewed.status_code == 200 and PAYMENT in renewed.headers
    assert renewed.headers[SESSION] not in (prefix_id, exact_id)
    first_try, paid_retry = server.hits_since(start)
    assert first_try.credential_headers() == {}, first_try.credential_headers()
    assert "payment-signature" in paid_retry.credential_headers()
    assert lease(paid_retry) is None
    assert len(server.sales) == 3
    assert x402_stack.balance_of(x402_stack.pay_to) - before == 3 * x402_stack.price


# -- expiry, with a clock the test owns (TTLs are at least 60 s: too slow to wait for on the stack) ------


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_expired_session_leaves_a_routed_url_at_once(tmp_path: Path) -> None:
    """The stage's memo checks liveness per request: a session past its expiry is never attached."""
    import asyncio

    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from proxy.engine.exchange import Exchange, Outcome
    from proxy.sessions.model import SessionCredentials
    from proxy.sessions.settings import SessionSettings
    from proxy.sessions.stage import SessionStage

    clock = _Clock()
    manager = SessionManager(SqliteSessionStore(tmp_path / "state.db"), clock=clock)
    session = Session.create(
        Scope.from_url("https://api.x.com/v1", "prefix"), now=clock.now, ttl_seconds=60, payer=None
    )
    session.credentials = SessionCredentials(token_headers={"x-x402-lease": "secret"})
    manager.add(session)
    settings = SessionSettings(credential_kinds=("token_headers",))
    stage = SessionStage(manager, payments=None, settings=settings, wallet=None, clock=clock)  # type: ignore[arg-type]
    seen: list[Exchange] = []

    class Answer:
        status, reason, content_length, content = 200, "OK", 0, None
        headers = CIMultiDictProxy(CIMultiDict[str]())

        async def read(self) -> bytes:
            return b""

        def release(self) -> None:
            return None

    async def upstream(request: Exchange) -> Outcome:
        seen.append(request)
        return Outcome(Answer())  # type: ignore[arg-type]

    url = URL("https://api.x.com/v1/x")

    def request() -> Exchange:
        headers = CIMultiDict[str]()
        return Exchange("r", "GET", url, headers, CIMultiDictProxy(headers), b"")

    async def send() -> dict[str, Any]:
        outcome = await stage.handle(request(), upstream)
        sent = seen[-1]
        appended = dict(sent.appended.items) if sent.appended is not None else {}
        return {"headers": {**dict(sent.headers), **appended}, "extra": dict(outcome.proxy_headers())}

    first = asyncio.run(send())
    again = asyncio.run(send())  # the memoised route
    assert first["headers"] == again["headers"] == {"x-x402-lease": "secret"}
    assert again["extra"] == {"X-402-Proxy-Session": session.id}
    clock.now += 60  # expires_at is exclusive
    expired = asyncio.run(send())
    assert expired == {"headers": {}, "extra": {}}
