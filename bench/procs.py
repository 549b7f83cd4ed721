"""Process helpers of the benchmarks: a clean environment, pinning and priority for children, PDEATHSIG,
free ports, RSS."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

LOOP = "127.0.0.1"

# Proxy variables in the environment must never steer any benchmark process.
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc
    _libc = None
_PR_SET_PDEATHSIG = 1


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_ENV}
    env.update(extra or {})
    return env


def renice_self(nice: int) -> None:
    """Nice this process and, with sched_autogroup on, its session's autogroup.

    Every service runs in its own session, hence (autogroup) its own scheduling
    group: a plain nice value only ranks threads inside that group, so the
    group's nice (/proc/self/autogroup) is what ranks it against other sessions.
    """
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def preexec(cpus: set[int] | None, nice: int = 0) -> Callable[[], None]:
    """For Popen(preexec_fn=...): pin to `cpus`, renice, and die with the parent (PDEATHSIG)."""

    def fn() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nice:
            renice_self(nice)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return fn


def free_port(taken: set[int] | None = None, host: str = LOOP) -> int:
    """A currently free port on `host`, never one of `taken` (which it joins)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def rss_kib(pid: int) -> int:
    """VmRSS of one process, KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
