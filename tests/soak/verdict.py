"""Pass/fail criteria of a soak run, its summary table and its JSON.

Flatness: the mean of the last window is within 10% of the mean of a baseline window. The window is a
tenth of the run, at least 10 s (60 s for the 10-minute run, 10 s for the 60-second one); the baseline
is the *second* window, because the first one is warm-up (imports, first TLS leaf certificates,
connection pools, SQLite pages, allocator arenas) and would make any later growth look like a leak.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.soak.load import Tally
from tests.soak.sampler import Sample

FLAT_TOLERANCE = 0.10
TASK_SLACK = 10
LOAD_KINDS = ("pass_http", "pass_https", "session_siwx", "session_token", "payment", "admin")


def windows(duration: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(baseline, final) windows in seconds since the load started."""
    width = max(10.0, duration / 10)
    if duration < 3 * width:
        raise ValueError(f"a soak needs at least {3 * width:.0f} s for its windows, got {duration}")
    return (width, 2 * width), (duration - width, duration)


@dataclass
class Flatness:
    name: str
    baseline_mean: float
    final_mean: float
    ratio: float
    passed: bool


def flatness(samples: list[Sample], name: str, duration: float) -> Flatness:
    (b0, b1), (f0, f1) = windows(duration)
    base = [getattr(s, name) for s in samples if b0 <= s.t < b1]
    last = [getattr(s, name) for s in samples if f0 <= s.t <= f1 + 1]  # +1: the closing sample lands late
    if not base or not last:
        raise ValueError(f"no {name} samples in a window: {len(base)} baseline, {len(last)} final")
    base_mean, last_mean = statistics.fmean(base), statistics.fmean(last)
    ratio = last_mean / base_mean
    return Flatness(
        name, round(base_mean, 1), round(last_mean, 1), round(ratio, 3), abs(ratio - 1) <= FLAT_TOLERANCE
    )


@dataclass
class Money:
    ledger_rows: int
    ledger_states: dict[str, int]
    settled_sum: int  # atomic units
    pay_to_delta: int
    payer_decrease: int
    payments_seen: int  # distinct ledger ids the load generator saw in answers
    ids_match: bool  # the ledger's ids are exactly those

    @property
    def passed(self) -> bool:
        return (
            self.settled_sum == self.pay_to_delta == self.payer_decrease
            and self.ledger_rows == self.payments_seen
            and self.ids_match
            and self.ledger_states == {"settled": self.ledger_rows}
        )


def money(rows: list[dict[str, Any]], seen: set[int], pay_to_delta: int, payer_decrease: int) -> Money:
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    settled = sum(int(row["amount"]) for row in rows if row["state"] == "settled")
    return Money(
        ledger_rows=len(rows),
        ledger_states=states,
        settled_sum=settled,
        pay_to_delta=pay_to_delta,
        payer_decrease=payer_decrease,
        payments_seen=len(seen),
        ids_match={int(row["id"]) for row in rows} == seen,
    )


