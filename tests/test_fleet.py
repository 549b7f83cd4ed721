"""A fleet: three real proxy processes on one throwaway PostgreSQL (tests/support/postgres.py), paying on the
local chain + facilitator + reference server (tests/stack). What the replicas share: sessions and their end,
the budget, the single flight per need; what happens when the database goes away under them and comes back."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import asyncpg
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
    stack: Stack,
    base: Path,
    url: str,
    count: int = 3,
    policy: str = 'daily_budget = "5"',
    extra: str = "",
) -> list[AdminProxy]:
    config = stack_config(stack, policy=policy, extra=f'[store]\nurl = "{url}"\n{extra}')
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


def all_at_once(calls: list[tuple[AdminProxy, str]]) -> list[requests.Response]:
    """Every (replica, url) request from a thread of its own, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def one(call: tuple[AdminProxy, str]) -> requests.Response:
        barrier.wait(timeout=TIMEOUT)
        return get(*call)

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(one, calls))


def gated(url: str, key: str, count: int) -> str:
    """`url` behind the server's gate (tests/stack/server_py.py): no 402 is answered before `count`
    unpaid requests hold one, so every replica holds its challenge before any payment can settle."""
    return f"{url}{'&' if '?' in url else '?'}gate={key}&gate_n={count}&gate_timeout=20"


# Pending inserts waiting for the table, as the database shows them.
INSERTS_WAITING = (
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
    "WHERE l.relation = 'payments'::regclass AND NOT l.granted AND a.query ILIKE 'INSERT INTO payments%'"
)


async def with_inserts_held(
    url: str, calls: list[tuple[AdminProxy, str]], replicas: int, hold: float = 2.5
) -> tuple[list[requests.Response], int]:
    """`all_at_once(calls)` while a connection of ours holds the payments table in SHARE mode: reads go on,
    a pending row's INSERT waits (a slow commit), so "check the budget, then insert" stays open long
    enough for every replica to be inside it, if nothing stops them. Released once each replica has an
    insert waiting, or `hold` seconds after the first (under the store's 5-s lock_timeout). Returns the
    answers and the most inserts seen waiting at once."""
    conn, watch = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        held = conn.transaction()
        await held.start()
        await conn.execute("LOCK TABLE payments IN SHARE MODE")
        answers = asyncio.get_running_loop().run_in_executor(None, all_at_once, calls)
        most, first = 0, None
        deadline = time.monotonic() + TIMEOUT
        while not answers.done() and time.monotonic() < deadline:
            # from another connection: pg_stat_activity is a snapshot per transaction
            waiting = int(await watch.fetchval(INSERTS_WAITING))
            most = max(most, waiting)
            if waiting and first is None:
                first = time.monotonic()
            if most >= replicas or (first is not None and time.monotonic() - first > hold):
                break
            await asyncio.sleep(0.02)
        await held.rollback()
        return await answers, most
    finally:
        await conn.close()
        await watch.close()


def test_concurrent_first_requests_spread_over_the_replicas_pay_once(
    fleet: list[AdminProxy], x402_stack: Stack
) -> None:
    """30 first requests for one paid URL, round-robin over 3 replicas, all holding their 402 at once:
    the need lock makes it one purchase for the fleet; the others wait for it and use its session."""
    count = 30
    key = f"first-{uuid.uuid4().hex}"
    with x402_stack.start_py_server(siwx=True) as server:
        url = gated(f"{server.url}/paid/a", key, count)
        before = x402_stack.balance_of(x402_stack.pay_to)
        answers = all_at_once([(fleet[i % len(fleet)], url) for i in range(count)])
        moved = x402_stack.balance_of(x402_stack.pay_to) - before
        stats = server.stats()
    gate = stats["gates"][key]
    # they truly overlapped: all 30 held a challenge before the gate let any through (what comes after
    # it opened is the requests re-sent with the session bought meanwhile)
    assert gate["held"] == count and gate["opened_by"] == "count", gate
    statuses = [a.status_code for a in answers]
    paid = [a.headers[PAYMENT] for a in answers if a.headers.get(PAYMENT)]
    settled = [s for s in stats["settlements"] if s["success"]]
    rows = fleet[0].call("GET", "/payments").json()["payments"]
    figures = (
        f"statuses {sorted(statuses)}, {len(paid)} answers paid, {len(settled)} settlements, "
        f"{len(rows)} ledger rows, {moved / x402_stack.price:g} prices moved on chain"
    )
    assert moved == x402_stack.price, figures
    assert len(settled) == 1 and len(rows) == 1 and len(set(paid)) == 1, figures
    assert statuses == [200] * count, figures
    sessions = {a.headers.get(SESSION) for a in answers}
    assert len(sessions) == 1 and None not in sessions, (sessions, figures)


def test_a_shared_budget_holds_under_concurrent_distinct_paid_urls_on_all_replicas(
    x402_stack: Stack, tmp_path: Path, postgres_url: str
) -> None:
    """A budget of two prices, sessions off, nine distinct paid URLs at once over three replicas, every
    one holding its 402 before any payment settles, and the pending inserts slowed down by a table lock
    (so every replica is between its budget check and its insert at the same moment unless something
    serialises them): the payment lock lets exactly two fit the fleet."""
    price, count = x402_stack.price, 9
    budget = Decimal(2 * price).scaleb(-x402_stack.token_decimals)
    fleet = start_replicas(
        x402_stack,
        tmp_path,
        postgres_url,
        policy=f'daily_budget = "{budget}"\nper_host_daily_budget = "{budget}"',
        extra="[sessions]\nenabled = false\n",
    )
    try:
        key = f"budget-{uuid.uuid4().hex}"
        urls = [gated(f"{x402_stack.py}/paid/b?budget={i}", key, count) for i in range(count)]
        before = x402_stack.balance_of(x402_stack.pay_to)
        calls = [(fleet[i % len(fleet)], url) for i, url in enumerate(urls)]
        answers, waiting = asyncio.run(with_inserts_held(postgres_url, calls, len(fleet)))
        moved = x402_stack.balance_of(x402_stack.pay_to) - before
        gate = x402_stack.server_stats(x402_stack.py)["gates"][key]
        rows = fleet[0].call("GET", "/payments").json()["payments"]
    finally:
        for r in fleet:
            r.stop()
    assert gate == {"held": count, "after": 0, "opened_by": "count"}, gate
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 402 and a.headers.get(ERROR) == "budget_exhausted"]
    figures = (
        f"{len(ok)} answered 200 ({sum(1 for a in ok if a.headers.get(PAYMENT))} paid), "
        f"{len(refused)} refused budget_exhausted, statuses {sorted(a.status_code for a in answers)}, "
        f"{len(rows)} ledger rows, {moved / price:g} prices moved on chain (budget: 2), "
        f"at most {waiting} pending inserts waiting at once"
    )
    assert moved == 2 * price, figures
    assert len(ok) == 2 and all(a.headers.get(PAYMENT) for a in ok), figures
    assert len(refused) == count - 2, figures
    assert len(rows) == 2, figures
    # the slow commit caught a decision, and the fleet's decisions went one at a time through it
    assert waiting == 1, figures


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
