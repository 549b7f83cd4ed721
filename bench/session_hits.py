"""Session-hit throughput vs plain pass-through, measured side by side in one run.

A fresh proxy home is seeded with one active session (lease header + signed session token, the
credential kinds that need no per-request signature) scoped to `http://ORIGIN/s/`. wrk then drives
requests for `/s/x` (session hit: index lookup + credentials attached) and `/p/x` (no session:
plain pass-through) against the same proxy and nginx origin, in interleaved rounds.

    .venv/bin/python bench/session_hits.py [--rounds 5 --duration 4 --connections 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.sessions.model import Session, SessionCredentials  # noqa: E402
from proxy.sessions.scope import Scope  # noqa: E402
from proxy.store.session_store import SqliteSessionStore  # noqa: E402
from proxy.tokens import SessionClaim, make_session_token  # noqa: E402
from tests.support.processes import die_with_parent, free_port  # noqa: E402
from tests.support.proxy_process import ProxyProcess  # noqa: E402


def start_nginx(work: Path, port: int) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/nginx.err;\ndaemon off;\n"
        "events { worker_connections 4096; }\n"
        "http { access_log off; keepalive_requests 1000000;\n"
        f'  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "{"x" * 100}"; }} }} }}\n'
    )
    # On the load generator's CPU, as in bench/run.py (--origin-cpus loadgen): the proxy's CPU is its own.
    proc = subprocess.Popen(
        ["taskset", "-c", "0", "nginx", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # nginx never outlives the benchmark
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start")


def wrk(proxy_port: int, url: str, duration: int, connections: int, work: Path) -> float:
    script = work / "abs.lua"
    script.write_text(f'wrk.path = "{url}"\n')
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{proxy_port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx responses:\n{out}")
    match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    assert match, out
    return float(match.group(1))


def prioritize(nice: int, pid: int | None = None) -> None:
    """Nice a process and its session's scheduling group (sched_autogroup ranks sessions by the latter)."""
    target = "self" if pid is None else str(pid)
    if pid is None:
        os.nice(nice - os.nice(0))
    else:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    try:
        Path(f"/proc/{target}/autogroup").write_text(str(nice))
    except OSError:
        pass  # no autogroup support: the plain nice value still applies


def lease_session(
    scope_url: str,
    account: LocalAccount,
    *,
    amount: int = 1000,
    asset: str = "0x" + "11" * 20,
    network: str = "eip155:84532",
    pay_to: str = "0x" + "22" * 20,
) -> Session:
    """The session these benches hit: a prefix scope, a lease header and a signed session token (the
    credential kinds that need no per-request signature). Also used by bench/fleet_store.py and
    bench/channel_requests.py."""
    session = Session.create(
        Scope.from_url(scope_url, "prefix"),
        now=time.time(),
        ttl_seconds=86400,
        payer=account.address,
        amount_paid=amount,
        asset=asset,
        network=network,
        decimals=6,
        pay_to=pay_to,
    )
    session.credentials = SessionCredentials(token_headers={"x-x402-lease": "bench-lease"})
    claim = SessionClaim.for_session(session, address=account.address, tx_hash="0x" + "33" * 32)
    session.credentials.session_token = make_session_token(claim, account)
    return session


def seed_sqlite(home: Path, session: Session) -> None:
    """`session` in the home's SQLite store, before the proxy starts."""
    store = SqliteSessionStore(home / "state.db")
    store.save([session])
    store.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="priority mode (root), as bench/run.py: this script, wrk, nginx and the proxy get nice N",
    )
    args = parser.parse_args()
    if args.nice is not None:
        prioritize(args.nice)
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (make apt-bench)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="x402-session-bench-"))
    origin_port = free_port()
    nginx = start_nginx(work, origin_port)
    home = work / "home"
    home.mkdir(mode=0o700)
    seed_sqlite(home, lease_session(f"http://127.0.0.1:{origin_port}/s/", Account.create()))
    config = (
        '[log]\nlevel = "warning"\naccess_log = false\n'
        '[sessions]\ncredential_kinds = ["cookies", "session_token", "token_headers"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    proxy = ProxyProcess(home, config, env)
    proxy.start()
    subprocess.run(["taskset", "-a", "-p", "-c", "1", str(proxy.pid())], check=True, capture_output=True)
    if args.nice is not None:
        prioritize(args.nice, proxy.pid())
    try:
        hit_url = f"http://127.0.0.1:{origin_port}/s/x"
        pass_url = f"http://127.0.0.1:{origin_port}/p/x"
        wrk(proxy.port, hit_url, 2, args.connections, work)  # warm-up
        hits, passes = [], []
        for _ in range(args.rounds):
            passes.append(wrk(proxy.port, pass_url, args.duration, args.connections, work))
            hits.append(wrk(proxy.port, hit_url, args.duration, args.connections, work))
        ratio = statistics.median(hits) / statistics.median(passes)
        result = {
            "session_hit_rps_median": round(statistics.median(hits)),
            "pass_through_rps_median": round(statistics.median(passes)),
            "ratio": round(ratio, 3),
            "target": 0.9,
            "status": "PASS" if ratio >= 0.9 else "FAIL",
            "rounds": {"hits": hits, "pass_through": passes},
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        proxy.stop()
        nginx.terminate()
        nginx.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
