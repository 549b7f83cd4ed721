"""The five scenarios of bench/run.py (method: docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.context import Contender, Ctx
from bench.measure import Case, Runner, measure, median_of
from bench.paths import HERE
from bench.procs import ALL_CPUS
from bench.runners import RunError, run_curl_stream, run_hey, run_loadclient, run_wrk

ORDER = ("direct", "x402", "tinyproxy", "mitmproxy")
# Contenders that only scenario 1 measures: x402-proxy as people run it (access log on).
PLAIN_ONLY = ("x402default",)


def _cases(
    ctx: Ctx,
    keys: tuple[str, ...],
    make: Callable[[Contender], Runner],
    https: bool = False,
    suffix: str = "",
    label_suffix: str = "",
) -> list[Case]:
    out = []
    for k in keys:
        c = ctx.contenders.get(k)
        if c is None:
            continue
        why = c.unavailable or (c.https_unavailable if https else None)
        pid = c.proc.pid if c.proc is not None else None
        out.append(Case(k + suffix, c.label + label_suffix, why, None if why else make(c), pid))
    return out


def scenario_plain_http(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    keys = ("direct", "x402", "x402default", "tinyproxy", "mitmproxy")
    cases = _cases(ctx, keys, lambda c: lambda d: run_wrk(ctx, c, a.connections, int(d)))
    rows = measure(ctx, "plain_http", cases, a.warmup, a.duration, a.rounds, "req/s")
    return {
        "title": f"1. Plain HTTP keep-alive throughput (wrk, {a.connections} conns)",
        "unit": "req/s",
        "rows": rows,
    }


def scenario_https(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    conns = a.connections

    def mk(scheme: str) -> Callable[[Contender], Runner]:
        if a.https_client == "hey":
            return lambda c: lambda d: run_hey(ctx, c, scheme, conns, int(d))
        return lambda c: lambda d: run_loadclient(ctx, c, scheme, conns, d)

    cases = _cases(
        ctx, ("direct", "x402", "mitmproxy"), mk("https"), https=True, suffix="_https", label_suffix=" HTTPS"
    )
    cases += _cases(ctx, ("direct", "x402"), mk("http"), suffix="_http", label_suffix=" plain HTTP")
    rows = measure(ctx, "https", cases, a.warmup, a.duration, a.rounds, "req/s")
    client = "hey" if a.https_client == "hey" else "bench/loadclient.py"
    return {
        "title": f"2. Intercepted HTTPS keep-alive throughput via CONNECT ({client}, {conns} conns)",
        "unit": "req/s",
        "rows": rows,
    }


def set_tree_affinity(pid: int, cpus: set[int]) -> None:
    """Re-pin every thread of a running process tree."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            for t in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(t.name), cpus)
                    todo += [int(c) for c in (t / "children").read_text().split()]


def scenario_latency(ctx: Ctx) -> dict[str, Any]:
    """Sequential requests on one connection: only one process is ever runnable.

    Layout "onecpu" (default): wrk, the origin and the proxy all run on the
    proxy's CPU for this scenario. Nobody waits for a CPU (the exchange is
    strictly sequential) and no wakeup crosses CPUs: in this VM a cross-CPU
    wakeup costs tens of microseconds, and with the throughput layout a proxied
    request would pay four of them (wrk->proxy->origin->proxy->wrk) where a
    direct one pays none, which would be measured as "proxy latency".
    Layout "split" keeps the throughput pinning.
    """
    a = ctx.args
    origin = next((p for n, p in ctx.procs.services if n == "nginx"), None)
    wrk_cpus: set[int] | str | None = "loadgen"
    if a.latency_layout == "onecpu" and ctx.proxy_cpus and origin is not None:
        one = {min(ctx.proxy_cpus)}
        set_tree_affinity(origin.pid, one)
        for c in ctx.contenders.values():
            if c.proc is not None and c.proc.poll() is None:
                set_tree_affinity(c.proc.pid, one)
        wrk_cpus = one
    try:
        cases = _cases(
            ctx,
            ("direct", "x402", "tinyproxy"),
            lambda c: lambda d: run_wrk(ctx, c, 1, int(d), wrk_cpus),
        )
        rows = measure(ctx, "latency", cases, a.warmup, a.duration, a.rounds, "req/s")
    finally:
        if wrk_cpus != "loadgen" and origin is not None:
            set_tree_affinity(origin.pid, ctx.origin_cpus or set(os.sched_getaffinity(0)))
            for c in ctx.contenders.values():
                if c.proc is not None and c.proc.poll() is None and ctx.proxy_cpus:
                    set_tree_affinity(c.proc.pid, ctx.proxy_cpus)
    for row in rows.values():
        if row["status"] == "ok":
            row["p50_ms"] = median_of(row, lambda d: d["latency_us"]["p50"] / 1000)
            row["p99_ms"] = median_of(row, lambda d: d["latency_us"]["p99"] / 1000)
    where = f"all on CPU {min(ctx.proxy_cpus)}" if wrk_cpus != "loadgen" and ctx.proxy_cpus else "split CPUs"
    return {
        "title": f"3. Added latency, 1 connection, sequential keep-alive requests (wrk -c1, {where})",
        "unit": "ms",
        "rows": rows,
    }


