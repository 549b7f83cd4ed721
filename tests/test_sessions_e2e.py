"""Sessions on the real stack: pay once per scope, reuse with a credential the server honours."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import aiohttp
import pytest
import requests

from tests.stack import PyServer, Stack
from tests.support.paying_proxy import ledger, proxies, start_paying_proxy
from tests.support.proxy_process import ProxyProcess

SESSION = "X-402-Proxy-Session"
PAYMENT = "X-402-Proxy-Payment"


@pytest.fixture()
def fresh_proxy(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = start_paying_proxy(
        x402_stack,
        tmp_path_factory.mktemp("sessions") / "home",
        policy='daily_budget = "5"\nper_host_daily_budget = "5"',
    )
    yield process
    process.stop()


def paid_rows(proxy: ProxyProcess) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in ledger(proxy) if r["state"] in ("settled", "pending", "in_doubt")]


async def _burst(proxy: ProxyProcess, url: str, count: int) -> list[tuple[int, str | None]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:

        async def one() -> tuple[int, str | None]:
            async with client.get(url, proxy=proxy.url, timeout=aiohttp.ClientTimeout(total=120)) as response:
                await response.read()
                return response.status, response.headers.get(SESSION)

        return await asyncio.gather(*(one() for _ in range(count)))


def test_200_concurrent_first_requests_pay_once(
    fresh_proxy: ProxyProcess, x402_stack: Stack, siwx_server: PyServer
) -> None:
    url = f"{siwx_server.url}/paid/a"
    before = x402_stack.balance_of(x402_stack.pay_to)
    results = asyncio.run(_burst(fresh_proxy, url, 200))
    statuses = [status for status, _ in results]
    assert statuses == [200] * 200, {s: statuses.count(s) for s in set(statuses)}
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert len(paid_rows(fresh_proxy)) == 1
    assert len({session for _, session in results}) == 1


def test_siwx_pay_once_then_50_free(
    fresh_proxy: ProxyProcess, x402_stack: Stack, siwx_server: PyServer
) -> None:
    url = f"{siwx_server.url}/paid/b"
    before = x402_stack.balance_of(x402_stack.pay_to)
    first = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
    assert first.status_code == 200 and PAYMENT in first.headers
    session_id = first.headers[SESSION]
    with requests.Session() as client:
        for _ in range(50):
            response = client.get(url, proxies=proxies(fresh_proxy), timeout=60)
            assert response.status_code == 200
            assert PAYMENT not in response.headers
            assert response.headers[SESSION] == session_id
            assert "sign-in-with-x" in response.json()["headers"]
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert len(paid_rows(fresh_proxy)) == 1


def test_server_without_reusable_credential_charges_each_request_once(
    fresh_proxy: ProxyProcess, x402_stack: Stack
) -> None:
    url = f"{x402_stack.express_v2}/paid/a"
    before = x402_stack.balance_of(x402_stack.pay_to)
    for _i in range(3):
        response = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
        assert response.status_code == 200, response.text[:300]
        assert PAYMENT in response.headers
    assert x402_stack.balance_of(x402_stack.pay_to) - before == 3 * x402_stack.price
    assert len(paid_rows(fresh_proxy)) == 3


def test_credentials_never_leave_scope(
    fresh_proxy: ProxyProcess, x402_stack: Stack, siwx_server: PyServer
) -> None:
    paid = requests.get(f"{siwx_server.url}/paid/a", proxies=proxies(fresh_proxy), timeout=60)
    assert paid.status_code == 200
    credential_headers = {
        "sign-in-with-x",
        "x-session-token",
        "x-session-wallet",
        "payment-session",
        "cookie",
    }
    # Same origin, outside the /paid/a prefix (segment boundary), and another origin entirely.
    for url in (
        f"{siwx_server.url}/free",
        f"{siwx_server.url}/paid/ab",
        f"{x402_stack.py}/free",
        f"{siwx_server.url.replace('127.0.0.1', 'localhost')}/free",
    ):
        response = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
        seen = (
            {name.lower() for name in response.json().get("headers", {})}
            if response.status_code == 200
            else set()
        )
        assert not seen & credential_headers, (url, seen & credential_headers)
        assert SESSION not in response.headers


def test_sessions_survive_restart(
    x402_stack: Stack, siwx_server: PyServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("restart") / "home"
    proxy = start_paying_proxy(x402_stack, home)
    try:
        first = requests.get(f"{siwx_server.url}/paid/a", proxies=proxies(proxy), timeout=60)
        assert first.status_code == 200
        session_id = first.headers[SESSION]
    finally:
        assert proxy.stop(signal.SIGTERM) == 0
    before = x402_stack.balance_of(x402_stack.pay_to)
    proxy = start_paying_proxy(x402_stack, home)
    try:
        again = requests.get(f"{siwx_server.url}/paid/a", proxies=proxies(proxy), timeout=60)
        assert again.status_code == 200
        assert again.headers[SESSION] == session_id
        assert PAYMENT not in again.headers
        assert x402_stack.balance_of(x402_stack.pay_to) == before
    finally:
        proxy.stop()


@pytest.mark.parametrize("mode", ["lease", "token"])
def test_server_issued_lease_and_signed_token_reuse(
    mode: str, fresh_proxy: ProxyProcess, x402_stack: Stack
) -> None:
    """A server of ours (reference middleware + a reuse check in front) honours a lease or our signed token."""
    server = x402_stack.start_py_server(extra_args=["--reuse", mode])
    try:
        url = f"{server.url}/paid/a"
        before = x402_stack.balance_of(x402_stack.pay_to)
        first = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
        assert first.status_code == 200 and PAYMENT in first.headers
        for _ in range(10):
            again = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
            assert again.status_code == 200, again.text[:300]
            assert again.json()["reused"] == mode
            assert PAYMENT not in again.headers
        assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
        assert len(paid_rows(fresh_proxy)) == 1
    finally:
        server.stop()


def test_rejected_credential_renews_once_per_request(fresh_proxy: ProxyProcess, x402_stack: Stack) -> None:
    """A session whose credential the server ignores pays again, once per client request, as a renewal."""
    url = f"{x402_stack.express_v2}/paid/a"
    first = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
    second = requests.get(url, proxies=proxies(fresh_proxy), timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.headers[SESSION] == second.headers[SESSION]
    rows = paid_rows(fresh_proxy)
    assert len(rows) == 2 and {r["session_id"] for r in rows} == {first.headers[SESSION]}