@dataclass
class SoakResult:
    duration: float
    sample_interval: float
    tally: Tally
    samples: list[Sample]
    money: Money
    flat: list[Flatness] = field(default_factory=list)
    tasks: Flatness | None = None  # judged with slack: see `tasks_bounded`

    @property
    def tasks_bounded(self) -> bool:
        """A dozen tasks swing by a few with the requests in flight, so 10% of them is noise; a leak (one
        task per request or payment) grows by hundreds. Allowed: 10% or 10 tasks over the baseline."""
        if self.tasks is None:
            return False
        base = self.tasks.baseline_mean
        return self.tasks.final_mean <= max(base * (1 + FLAT_TOLERANCE), base + TASK_SLACK)

    @property
    def criteria(self) -> dict[str, bool]:
        t = self.tally
        ran = all(t.requests[k] > 0 for k in LOAD_KINDS) and t.session_hits["session_siwx"] > 0
        ran = ran and t.session_hits["session_token"] > 0 and t.paid_by_kind()["payment"] > 0
        return {
            "every kind of load ran (requests, session hits, payments)": ran,
            "zero proxy-caused 5xx": t.proxy_5xx == 0,
            "zero transport errors (resets, timeouts)": t.transport_errors == 0,
            "zero unexpected answers": t.unexpected == 0,
            **{f"{f.name} flat (within 10%)": f.passed for f in self.flat},
            "asyncio tasks bounded (10% or 10 tasks over the baseline)": self.tasks_bounded,
            "money: settled ledger == payTo delta == payer decrease": self.money.settled_sum
            == self.money.pay_to_delta
            == self.money.payer_decrease,
            "money: ledger rows == payments seen, all settled": self.money.passed,
        }

    @property
    def passed(self) -> bool:
        return all(self.criteria.values())

    def table(self) -> str:
        t = self.tally
        (b0, b1), (f0, f1) = windows(self.duration)
        lines = [f"soak: {self.duration:.0f} s, samples every {self.sample_interval:g} s", ""]
        lines.append(
            f"{'kind':<14}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}{'paid':>6}{'hits':>7}"
        )
        paid = t.paid_by_kind()
        for kind in LOAD_KINDS:
            lat = sorted(t.latencies.get(kind, [])) or [0.0]
            p50, p95 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.95)] * 1000
            lines.append(
                f"{kind:<14}{t.requests[kind]:>9}{t.requests[kind] / self.duration:>8.1f}"
                f"{p50:>8.1f}{p95:>8.1f}{paid[kind]:>6}{t.session_hits[kind]:>7}"
            )
        lines.append("")
        lines.append(f"5xx: {t.proxy_5xx} from the proxy, {t.upstream_5xx} from upstreams (deliberate 503s)")
        lines.append(f"transport errors: {t.transport_errors}, unexpected answers: {t.unexpected}")
        lines.append("")
        lines.append(f"resource       {'s ' + f'{b0:g}-{b1:g}':>12}{'s ' + f'{f0:g}-{f1:g}':>14}{'ratio':>8}")
        for f in [*self.flat, *([self.tasks] if self.tasks else [])]:
            lines.append(f"{f.name:<15}{f.baseline_mean:>12}{f.final_mean:>14}{f.ratio:>8}")
        m = self.money
        lines.append("")
        lines.append(f"ledger: {m.ledger_rows} rows {m.ledger_states}, seen by the load: {m.payments_seen}")
        lines.append(
            f"atomic units: settled {m.settled_sum}, payTo +{m.pay_to_delta}, payer -{m.payer_decrease}"
        )
        lines.append("")
        for name, ok in self.criteria.items():
            lines.append(f"{'PASS' if ok else 'FAIL'}  {name}")
        lines.append(f"\nsoak {'PASSED' if self.passed else 'FAILED'}")
        if t.problems:
            lines.append(f"first problems ({len(t.problems)} kept):")
            lines.extend(f"  {p}" for p in t.problems[:10])
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        t = self.tally
        return {
            "passed": self.passed,
            "criteria": self.criteria,
            "duration_s": self.duration,
            "sample_interval_s": self.sample_interval,
            "windows_s": dict(zip(("baseline", "final"), windows(self.duration), strict=True)),
            "requests": dict(t.requests),
            "statuses": dict(t.statuses),
            "latency_ms": {
                kind: {
                    "p50": round(sorted(v)[len(v) // 2] * 1000, 1),
                    "p95": round(sorted(v)[int(len(v) * 0.95)] * 1000, 1),
                    "max": round(max(v) * 1000, 1),
                }
                for kind, v in t.latencies.items()
                if v
            },
            "session_hits": dict(t.session_hits),
            "payments_by_kind": dict(t.paid_by_kind()),
            "proxy_5xx": t.proxy_5xx,
            "upstream_5xx": t.upstream_5xx,
            "transport_errors": t.transport_errors,
            "unexpected": t.unexpected,
            "problems": t.problems,
            "flatness": [asdict(f) for f in self.flat],
            "tasks": asdict(self.tasks) if self.tasks else None,
            "money": {**asdict(self.money), "passed": self.money.passed},
            "samples": [asdict(s) for s in self.samples],
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