def scenario_streaming(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    # warm the origin's page cache for the sparse file once, untimed
    with contextlib.suppress(RunError):
        run_curl_stream(ctx, Contender("direct", "direct"))
    origin = next((p for n, p in ctx.procs.services if n == "nginx"), None)
    two_cpus = bool(ctx.proxy_cpus) and origin is not None

    def direct_on_two_cpus(_d: float) -> dict[str, Any]:
        # A proxied download has two CPUs at work (curl+origin on one, the proxy on
        # the other); the reference gets the same two: the origin moves to the idle
        # proxy CPU for the duration.
        assert origin is not None and ctx.proxy_cpus
        set_tree_affinity(origin.pid, ctx.proxy_cpus)
        try:
            return run_curl_stream(ctx, ctx.contenders["direct"])
        finally:
            set_tree_affinity(origin.pid, ctx.origin_cpus or ALL_CPUS)

    cases = []
    if two_cpus and "direct" in ctx.contenders:
        cases.append(Case("direct", "direct (curl | origin, 2 CPUs)", None, direct_on_two_cpus))
        cases.append(
            Case(
                "direct_1cpu",
                "direct (curl+origin, 1 CPU)",
                None,
                lambda d: run_curl_stream(ctx, ctx.contenders["direct"]),
            )
        )
        cases += _cases(ctx, ("x402", "tinyproxy"), lambda c: lambda d: run_curl_stream(ctx, c))
    else:
        cases = _cases(ctx, ("direct", "x402", "tinyproxy"), lambda c: lambda d: run_curl_stream(ctx, c))
    rows = measure(ctx, "streaming", cases, 0, 0, a.stream_rounds, "MB/s")
    for row in rows.values():
        if row["status"] == "ok" and row["details"] and "rss_growth_mib" in row["details"][0]:
            row["rss_growth_mib_max"] = max(d["rss_growth_mib"] for d in row["details"])
            row["rss_peak_mib_max"] = max(d["rss_peak_kib"] for d in row["details"]) / 1024
            row["rss_before_mib"] = row["details"][0]["rss_before_kib"] / 1024
    return {"title": f"4. Streaming {a.stream_mib} MiB download (curl, 1 conn)", "unit": "MB/s", "rows": rows}


def scenario_paid(ctx: Ctx) -> dict[str, Any]:
    """Paid request overhead, via the lead's bench/paid_overhead.py.

    That script starts the local x402 stack (anvil, test token, reference
    facilitator, @x402/express V2 server, all on loopback) and a paying
    x402-proxy of its own, does N sequential paid requests and reports the
    proxy's own time from 402-in-hand to paid-retry-out (median, p90), plus
    end-to-end paid vs free request times. It is run unpinned (its stack has
    several processes) at the benchmark's priority, once.
    """
    a = ctx.args
    title = "5. Paid request overhead (402 in hand -> paid retry out, bench/paid_overhead.py)"
    script = HERE / "paid_overhead.py"
    row: dict[str, Any] = {"label": "x402-proxy paying", "unit": "ms", "rounds": [], "details": []}
    x = ctx.contenders.get("x402")
    if not script.exists():
        row.update(status="pending", reason="pending: bench/paid_overhead.py not present")
    elif x is None or x.unavailable:
        row.update(status="n/a", reason=f"x402-proxy {x.unavailable if x else 'not selected'}")
    else:
        argv = [sys.executable, str(script), "--requests", str(a.paid_requests)]
        rc, out, err = ctx.procs.run(argv, ALL_CPUS, timeout=300)
        try:
            res = dict(json.loads(out[out.index("{") : out.rindex("}") + 1]))
            row.update(
                status="ok",
                median=float(res["overhead_ms_median"]),
                p90=float(res["overhead_ms_p90"]),
                paid_ms=res.get("paid_request_ms_median"),
                free_ms=res.get("free_request_ms_median"),
                target_ms=res.get("target_ms"),
                rounds=[float(res["overhead_ms_median"])],
                details=[res],
            )
        except (ValueError, KeyError) as e:
            tail_ = (err or out).strip().splitlines()[-1:] or ["no output"]
            row.update(status="n/a", reason=f"failed (rc={rc}, {type(e).__name__}): {tail_[0][:200]}")
    return {"title": title, "unit": "paid", "rows": {"x402_paid": row}}


SCENARIOS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "plain_http": scenario_plain_http,
    "https": scenario_https,
    "latency": scenario_latency,
    "streaming": scenario_streaming,
    "paid": scenario_paid,
}
