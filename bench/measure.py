"""Measurement: a warmup per case, then rounds interleaved across the cases, noisy rounds repeated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.context import Ctx
from bench.procs import log
from bench.runners import RunError

Runner = Callable[[float], dict[str, Any]]


@dataclass
class Case:
    key: str  # row key in results
    label: str
    why: str | None  # reason it cannot run, or None
    fn: Runner | None  # fn(duration) -> {"value": ..., ...}
    pid: int | None = None  # proxy process whose CPU use is reported


def measure(
    ctx: Ctx, scenario: str, cases: list[Case], warmup: float, duration: float, rounds: int, unit: str
) -> dict[str, Any]:
    """Warm every case up once, then run `rounds` rounds, interleaving the cases.

    A round during which other processes on the machine used more than
    --noise-threshold cores is repeated (after waiting for quiet) up to
    --noise-retries times while the --noise-budget lasts; if it stays noisy it
    is kept and flagged.
    """
    a = ctx.args
    rows: dict[str, Any] = {}
    live = []
    for c in cases:
        rows[c.key] = {"label": c.label, "unit": unit, "rounds": [], "details": [], "errors": []}
        if c.why or c.fn is None:
            rows[c.key].update(status="n/a", reason=c.why or "not run")
        else:
            live.append(c)
    if warmup > 0:
        for c in live:
            try:
                assert c.fn is not None
                c.fn(warmup)
            except RunError as e:
                rows[c.key]["errors"].append(f"warmup: {e}")
    noise = ctx.noise
    for rnd in range(rounds):
        for c in live:
            assert c.fn is not None
            r: dict[str, Any] | None = None
            for attempt in range(a.noise_retries + 1):
                if attempt and noise is not None:
                    noise.wait_quiet(a.noise_threshold, a.quiet_wait)
                snap = noise.snapshot(c.pid) if noise else None
                t0 = time.monotonic()
                try:
                    r = c.fn(duration)
                except RunError as e:
                    rows[c.key]["errors"].append(str(e))
                    log(f"{scenario} round {rnd + 1}/{rounds} {c.key}: ERROR {e}")
                    r = None
                    break
                if noise is not None and snap is not None:
                    r.update(noise.since(snap))
                # In priority mode (--nice < 0) the benchmark pre-empts other work, so
                # their CPU use is reported but does not make a round noisy.
                noisy = ctx.procs.nice >= 0 and r.get("foreign_cores", 0.0) > a.noise_threshold
                r["noisy"] = noisy
                cpu = ""
                if "proxy_cpu" in r:
                    cpu = f"  proxy {100 * r['proxy_cpu']:.0f}% CPU"
                tag = f"  NOISY: other processes used {r['foreign_cores']:.2f} cores" if noisy else ""
                log(f"{scenario} round {rnd + 1}/{rounds} {c.key}: {r['value']:,.2f} {unit}{cpu}{tag}")
                if not noisy:
                    break
                if noise is not None:
                    noise.budget_used += time.monotonic() - t0
                if attempt < a.noise_retries and noise is not None and noise.budget_used < a.noise_budget:
                    log("  -> round discarded, will repeat it")
                    rows[c.key].setdefault("discarded", []).append(r["value"])
                else:
                    break
            if r is None:
                continue
            rows[c.key]["rounds"].append(r["value"])
            rows[c.key]["details"].append({k: v for k, v in r.items() if k != "value"})
    for c in live:
        row = rows[c.key]
        if row["rounds"]:
            row["median"] = statistics.median(row["rounds"])
            row["status"] = "ok"
            lo, hi = min(row["rounds"]), max(row["rounds"])
            row["spread_pct"] = 100.0 * (hi - lo) / row["median"] if row["median"] else 0.0
            row["noisy_rounds"] = sum(1 for d in row["details"] if d.get("noisy"))
            pc = [d["proxy_cpu"] for d in row["details"] if "proxy_cpu" in d]
            if pc:
                row["proxy_cpu"] = statistics.median(pc)
            lg = [d["bench_cpu"] for d in row["details"] if "bench_cpu" in d]
            if lg:
                row["loadgen_cpu"] = statistics.median(lg)
        else:
            row.update(status="n/a", reason=f"failed: {row['errors'][-1] if row['errors'] else '?'}")
    return rows


def median_of(row: dict[str, Any], path: Callable[[dict[str, Any]], float]) -> float | None:
    vals = [path(d) for d in row.get("details", [])]
    return statistics.median(vals) if vals else None
