"""Fleets on PostgreSQL (issue 15): a proxy whose store is PostgreSQL (`[store] url`) against one on the
embedded SQLite ledger, side by side in one run.

Session hits. A throwaway PostgreSQL server (tests/support/postgres.py, restarted here with `fsync=on`,
as a ledger runs in production; the test helper starts it with fsync off) and one SQLite home, each
seeded with the same kind of session as bench/session_hits.py (lease header + signed session token,
scope `http://ORIGIN/s/`). Two proxies without a wallet, one per store, both pinned to CPU 1 (one is
busy at a time); wrk (`-t1 -cN`) and nginx on CPU 0, with PostgreSQL. Interleaved rounds of `/s/x`
through each proxy.

Paid overhead. The local x402 stack and two proxies paying from the dev wallet, sessions off (every
request pays), one per store; N sequential paid requests to @x402/express V2, alternating between the
two; each proxy's `payment #N overhead` debug line (402 in hand -> paid retry out), as
bench/paid_overhead.py reads it.

    .venv/bin/python bench/fleet_store.py [--rounds 5 --duration 4 --paid-requests 60 --nice -15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from eth_account import Account

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.session_hits import lease_session, seed_sqlite  # noqa: E402
from proxy.sessions.model import Session  # noqa: E402
from proxy.store.postgres import PostgresLedgerStore  # noqa: E402
from proxy.store.postgres_sessions import PostgresSessionStore  # noqa: E402
from tests.stack import start_stack  # noqa: E402
from tests.support.paying_proxy import start_paying_proxy  # noqa: E402
from tests.support.postgres import PostgresServer, launch  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.proxy_process import ProxyProcess  # noqa: E402

HIT_TARGET = 0.9
PAID_EXTRA_TARGET_MS = 2.0
OVERHEAD = re.compile(r"payment #\d+ overhead ([0-9.]+) ms")


def durable(server: PostgresServer) -> None:
    """Restart the throwaway server with fsync on (a ledger's commit is then on disk, as SQLite's is)."""
    server.stop("fast")
    options = (
        f"-p {server.port} -k {server.base} -c listen_addresses=127.0.0.1 -c fsync=on "
        "-c max_connections=200 -c shared_buffers=32MB"
    )
    server._run(  # the helper's own runner (as the postgres user when we are root)
        "pg_ctl", "-D", str(server.data), "-l", str(server.log), "-o", options, "-w", "-t", "60", "start"
    )
    assert server.psql("SHOW fsync").strip() == "on"


def bench_session(origin_port: int) -> Session:
    return lease_session(f"http://127.0.0.1:{origin_port}/s/", Account.create())


async def seed_postgres(url: str, session: Session) -> None:
    ledger = await PostgresLedgerStore.open(url)
    try:
        store = await PostgresSessionStore.open(ledger, None)  # no wallet on the proxy: no sealing key
        await store.save([session])
    finally:
        await ledger.close()


def session_hits(args: argparse.Namespace, work: Path, pg: PostgresServer) -> dict[str, Any]:
    origin_port = free_port()
    nginx = harness.start_nginx(work, origin_port, f'    location / {{ return 200 "{"x" * 100}"; }}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    base = (
        '[log]\nlevel = "warning"\naccess_log = false\n'
        '[sessions]\ncredential_kinds = ["cookies", "session_token", "token_headers"]\n'
    )
    proxies: dict[str, ProxyProcess] = {}
    try:
        sqlite_home = work / "hits-sqlite"
        sqlite_home.mkdir(mode=0o700)
        seed_sqlite(sqlite_home, bench_session(origin_port))
        url = pg.new_database("hits")
        asyncio.run(seed_postgres(url, bench_session(origin_port)))
        pg_home = work / "hits-pg"
        pg_home.mkdir(mode=0o700)
        proxies["sqlite"] = ProxyProcess(sqlite_home, base, env).start()
        proxies["postgres"] = ProxyProcess(pg_home, f'{base}[store]\nurl = "{url}"\n', env).start()
        for proxy in proxies.values():
            harness.pin_proxy(proxy.pid(), args.nice)
        hit_url = f"http://127.0.0.1:{origin_port}/s/x"
        for name, proxy in proxies.items():  # both really hit: X-402-Proxy-Session names the session
            answer = requests.get(hit_url, proxies={"http": proxy.url}, timeout=10)
            assert answer.headers.get("X-402-Proxy-Session"), (name, answer.headers)
        script = harness.wrk_script(hit_url)
        for proxy in proxies.values():
            harness.wrk(proxy.port, script, args.warmup, args.connections, work, proxy.pid())
        rounds: dict[str, list[harness.WrkRound]] = {name: [] for name in proxies}
        for _ in range(args.rounds):
            for name, proxy in proxies.items():
                rounds[name].append(
                    harness.wrk(proxy.port, script, args.duration, args.connections, work, proxy.pid())
                )
        rps = {name: [r.rps for r in rs] for name, rs in rounds.items()}
        ratio = harness.median(rps["postgres"]) / harness.median(rps["sqlite"])
        return {
            "sqlite_rps_median": round(harness.median(rps["sqlite"])),
            "postgres_rps_median": round(harness.median(rps["postgres"])),
            "ratio": round(ratio, 3),
            "spread_sqlite": harness.spread(rps["sqlite"]),
            "spread_postgres": harness.spread(rps["postgres"]),
            "proxy_us_per_hit_sqlite": round(
                harness.median([r.proxy_us_per_request for r in rounds["sqlite"]]), 1
            ),
            "proxy_us_per_hit_postgres": round(
                harness.median([r.proxy_us_per_request for r in rounds["postgres"]]), 1
            ),
            "target": HIT_TARGET,
            "status": harness.verdict(ratio >= HIT_TARGET),
            "rounds": rps,
        }
    finally:
        for proxy in proxies.values():
            proxy.stop()
        harness.stop(nginx)


def paid_overhead(args: argparse.Namespace, work: Path, pg: PostgresServer) -> dict[str, Any]:
    stack = start_stack(work / "stack")
    proxies: dict[str, ProxyProcess] = {}
    try:
        extra = '[sessions]\nenabled = false\n[log]\nlevel = "debug"\naccess_log = false\n'
        policy = 'daily_budget = "1000"\nper_host_daily_budget = "1000"'
        url = pg.new_database("paid")
        proxies["sqlite"] = start_paying_proxy(stack, work / "paid-sqlite", policy=policy, extra=extra)
        proxies["postgres"] = start_paying_proxy(
            stack, work / "paid-pg", policy=policy, extra=f'{extra}[store]\nurl = "{url}"\n'
        )
        for proxy in proxies.values():
            harness.pin_proxy(proxy.pid(), args.nice)
        paid_url = f"{stack.express_v2}/paid/a"
        times: dict[str, list[float]] = {name: [] for name in proxies}
        for proxy in proxies.values():  # warm: first payment, connections, caches
            assert requests.get(paid_url, proxies={"http": proxy.url}, timeout=60).status_code == 200
        for _ in range(args.paid_requests):
            for name, proxy in proxies.items():
                t = time.perf_counter()
                answer = requests.get(paid_url, proxies={"http": proxy.url}, timeout=60)
                times[name].append(time.perf_counter() - t)
                assert answer.status_code == 200, (name, answer.status_code)
        overheads = {
            name: [float(m) for m in OVERHEAD.findall(proxy.log_text())][1:]
            for name, proxy in proxies.items()
        }
        med = {name: statistics.median(values) for name, values in overheads.items()}
        extra_ms = med["postgres"] - med["sqlite"]
        return {
            "paid_requests_each": args.paid_requests,
            "sqlite_overhead_ms_median": round(med["sqlite"], 3),
            "postgres_overhead_ms_median": round(med["postgres"], 3),
            "postgres_minus_sqlite_ms": round(extra_ms, 3),
            "sqlite_overhead_ms_p90": round(statistics.quantiles(overheads["sqlite"], n=10)[-1], 3),
            "postgres_overhead_ms_p90": round(statistics.quantiles(overheads["postgres"], n=10)[-1], 3),
            "sqlite_paid_request_ms_median": round(statistics.median(times["sqlite"]) * 1000, 2),
            "postgres_paid_request_ms_median": round(statistics.median(times["postgres"]) * 1000, 2),
            "target_extra_ms": PAID_EXTRA_TARGET_MS,
            "status": harness.verdict(extra_ms <= PAID_EXTRA_TARGET_MS),
            "overheads_ms": {k: [round(x, 3) for x in v] for k, v in overheads.items()},
        }
    finally:
        for proxy in proxies.values():
            proxy.stop()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--paid-requests", type=int, default=60)
    parser.add_argument("--only", choices=("hits", "paid"), default=None)
    parser.add_argument("--fsync-off", action="store_true", help="leave the test server's fsync=off")
    parser.add_argument("--nice", type=int, default=None, help="priority mode (root), as bench/run.py")
    args = parser.parse_args()
    missing = harness.require("nginx", "wrk", "taskset")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    harness.setup_cpus(args.nice)
    work = Path(tempfile.mkdtemp(prefix="x402-fleet-bench-"))
    pg = launch()  # on CPU 0, inherited from this script
    result: dict[str, Any] = {}
    try:
        if not args.fsync_off:
            durable(pg)
        result["postgres_fsync"] = pg.psql("SHOW fsync").strip()
        if args.only in (None, "hits"):
            result["session_hits"] = session_hits(args, work, pg)
        if args.only in (None, "paid"):
            result["paid_overhead"] = paid_overhead(args, work, pg)
    finally:
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        shutil.rmtree(pg.base, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = []
    hits = result.get("session_hits")
    if hits:
        lines.append(
            f"session hit, PostgreSQL {hits['postgres_rps_median']} req/s vs SQLite "
            f"{hits['sqlite_rps_median']} req/s, ratio {hits['ratio']} (>= {HIT_TARGET}) {hits['status']}"
        )
    paid = result.get("paid_overhead")
    if paid:
        lines.append(
            f"paid overhead median PostgreSQL {paid['postgres_overhead_ms_median']} ms vs SQLite "
            f"{paid['sqlite_overhead_ms_median']} ms, +{paid['postgres_minus_sqlite_ms']} ms "
            f"(<= +{PAID_EXTRA_TARGET_MS} ms) {paid['status']}"
        )
    result["verdicts"] = lines
    harness.write_results("fleet_store", result)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
