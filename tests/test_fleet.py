"""A fleet: three real proxy processes on one throwaway PostgreSQL (tests/support/postgres.py), paying on the
local chain + facilitator + reference server (tests/stack). What the replicas share: sessions and their end,
the budget; what happens when the database goes away under them and comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy
from tests.support.paying_proxy import stack_config
from tests.support.postgres import PostgresServer
from tests.support.upstream import Upstream

SESSION = "X-402-Proxy-Session"
PAYMENT = "X-402-Proxy-Payment"
ERROR = "X-402-Proxy-Error"
TIMEOUT = 60


def start_replicas(
    stack: Stack, base: Path, url: str, count: int = 3, policy: str = 'daily_budget = "5"'
) -> list[AdminProxy]:
    config = stack_config(stack, policy=policy, extra=f'[store]\nurl = "{url}"\n')
    env = {
        "X402_PROXY_PRIVATE_KEY": stack.payer_key,
        "X402_PROXY_ADMIN_TOKEN": "fleet-token-0123456789abcdef",
    }
    replicas: list[AdminProxy] = []
    try:
        for i in range(count):
            replicas.append(AdminProxy(base / f"replica{i}", config, env).start())
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas


@pytest.fixture
def fleet(x402_stack: Stack, tmp_path: Path, postgres_url: str) -> Iterator[list[AdminProxy]]:
    replicas = start_replicas(x402_stack, tmp_path, postgres_url)
    yield replicas
    for r in replicas:
        r.stop()
    for r in replicas:  # never the password, whatever happened
        assert postgres_url.split(":")[2].split("@")[0] not in r.log_text()


def get(replica: AdminProxy, url: str) -> requests.Response:
    return requests.get(url, proxies={"http": replica.url, "https": replica.url}, timeout=TIMEOUT)


def test_a_session_ended_on_one_replica_is_not_attached_by_the_others_within_a_second(
    fleet: list[AdminProxy], x402_stack: Stack, siwx_server: PyServer
) -> None:
    a, b, c = fleet
    url = f"{siwx_server.url}/paid/a?n=1"
    before = x402_stack.balance_of(x402_stack.pay_to)
    first = get(a, url)
    assert first.status_code == 200 and first.headers.get(PAYMENT), first.text[:300]
    opened = first.headers[SESSION]
    # opened on a, used by b and c (within a second), nothing paid again
    time.sleep(1.0)
    for other in (b, c):
        hit = get(other, f"{siwx_server.url}/paid/a?n=2")
        assert hit.status_code == 200 and hit.headers.get(SESSION) == opened, dict(hit.headers)
        assert PAYMENT not in hit.headers
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    # ended on b (the REST route the CLI and MCP share): within a second a and c stop attaching it
    ended = b.call("DELETE", f"/sessions/{opened}")
    assert ended.status_code == 200 and ended.json()["ended"], ended.text
    time.sleep(1.0)
    for other in (a, c):
        after = get(other, f"{siwx_server.url}/paid/a?n=3")
        assert after.headers.get(SESSION) != opened, dict(after.headers)
    # every replica's API agrees the session ended, with the calls of all three added up
    for replica in fleet:
        shown = replica.call("GET", f"/sessions/{opened}").json()
        assert shown["state"] == "ended", shown
    time.sleep(6)  # the flush interval: counts are increments from each replica
    counted = a.call("GET", f"/sessions/{opened}").json()
    assert counted["call_count"] >= 2, counted


def test_a_shared_daily_budget_shows_the_same_on_every_replica(
    fleet: list[AdminProxy], siwx_server: PyServer
) -> None:
    paid = get(fleet[0], f"{siwx_server.url}/paid/b")
    assert paid.status_code == 200 and paid.headers.get(PAYMENT), paid.text[:300]
    budgets = [r.call("GET", "/budget").json() for r in fleet]
    spent = [b["global"]["spent"] for b in budgets]
    assert spent[0] != "0" and spent == [spent[0]] * 3, budgets
    payments = [[p["id"] for p in r.call("GET", "/payments").json()["payments"]] for r in fleet]
    assert payments == [payments[0]] * 3 and len(payments[0]) == 1


def test_the_database_stopped_under_load_then_back(
    fleet: list[AdminProxy],
    x402_stack: Stack,
    siwx_server: PyServer,
    upstream: Upstream,
    postgres_server: PostgresServer,
) -> None:
    a, b, _ = fleet
    opened = get(a, f"{siwx_server.url}/paid/slow?delay=0")
    assert opened.status_code == 200, opened.text[:300]
    session = opened.headers[SESSION]
    time.sleep(1.0)
    postgres_server.stop("fast")
    try:
        before = x402_stack.balance_of(x402_stack.pay_to)
        for replica in (a, b):
            # pass-through and session hits go on without the database
            plain = requests.get(
                f"{upstream.http_url}/echo/fleet-down", proxies={"http": replica.url}, timeout=30
            )
            assert plain.status_code == 200
            hit = get(replica, f"{siwx_server.url}/paid/slow?delay=0&n=2")
            assert hit.status_code == 200 and hit.headers.get(SESSION) == session, dict(hit.headers)
            # a payment is refused, nothing signed
            started = time.monotonic()
            refused = get(replica, f"{siwx_server.url}/paid/b?replica={replica.port}")
            assert refused.status_code == 503 and refused.headers.get(ERROR) == "ledger_unavailable", dict(
                refused.headers
            )
            assert time.monotonic() - started < 15
            assert requests.get(f"{replica.admin_url}/readyz", timeout=10).status_code == 503
            assert requests.get(f"{replica.admin_url}/healthz", timeout=10).status_code == 200
        assert x402_stack.balance_of(x402_stack.pay_to) == before
    finally:
        postgres_server.start()
    # back: the replicas recover by themselves
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if requests.get(f"{b.admin_url}/readyz", timeout=10).status_code == 200:
            break
        time.sleep(0.2)
    paid = get(b, f"{siwx_server.url}/paid/a?after=restart")
    assert paid.status_code == 200 and paid.headers.get(PAYMENT), dict(paid.headers)


def test_run_with_the_database_down_exits_2_naming_it(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = postgres_server.url("nope", port=1)
    process = AdminProxy(tmp_path / "home", f'[store]\nurl = "{url}"\n')
    result = process.cli("run", "--listen", "127.0.0.1:0", check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    shown = url.replace(f":{postgres_server.password}", "")
    assert result.stderr.startswith(f"x402-proxy: store {shown} unreachable: "), result.stderr
    assert postgres_server.password not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
