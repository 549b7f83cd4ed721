#!/usr/bin/env python3
"""`make bench`: x402-proxy side by side with direct, tinyproxy and mitmproxy.

Everything runs on this machine and talks only to 127.0.0.1:

* origin: nginx (generated config under .bench/nginx) serving a 100-byte body
  over HTTP and HTTPS (self-signed CA under .bench/pki) plus a large sparse file
  for the streaming test;
* contenders, all started once and kept running, measured round-robin so slow
  drift of the machine hits every contender alike: direct (no proxy),
  x402-proxy, tinyproxy, mitmproxy (mitmdump from its own venv .bench/mitm-venv);
* load generators: wrk (plain HTTP throughput and single-connection latency),
  bench/loadclient.py (CONNECT + TLS keep-alive throughput, and the same client
  for plain HTTP so the HTTPS/HTTP ratio is apples to apples), curl (streaming).

CPU pinning (2-core machine): load generator, origin and this orchestrator on
the first CPU; every proxy on the second CPU, so each proxy gets one whole core
to itself and never competes with the load it is measured under. Exceptions,
each explained where it happens: the latency scenario puts everything on one
CPU (no cross-CPU wakeups), the streaming reference gives direct two CPUs.

Prints a table (medians of N rounds, and ratios) and writes .bench/results.json. The parts live in
bench/: procs.py (processes), noise.py, origin.py, contenders.py, runners.py (load generators),
measure.py (rounds), scenarios.py, report.py (targets, table), versions.py.
Stdlib + `cryptography` (a project dependency); run with the project venv's
interpreter (uvloop is used by the load client when importable).
`bash bench/setup.sh` installs the tools. Method and results: docs/benchmarks.md.
Scenario 5 runs bench/paid_overhead.py (the x402 stack from tests/stack).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.contenders import start_mitm, start_tinyproxy, start_x402
from bench.context import Contender, Ctx
from bench.noise import NoiseMonitor
from bench.origin import start_origin
from bench.paths import ROOT, WORK
from bench.procs import Procs, log
from bench.report import evaluate_targets, render
from bench.scenarios import ORDER, PLAIN_ONLY, SCENARIOS
from bench.versions import cpu_model, dpkg_version, git_describe, pkg_version, version_of
from tests.support.processes import renice_self


def parse_cpus(s: str) -> set[int] | None:
    if s in ("", "none"):
        return None
    out: set[int] = set()
    for part in s.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def default_cpus() -> tuple[str, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "none", "none"
    return str(cpus[0]), str(cpus[1])


def main() -> int:
    lg, px = default_cpus()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured round")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of untimed warmup per row")
    ap.add_argument("--connections", type=int, default=50, help="concurrent connections (all contenders)")
    ap.add_argument("--stream-mib", type=int, default=1024)
    ap.add_argument("--stream-rounds", type=int, default=3)
    ap.add_argument("--loadgen-cpus", default=lg, help="CPUs for load generator + origin (e.g. 0, 'none')")
    ap.add_argument("--proxy-cpus", default=px, help="CPUs for the proxy under test (e.g. 1, 'none')")
    ap.add_argument(
        "--origin-cpus", default="loadgen", help="CPUs for nginx (default: same as load generator)"
    )
    ap.add_argument(
        "--latency-layout",
        choices=("onecpu", "split"),
        default="onecpu",
        help="scenario 3: everything on the proxy CPU (default) or the throughput pinning",
    )
    ap.add_argument("--only", default="", help=f"comma list of scenarios: {','.join(SCENARIOS)}")
    ap.add_argument(
        "--contenders",
        default=",".join(ORDER + PLAIN_ONLY),
        help="comma list of " + ",".join(ORDER + PLAIN_ONLY),
    )
    ap.add_argument("--https-client", choices=("python", "hey"), default="python")
    ap.add_argument("--x402-bin", default=str(ROOT / ".venv" / "bin" / "x402-proxy"))
    ap.add_argument(
        "--x402-config-extra",
        default=os.environ.get("X402_BENCH_CONFIG_EXTRA", ""),
        help="TOML file appended to the generated x402-proxy config",
    )
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument(
        "--noise-threshold",
        type=float,
        default=0.15,
        help="a round during which other processes used more CPU cores than this is noisy",
    )
    ap.add_argument("--noise-retries", type=int, default=2, help="repeat a noisy round up to N times")
    ap.add_argument(
        "--noise-budget",
        type=float,
        default=90.0,
        help="total seconds the run may spend repeating noisy rounds / waiting for quiet",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="max seconds to wait for the machine to calm down before a repeat / the start",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=int(os.environ.get("BENCH_NICE", "0")),
        help="nice value for every benchmark process (e.g. -10 on a shared machine; needs root). "
        "It slows down everything else running on the machine meanwhile.",
    )
    ap.add_argument("--paid-requests", type=int, default=60, help="paid requests in scenario 5")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, no warmup, 256 MiB stream")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every target PASSes")
    ap.add_argument("--json", default=str(WORK / "results.json"))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.warmup, a.stream_mib, a.stream_rounds = 1, 2, 0, 256, 1

    for tool in ("nginx", "wrk", "curl") + (("hey",) if a.https_client == "hey" else ()):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"missing {tool}: run `bash bench/setup.sh` (or `make apt-bench`)", file=sys.stderr)
            return 2

    WORK.mkdir(exist_ok=True)
    Procs.reap_stale()
    nice = 0
    if a.nice:
        try:
            renice_self(a.nice)
            nice = a.nice
        except OSError as e:
            log(f"cannot set nice {a.nice} ({e}); running at default priority")
            a.nice = 0
    loadgen, proxy_cpus = parse_cpus(a.loadgen_cpus), parse_cpus(a.proxy_cpus)
    if loadgen:
        os.sched_setaffinity(0, loadgen)  # the orchestrator stays off the proxy's core
    origin_cpus = loadgen if a.origin_cpus == "loadgen" else parse_cpus(a.origin_cpus)
    ctx = Ctx(a, Procs(nice), loadgen, proxy_cpus, origin_cpus)
    ctx.noise = NoiseMonitor(ctx.procs)
    only = [s for s in a.only.split(",") if s] or list(SCENARIOS)
    wanted = [c for c in a.contenders.split(",") if c]
    t_start = time.monotonic()

    def _term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _term)

    meta: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {
            "cpu": cpu_model(),
            "ncpu": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "config": {k: v for k, v in vars(a).items()},
        "pinning": {
            "loadgen_and_origin": sorted(loadgen) if loadgen else None,
            "proxies": sorted(proxy_cpus) if proxy_cpus else None,
            "origin": sorted(origin_cpus) if origin_cpus else None,
        },
    }
    res: dict[str, Any] = {}
    interrupted = False
    try:
        f = ctx.noise.wait_quiet(a.noise_threshold, 0 if nice < 0 else a.quiet_wait)
        meta["foreign_cores_at_start"] = f
        log("starting origin (nginx)")
        start_origin(ctx)
        ctx.contenders["direct"] = Contender("direct", "direct (no proxy)", ca_file=ctx.origin_ca)
        starters: dict[str, Callable[[Ctx], Contender]] = {
            "x402": start_x402,
            "x402default": lambda ctx: start_x402(ctx, "x402default", default_config=True),
            "tinyproxy": start_tinyproxy,
            "mitmproxy": start_mitm,
        }
        for key, fn in starters.items():
            if key in wanted:
                log(f"starting {key}")
                c = fn(ctx)
                ctx.contenders[key] = c
                log(
                    f"{key}: {c.unavailable or 'up'}"
                    + (f"; HTTPS: {c.https_unavailable or 'intercepting'}" if key != "tinyproxy" else "")
                )
        meta["versions"] = {
            "nginx": version_of(["nginx", "-v"]),
            "tinyproxy": ctx.contenders.get("tinyproxy", Contender("", "")).version,
            "mitmproxy": ctx.contenders.get("mitmproxy", Contender("", "")).version,
            "x402-proxy": pkg_version("x402-proxy"),
            "aiohttp": pkg_version("aiohttp"),
            "uvloop": pkg_version("uvloop"),
            "wrk": dpkg_version("wrk"),
            "hey": dpkg_version("hey"),
            "curl": version_of(["curl", "--version"]),
            "openssl": version_of(["openssl", "version"]),
            "x402-proxy-git": git_describe(),
        }
        meta["contenders"] = {
            k: {
                "port": c.port,
                "unavailable": c.unavailable,
                "https_unavailable": c.https_unavailable,
                "probe": c.probe,
            }
            for k, c in ctx.contenders.items()
        }
        for name in only:
            if name not in SCENARIOS:
                raise SystemExit(f"unknown scenario {name}")
            log(f"scenario {name}")
            res[name] = SCENARIOS[name](ctx)
            # a contender that died mid-run must not be reported as fine
            for c in ctx.contenders.values():
                if c.proc is not None and c.proc.poll() is not None and not c.unavailable:
                    c.unavailable = f"died during {name} (exit {c.proc.returncode})"
                    log(f"{c.key}: {c.unavailable}")
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({e}); tearing down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abort the teardown
        t0 = time.monotonic()
        ctx.procs.stop_all()
        log(f"all benchmark processes stopped ({time.monotonic() - t0:.1f}s)")
    targets = evaluate_targets(res)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report = render(res, targets, nice)
    commit = meta.get("versions", {}).get("x402-proxy-git", "?")
    print(
        f"\nx402-proxy benchmark  {meta['started']}  (checkout {commit}, {meta['elapsed_s']} s,"
        f" rounds={a.rounds} x {a.duration}s after {a.warmup}s warmup, median)"
        f"\npinning: load generator on CPU {a.loadgen_cpus},"
        f" origin on CPU {a.loadgen_cpus if a.origin_cpus == 'loadgen' else a.origin_cpus},"
        f" proxy under test on CPU {a.proxy_cpus}"
    )
    print(report)
    out = {"meta": meta, "scenarios": res, "targets": targets, "interrupted": interrupted}
    Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {a.json}")
    if interrupted:
        return 130
    if a.strict and any(t["status"] != "PASS" for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
