"""Where the benchmarks live and write."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bench"
WORK = ROOT / ".bench"
PIDFILE = WORK / "pids.json"
