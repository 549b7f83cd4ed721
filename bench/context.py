"""What every part of a run shares: the contenders and the run's context."""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.noise import NoiseMonitor
from bench.paths import WORK
from bench.procs import Procs
from tests.support.processes import LOOP

SMALL_BODY = b"x" * 100


@dataclass
class Contender:
    key: str
    label: str
    port: int | None = None  # None for direct
    proc: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # CA a client must trust for HTTPS through this contender
    unavailable: str | None = None
    https_unavailable: str | None = None
    version: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy_url(self) -> str | None:
        return f"http://{LOOP}:{self.port}" if self.port else None


@dataclass
class Ctx:
    args: argparse.Namespace
    procs: Procs
    loadgen_cpus: set[int] | None
    proxy_cpus: set[int] | None
    origin_cpus: set[int] | None = None
    http_port: int = 0
    https_port: int = 0
    origin_ca: Path = WORK / "pki" / "origin-ca.pem"
    contenders: dict[str, Contender] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    noise: NoiseMonitor | None = None
