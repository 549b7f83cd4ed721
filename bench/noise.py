"""Noise on a shared machine: how much CPU other processes used during a round (docs/benchmarks.md)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.procs import Procs, log
from tests.support.processes import cpu_ticks_tree


class NoiseMonitor:
    """CPU accounting per round: foreign load, per-CPU busy, the proxy's own CPU.

    The machine may be shared (test suites, editors, other agents). Per round we
    compare all busy CPU ticks in /proc/stat with the ticks of our own processes
    (services' process trees + this orchestrator + reaped tool runs); the
    difference, in cores, is "foreign" load. With CONFIG_IRQ_TIME_ACCOUNTING off
    (the common default) softirq ticks are charged to the running task, so
    irq+softirq are counted as busy on both sides.

    Per-CPU busy fractions show where the bottleneck was: a proxy-bound round has
    the proxy CPU near 100 % and the load-generator CPU below it.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.budget_used = 0.0  # seconds spent waiting for quiet / repeating rounds

    @staticmethod
    def _stat() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in vals[:8])
            out[name] = (user + nice + system + irq + softirq, idle + iowait + steal, steal)
        return out  # type: ignore[return-value]

    @staticmethod
    def tree_ticks(pid: int) -> int:
        return cpu_ticks_tree(pid)

    def _ours(self) -> float:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        ticks = (me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime) * self.HZ
        for _, p in self.procs.services:
            if p.poll() is None:
                ticks += self.tree_ticks(p.pid)
        return ticks

    def snapshot(self, pid: int | None = None) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "stat": self._stat(),
            "ours": self._ours(),
            "pid": pid,
            "pid_ticks": self.tree_ticks(pid) if pid else 0,
        }

    def since(self, snap: dict[str, Any]) -> dict[str, Any]:
        now = self.snapshot(snap["pid"])
        wall = max(now["t"] - snap["t"], 1e-6)
        s0, s1 = snap["stat"], now["stat"]
        busy = s1["cpu"][0] - s0["cpu"][0]
        foreign = max(0.0, busy - (now["ours"] - snap["ours"])) / self.HZ / wall
        out: dict[str, Any] = {
            "foreign_cores": round(foreign, 3),
            "steal_cores": round((s1["cpu"][2] - s0["cpu"][2]) / self.HZ / wall, 3),
            "cpu_busy": {},
        }
        for name in s1:
            if name != "cpu" and name in s0:
                b = s1[name][0] - s0[name][0]
                tot = b + s1[name][1] - s0[name][1]
                out["cpu_busy"][name[3:]] = round(b / tot, 3) if tot else 0.0
        proxy = now["pid_ticks"] - snap["pid_ticks"] if snap["pid"] else 0
        if snap["pid"]:
            out["proxy_cpu"] = round(proxy / self.HZ / wall, 3)
        # everything of ours that is not the proxy: load generator, origin, orchestrator
        out["bench_cpu"] = round((now["ours"] - snap["ours"] - proxy) / self.HZ / wall, 3)
        return out

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait (up to max_wait s) for a 1 s window with foreign load under threshold."""
        t0 = time.monotonic()
        end = t0 + max_wait
        said = False
        while True:
            snap = self.snapshot()
            time.sleep(1.0)
            f = float(self.since(snap)["foreign_cores"])
            if f < threshold or time.monotonic() >= end:
                if said:
                    state = "quiet" if f < threshold else "still busy"
                    log(f"  ...{state} after {time.monotonic() - t0:.0f}s")
                self.budget_used += time.monotonic() - t0
                return f
            if not said:
                log(f"machine busy ({f:.2f} cores used by other processes); waiting up to {max_wait:.0f}s")
                said = True
