"""Load runners: each returns {"value": float, ...details} or raises RunError."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from typing import Any

from bench.context import Contender, Ctx
from bench.paths import HERE
from tests.support.processes import LOOP, child_setup, kill_groups, rss_tree_kib, without_proxy_env


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.peak = max(self.peak, rss_tree_kib(self.pid))
            self.stop_evt.wait(self.interval)

    def finish(self) -> int:
        self.stop_evt.set()
        self.join()
        self.peak = max(self.peak, rss_tree_kib(self.pid))
        return self.peak


class RunError(Exception):
    pass


def run_wrk(
    ctx: Ctx, c: Contender, conns: int, duration: int, cpus: set[int] | str | None = "loadgen"
) -> dict[str, Any]:
    origin = f"{LOOP}:{ctx.http_port}"
    env = {"BENCH_HOST": origin, "BENCH_PATH": f"http://{origin}/small" if c.port else "/small"}
    target = c.proxy_url or f"http://{origin}"
    argv = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(conns),
        "-d",
        f"{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "wrk.lua"),
        f"{target}/",
    ]
    pin = ctx.loadgen_cpus if cpus == "loadgen" else cpus
    rc, out, err = ctx.procs.run(argv, pin, timeout=duration + 30, env=env)  # type: ignore[arg-type]
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
    if rc != 0 or line is None:
        raise RunError(f"wrk rc={rc}: {(err or out).strip()[-200:]}")
    r: dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
    secs = r["duration_us"] / 1e6
    ok = r["requests"] - r["errors"]["status"]
    if ok <= 0:
        raise RunError(f"wrk: no successful responses ({r['errors']})")
    r["rps"] = ok / secs
    r["value"] = r["rps"]
    return r


def run_loadclient(ctx: Ctx, c: Contender, scheme: str, conns: int, duration: float) -> dict[str, Any]:
    port = ctx.https_port if scheme == "https" else ctx.http_port
    argv = [
        sys.executable,
        str(HERE / "loadclient.py"),
        "load",
        f"{scheme}://{LOOP}:{port}/small",
        "-c",
        str(conns),
        "-d",
        str(duration),
    ]
    if c.port:
        argv += ["--proxy", c.proxy_url or ""]
    if scheme == "https":
        argv += ["--cafile", str(c.ca_file or ctx.origin_ca)]
    rc, out, err = ctx.procs.run(argv, ctx.loadgen_cpus, timeout=duration + 60)
    try:
        r = dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError) as e:
        raise RunError(f"loadclient rc={rc}: {err.strip()[-200:]}") from e
    if r["requests"] <= 0:
        raise RunError(f"loadclient: no successful responses ({r})")
    r["errors"] = {
        "connect": r["connect_errors"],
        "read": r["read_errors"],
        "timeout": 0,
        "status": r["non2xx"],
    }
    r["value"] = r["rps"]
    return r


def run_hey(ctx: Ctx, c: Contender, scheme: str, conns: int, duration: int) -> dict[str, Any]:
    """Cross-check client (--https-client hey). hey never verifies certificates."""
    port = ctx.https_port if scheme == "https" else ctx.http_port
    argv = ["hey", "-c", str(conns), "-z", f"{duration}s", "-disable-compression"]
    if c.port:
        argv += ["-x", c.proxy_url or ""]
    argv.append(f"{scheme}://{LOOP}:{port}/small")
    rc, out, err = ctx.procs.run(argv, ctx.loadgen_cpus, timeout=duration + 60)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    if rc != 0 or not m:
        raise RunError(f"hey rc={rc}: {(err or out).strip()[-200:]}")
    total = sum(codes.values())
    ok = codes.get("200", 0)
    if ok == 0:
        raise RunError(f"hey: no 200 responses ({codes}) {out[-200:]}")
    rps = float(m.group(1)) * ok / max(total, 1)
    return {"rps": rps, "value": rps, "codes": codes, "errors": "Error distribution" in out}


def run_curl_stream(ctx: Ctx, c: Contender) -> dict[str, Any]:
    size = ctx.args.stream_mib * 1024 * 1024
    argv = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "300",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    if c.port:
        argv += ["-x", c.proxy_url or ""]
    else:
        argv += ["--noproxy", "*"]
    argv.append(f"http://{LOOP}:{ctx.http_port}/big")
    sampler = None
    before = 0
    if c.proc is not None:
        before = rss_tree_kib(c.proc.pid)
        sampler = RssSampler(c.proc.pid)
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=without_proxy_env(),
        start_new_session=True,
        preexec_fn=child_setup(ctx.loadgen_cpus, ctx.procs.nice),
    )
    with ctx.procs.lock:
        ctx.procs.tools.add(p)
    if sampler:
        sampler.start()
    try:
        out_b, err_b = p.communicate(timeout=320)
    except subprocess.TimeoutExpired:
        kill_groups([(p.pid, p)], grace=0.5)
        out_b, err_b = p.communicate()
    finally:
        with ctx.procs.lock:
            ctx.procs.tools.discard(p)
        peak = sampler.finish() if sampler else 0
    wall = time.monotonic() - t0
    parts = out_b.decode().split()
    if p.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise RunError(f"curl rc={p.returncode} out={out_b.decode()!r} err={err_b.decode()[-200:]!r}")
    secs = float(parts[2]) or wall
    r: dict[str, Any] = {"bytes": size, "seconds": secs, "mb_s": size / secs / 1e6}
    r["value"] = r["mb_s"]
    if sampler:
        r.update(rss_before_kib=before, rss_peak_kib=peak, rss_growth_mib=(peak - before) / 1024)
    return r
