#!/usr/bin/env python3
"""Start-up time and idle memory of x402-proxy against the bare imports it is built on (a step of
`make bench`).

Each round starts, on the same CPU and interleaved:

* the bare process: `python -c "import aiohttp, uvloop, ssl, httptools, cryptography"` (what any
  proxy on this stack loads), timed from exec to the end of its imports, its RSS read once it idles;
* x402-proxy with a wallet (`X402_PROXY_PRIVATE_KEY`) and the admin API on, on a home that exists
  (CA and state.db made by an untimed first start), timed from exec to the first accepted connection
  on the proxy port. Its RSS is read twice: at that moment, and idle once the warm-up (the paid path
  loaded in the background, proxy/warmup.py) has logged that it is done.

Targets (issue #14): exec -> accepting <= 2.5x and idle RSS <= 1.5x of the bare figures, medians of
the same run. Prints a table and writes .bench/footprint.json.

    .venv/bin/python bench/footprint.py [--rounds 5] [--cpu N] [--x402-bin PATH]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.processes import accepts, child_setup, free_port, rss_kib, without_proxy_env  # noqa: E402

WORK = ROOT / ".bench" / "footprint"
BARE = "import aiohttp, uvloop, ssl, httptools, cryptography"
# For context: the same plus the X.509 half of cryptography, which any TLS-intercepting proxy loads.
BARE_X509 = BARE + ", cryptography.x509"
# A well-known development key (anvil's first account): it never holds real money.
DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
WARM = re.compile(r"warm-up: paid path loaded")
TARGET_START = 2.5
TARGET_RSS = 1.5


def bare_round(cpu: set[int] | None, imports: str = BARE) -> dict[str, float]:
    code = f"{imports}\nimport sys\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\nsys.stdin.read()\n"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=without_proxy_env(),
        preexec_fn=child_setup(cpu),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        took = time.perf_counter() - started
        if line.strip() != b"ready":
            raise RuntimeError(f"bare process said {line!r}")
        time.sleep(1.0)
        rss = statistics.median(rss_samples(proc.pid))
        proc.stdin.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"start_s": took, "rss_mib": rss / 1024}


def rss_samples(pid: int, n: int = 5, every: float = 0.1) -> list[int]:
    out = []
    for _ in range(n):
        out.append(rss_kib(pid))
        time.sleep(every)
    return out


def proxy_round(
    exe: str, home: Path, config: Path, cpu: set[int] | None, timeout: float, warm_timeout: float
) -> dict[str, Any]:
    port = free_port()
    admin = free_port()
    config.write_text(f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
    log_path = home.parent / "proxy.log"
    argv = [exe, "--home", str(home), "--config", str(config), "run", "--listen", f"127.0.0.1:{port}"]
    env = {k: v for k, v in without_proxy_env().items() if not k.startswith("X402_PROXY_")}
    env["X402_PROXY_PRIVATE_KEY"] = DEV_KEY
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=child_setup(cpu),
        )
    try:
        deadline = started + timeout
        while not accepts(port):
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"x402-proxy did not accept: {log_path.read_text()[-1500:]}")
            time.sleep(0.002)
        took = time.perf_counter() - started
        admin_up = accepts(admin)
        at_accept = rss_kib(proc.pid)
        warm_at: float | None = None
        warm_deadline = time.perf_counter() + warm_timeout
        while time.perf_counter() < warm_deadline:  # a tree without a warm-up: idle after the timeout
            if proc.poll() is not None:
                raise RuntimeError(f"x402-proxy exited: {log_path.read_text()[-1500:]}")
            if WARM.search(log_path.read_text(errors="replace")):
                warm_at = time.perf_counter() - started
                break
            time.sleep(0.05)
        time.sleep(1.0)
        idle = statistics.median(rss_samples(proc.pid))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "start_s": took,
        "admin_up_at_accept": admin_up,
        "rss_at_accept_mib": at_accept / 1024,
        "warm_s": warm_at,
        "rss_mib": idle / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    cpus = sorted(os.sched_getaffinity(0))
    ap.add_argument("--cpu", type=int, default=cpus[-1], help="CPU both processes run on")
    ap.add_argument("--x402-bin", default=str(ROOT / ".venv" / "bin" / "x402-proxy"))
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--warm-timeout", type=float, default=10.0, help="seconds to wait for the warm-up line")
    ap.add_argument("--json", default=str(ROOT / ".bench" / "footprint.json"))
    a = ap.parse_args()
    cpu = {a.cpu}
    # Byte-compiled as an installed package is (the bare imports' site-packages are): where
    # PYTHONDONTWRITEBYTECODE is set, the editable install would compile its modules at every start.
    compileall.compile_dir(str(ROOT / "proxy"), quiet=1)
    shutil.rmtree(WORK, ignore_errors=True)
    home = WORK / "home"
    home.parent.mkdir(parents=True)
    config = WORK / "config.toml"
    proxy_round(a.x402_bin, home, config, cpu, a.timeout, 0.0)  # untimed: creates the CA and state.db
    bare: list[dict[str, float]] = []
    bare_x509: list[dict[str, float]] = []
    proxy: list[dict[str, Any]] = []
    for i in range(a.rounds):
        bare.append(bare_round(cpu))
        bare_x509.append(bare_round(cpu, BARE_X509))
        proxy.append(proxy_round(a.x402_bin, home, config, cpu, a.timeout, a.warm_timeout))
        print(
            f"[footprint] round {i + 1}/{a.rounds}: "
            f"bare {bare[-1]['start_s']:.3f} s {bare[-1]['rss_mib']:.1f} MiB;"
            f" x402-proxy {proxy[-1]['start_s']:.3f} s to accepting, {proxy[-1]['rss_at_accept_mib']:.1f} MiB"
            f" then, {proxy[-1]['rss_mib']:.1f} MiB idle after the warm-up"
            f" (admin up at accept: {proxy[-1]['admin_up_at_accept']})",
            file=sys.stderr,
            flush=True,
        )

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    warm = [r["warm_s"] for r in proxy if r["warm_s"] is not None]

    result = {
        "bare": {"start_s": med(bare, "start_s"), "rss_mib": med(bare, "rss_mib"), "rounds": bare},
        "bare_x509": {
            "start_s": med(bare_x509, "start_s"),
            "rss_mib": med(bare_x509, "rss_mib"),
            "rounds": bare_x509,
        },
        "x402": {
            "start_s": med(proxy, "start_s"),
            "rss_at_accept_mib": med(proxy, "rss_at_accept_mib"),
            "rss_mib": med(proxy, "rss_mib"),
            "warm_s": statistics.median(warm) if warm else None,
            "admin_up_at_accept": all(r["admin_up_at_accept"] for r in proxy),
            "rounds": proxy,
        },
        "cpu": a.cpu,
    }
    start_ratio = result["x402"]["start_s"] / result["bare"]["start_s"]
    rss_ratio = result["x402"]["rss_mib"] / result["bare"]["rss_mib"]
    accept_rss_ratio = result["x402"]["rss_at_accept_mib"] / result["bare"]["rss_mib"]
    bare_x509_rss = result["x402"]["rss_mib"] / result["bare_x509"]["rss_mib"]
    result["targets"] = {
        "rss_ratio_vs_bare_x509": round(bare_x509_rss, 3),
        "start_ratio": round(start_ratio, 3),
        "start_target": TARGET_START,
        "start_status": "PASS" if start_ratio <= TARGET_START else "FAIL",
        "rss_ratio": round(rss_ratio, 3),
        "rss_at_accept_ratio": round(accept_rss_ratio, 3),
        "rss_target": TARGET_RSS,
        "rss_status": "PASS" if rss_ratio <= TARGET_RSS else "FAIL",
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    b, x, t = result["bare"], result["x402"], result["targets"]
    bx = result["bare_x509"]
    warm_note = f"warm-up done at {x['warm_s']:.2f} s" if x["warm_s"] is not None else "no warm-up line"
    print(f"\nStart-up and idle memory (medians of {a.rounds} rounds, CPU {a.cpu})")
    print(f"  {'':<34}{'exec -> ready':>14}{'RSS':>11}")
    print(f"  {'bare imports':<34}{b['start_s']:>12.3f} s{b['rss_mib']:>7.1f} MiB")
    print(f"  {'bare imports + cryptography.x509':<34}{bx['start_s']:>12.3f} s{bx['rss_mib']:>7.1f} MiB")
    print(
        f"  {'x402-proxy (wallet, admin API)':<34}{x['start_s']:>12.3f} s{x['rss_mib']:>7.1f} MiB"
        f"  (at accept {x['rss_at_accept_mib']:.1f} MiB; {warm_note})"
    )
    print(f"  admin listener up whenever the proxy port accepted: {x['admin_up_at_accept']}")
    print(f"  [{t['start_status']}] exec -> accepting {t['start_ratio']:.2f}x (target <= {TARGET_START}x)")
    print(
        f"  [{t['rss_status']}] idle RSS {t['rss_ratio']:.2f}x (target <= {TARGET_RSS}x;"
        f" at accept {t['rss_at_accept_ratio']:.2f}x)"
    )
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
