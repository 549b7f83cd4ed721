"""Child-process helpers shared by the test stack (tests/stack/_proc.py), the soak (tests/soak) and the
benchmarks (bench/): an environment without proxy variables, a child set-up that pins, renices and dies
with its parent, free ports, process-group teardown, log tails and what /proc says about a process."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

LOOP = "127.0.0.1"
# Proxy variables in the environment must never steer a child that talks to loopback.
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc
    _libc = None
_PR_SET_PDEATHSIG = 1


def without_proxy_env(
    env: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`env` (default: this process's) without any proxy variable, plus `extra`."""
    out = {k: v for k, v in (os.environ if env is None else env).items() if k.lower() not in PROXY_ENV}
    out.update(extra or {})
    return out


def die_with_parent() -> None:
    """In a child (preexec): SIGKILL when the thread that forked it exits (Linux PR_SET_PDEATHSIG)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def renice_self(nice: int) -> None:
    """Nice this process and, with sched_autogroup on, its session's autogroup.

    Every service runs in its own session, hence (autogroup) its own scheduling group: a plain nice
    value only ranks threads inside that group, so the group's nice (/proc/self/autogroup) is what
    ranks it against other sessions.
    """
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def child_setup(cpus: set[int] | None = None, nice: int = 0) -> Callable[[], None]:
    """For Popen(preexec_fn=...): pin to `cpus`, renice to `nice`, die with the parent."""

    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if nice:
            renice_self(nice)
        die_with_parent()

    return setup


def free_port(host: str = LOOP, taken: set[int] | None = None) -> int:
    """A currently free port on `host` (the OS picks; a tiny race until the child binds it), never one
    of `taken`, which it joins."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def accepts(port: int, host: str = LOOP, timeout: float = 0.2) -> bool:
    """Whether `port` accepts a connection right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None, timeout: float, host: str = LOOP
) -> str | None:
    """None once `port` accepts connections, else why not (the process exited, or the timeout)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return None
        time.sleep(0.1)
    return f"port {port} not accepting after {timeout:.0f}s"


def group_alive(pgid: int, leader: subprocess.Popen[bytes] | None = None) -> bool:
    if leader is not None:
        leader.poll()  # reap an exited leader: a zombie would keep the group "alive"
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_groups(groups: Iterable[tuple[int, subprocess.Popen[bytes] | None]], grace: float = 3.0) -> None:
    """SIGTERM every process group at once, give them `grace` seconds together, then SIGKILL."""
    alive = list(groups)
    for pgid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [(g, p) for g, p in alive if group_alive(g, p)]
    for pgid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    end = time.monotonic() + 2.0
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [(g, p) for g, p in alive if group_alive(g, p)]


def tail_lines(path: Path, lines: int = 40) -> list[str]:
    """The last `lines` lines of a log file ([] when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as name -> value (empty once the process is gone)."""
    fields: dict[str, str] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    except OSError:
        pass
    return fields


def rss_kib(pid: int) -> int:
    """VmRSS of one process, KiB (0 once it is gone)."""
    value = proc_status(pid).get("VmRSS")
    return int(value.split()[0]) if value else 0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (those alive now)."""
    out, todo, seen = [], [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_tree_kib(pid: int) -> int:
    """VmRSS of `pid` plus all its descendants, KiB."""
    return sum(rss_kib(p) for p in process_tree(pid))


def cpu_ticks_tree(pid: int) -> int:
    """utime + stime clock ticks of `pid` and its descendants."""
    total = 0
    for current in process_tree(pid):
        try:
            rest = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
        except (OSError, IndexError, ValueError):
            continue
    return total
