"""Targets (ratios from one run) and the printed report."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any


def _get(res: dict[str, Any], scen: str, row: str, fld: str = "median") -> float | None:
    r = res.get(scen, {}).get("rows", {}).get(row)
    if not r or r.get("status") != "ok":
        return None
    v = r.get(fld)
    return float(v) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


# (name, value function, op, threshold, unit)
TARGETS: list[tuple[str, Callable[[dict[str, Any]], float | None], str, float, str]] = [
    (
        "plain HTTP: x402-proxy / tinyproxy",
        lambda r: _ratio(_get(r, "plain_http", "x402"), _get(r, "plain_http", "tinyproxy")),
        ">=",
        2.0,
        "x",
    ),
    (
        "plain HTTP: x402-proxy / mitmproxy",
        lambda r: _ratio(_get(r, "plain_http", "x402"), _get(r, "plain_http", "mitmproxy")),
        ">=",
        10.0,
        "x",
    ),
    (
        "plain HTTP: default config (access log on) / access log off",
        lambda r: _ratio(_get(r, "plain_http", "x402default"), _get(r, "plain_http", "x402")),
        ">=",
        0.85,
        "x",
    ),
    (
        "HTTPS intercepted / plain HTTP (x402-proxy, same client)",
        lambda r: _ratio(_get(r, "https", "x402_https"), _get(r, "https", "x402_http")),
        ">=",
        0.6,
        "x",
    ),
    (
        "added p50 latency over direct (ms)",
        lambda r: _diff(_get(r, "latency", "x402", "p50_ms"), _get(r, "latency", "direct", "p50_ms")),
        "<=",
        0.2,
        "ms",
    ),
    (
        "streaming: x402-proxy RSS growth (MiB, max of rounds)",
        lambda r: _get(r, "streaming", "x402", "rss_growth_mib_max"),
        "<=",
        32.0,
        "MiB",
    ),
    (
        "streaming: x402-proxy / direct throughput",
        lambda r: _ratio(_get(r, "streaming", "x402"), _get(r, "streaming", "direct")),
        ">=",
        0.5,
        "x",
    ),
    (
        "paid request: proxy overhead, median (ms)",
        lambda r: _get(r, "paid", "x402_paid"),
        "<=",
        5.0,
        "ms",
    ),
]


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, fn, op, thr, unit in TARGETS:
        v = fn(res)
        if v is None:
            status = "n/a"
        else:
            status = "PASS" if (v >= thr if op == ">=" else v <= thr) else "FAIL"
        out.append({"target": name, "value": v, "op": op, "threshold": thr, "unit": unit, "status": status})
    return out


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "MB/s":
        return f"{v:,.1f}"
    return f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def render(res: dict[str, Any], targets: list[dict[str, Any]], nice: int = 0) -> str:
    lines: list[str] = []
    for scen in res.values():
        rows = scen["rows"]
        lines += ["", scen["title"]]
        unit = scen["unit"]
        ref = rows.get("direct", {})
        if unit == "ms":
            lines.append(
                f"  {'contender':<32}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'req/s':>9}"
                f"{'CPU':>10}"
            )
        elif unit == "paid":
            lines.append(
                f"  {'contender':<32}{'median ms':>10}{'p90 ms':>9}{'paid req ms':>13}{'free req ms':>13}"
            )
        elif unit == "MB/s":
            lines.append(
                f"  {'contender':<32}{'MB/s':>9}{'÷direct':>9}{'RSS before':>12}{'peak':>9}{'growth':>9}"
                f"{'CPU':>10}"
            )
        elif unit:
            lines.append(f"  {'contender':<32}{'median':>9}{'x402÷':>8}{'spread':>8}{'CPU':>10}  rounds")
        for key, row in rows.items():
            label = row["label"]
            if row.get("status") != "ok":
                reason = row.get("reason", row.get("status"))
                shown = reason if row.get("status") == "pending" else f"n/a ({reason})"
                lines.append(f"  {label:<32}{shown}")
                continue
            cpu = f"{_pct(row.get('loadgen_cpu'))}/{_pct(row.get('proxy_cpu'))}"
            if unit == "paid":
                lines.append(
                    f"  {label:<32}{row['median']:>10.3f}{row['p90']:>9.3f}"
                    f"{_fmt(row.get('paid_ms'), 'ms'):>13}{_fmt(row.get('free_ms'), 'ms'):>13}"
                )
            elif unit == "ms":
                ok = ref.get("status") == "ok"
                d50 = _diff(row.get("p50_ms"), ref.get("p50_ms")) if ok else None
                d99 = _diff(row.get("p99_ms"), ref.get("p99_ms")) if ok else None
                lines.append(
                    f"  {label:<32}{_fmt(row['p50_ms'], 'ms'):>9}{_fmt(row['p99_ms'], 'ms'):>9}"
                    f"{_fmt(d50, 'ms'):>9}{_fmt(d99, 'ms'):>9}{row['median']:>9,.0f}{cpu:>10}"
                )
            elif unit == "MB/s":
                r = _ratio(row["median"], ref.get("median")) if ref.get("status") == "ok" else None
                rs = f"{'':>12}{'':>9}{'':>9}"
                if "rss_growth_mib_max" in row:
                    rs = (
                        f"{row['rss_before_mib']:>9.1f}MiB{row['rss_peak_mib_max']:>6.1f}MiB"
                        f"{row['rss_growth_mib_max']:>6.1f}MiB"
                    )
                rr = f"{r:.2f}x" if r is not None else "n/a"
                lines.append(f"  {label:<32}{_fmt(row['median'], unit):>9}{rr:>9}{rs}{cpu:>10}")
            else:
                suffix = key[len(key.split("_")[0]) :]
                x = rows.get("x402" + suffix, {})
                vs = _ratio(x.get("median"), row["median"]) if x.get("status") == "ok" else None
                rounds = ", ".join(
                    _fmt(v, unit) + ("*" if d.get("noisy") else "")
                    for v, d in zip(row["rounds"], row["details"], strict=True)
                )
                vss = f"{vs:.2f}x" if vs is not None else "n/a"
                lines.append(
                    f"  {label:<32}{_fmt(row['median'], unit):>9}{vss:>8}{row['spread_pct']:>7.1f}%"
                    f"{cpu:>10}  [{rounds}]"
                )
            errs = [d.get("errors") for d in row.get("details", []) if isinstance(d.get("errors"), dict)]
            if errs and any(
                e.get("read") or e.get("connect") or e.get("timeout") or e.get("status") for e in errs
            ):
                tot = {k: sum(e[k] for e in errs) for k in ("connect", "read", "timeout", "status")}
                why = ""
                if key == "tinyproxy" and tot["read"]:
                    why = "; tinyproxy closes the client connection after each response, wrk reconnects"
                lines.append(f"  {'':<32}(client-side errors, all rounds: {tot}{why})")
    lines += [
        "",
        "  CPU = cores used by load generator + origin / by the proxy's process tree (median of rounds);",
        "  a proxy-bound row shows the proxy near 100%.",
    ]
    foreign = [
        d["foreign_cores"]
        for scen in res.values()
        for r in scen["rows"].values()
        for d in r.get("details", [])
        if "foreign_cores" in d
    ]
    if foreign:
        lines.append(
            f"  Other processes on the machine used {statistics.mean(foreign):.2f} cores on average during"
            f" the rounds (max {max(foreign):.2f})"
            + (f"; priority mode (--nice {nice}) was on." if nice else ".")
        )
    noisy = sum(r.get("noisy_rounds", 0) for scen in res.values() for r in scen["rows"].values())
    if noisy:
        lines.append(
            f"  * {noisy} round(s) ran while other processes on the machine used more than the noise"
            " threshold of CPU, even after repeats; treat them with care (results.json has details)."
        )
    lines += ["", "Targets (ratios from this run)"]
    for t in targets:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.2f}x" if t["unit"] == "x" else f"{v:.3f} {t['unit']}")
        thr = f"{t['threshold']}{'x' if t['unit'] == 'x' else ' ' + t['unit']}"
        lines.append(f"  [{t['status']:>4}] {t['target']:<58} {shown:>12}  (target {t['op']} {thr})")
    return "\n".join(lines)
