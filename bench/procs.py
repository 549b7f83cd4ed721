"""The harness's processes: long-running services (origin, proxies) and short tool runs, each in its own
process group with PDEATHSIG, killed by process-group id (never by name) on every way out; a pid file
lets the next run kill what a SIGKILLed run left. Built on the helpers the test stack and the soak use
(tests/support/processes.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.paths import PIDFILE
from tests.support.processes import (
    child_setup,
    group_alive,
    kill_groups,
    tail_lines,
    without_proxy_env,
)

ALL_CPUS: set[int] = set(os.sched_getaffinity(0))  # at import, before the orchestrator pins itself


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(path: Path, n: int = 3) -> str:
    """The last `n` non-empty lines of a log, on one line."""
    lines = [line.strip() for line in tail_lines(path, 10_000) if line.strip()]
    return " | ".join(lines[-n:])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Procs:
    """Long-running services (origin, proxies) and short tool runs."""

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice  # set from --nice: every process started here gets it
        self.services: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tools: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()

    @staticmethod
    def reap_stale() -> None:
        """Kill leftovers of a previous run that was SIGKILLed (pids we recorded)."""
        try:
            stale = json.loads(PIDFILE.read_text())
        except (OSError, ValueError):
            return
        for ent in stale:
            pid, cmd = int(ent["pid"]), str(ent["cmd"])
            if cmd and _cmdline(pid) == cmd:
                log(f"killing stale {ent['name']} (pid {pid}) from an interrupted run")
                kill_groups([(pid, None)])
        PIDFILE.unlink(missing_ok=True)

    def _record(self) -> None:
        ents = [
            {"name": n, "pid": p.pid, "cmd": _cmdline(p.pid)} for n, p in self.services if p.poll() is None
        ]
        PIDFILE.write_text(json.dumps(ents))

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: set[int] | None,
        logfile: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        replace_env: bool = False,
    ) -> subprocess.Popen[bytes]:
        out = logfile.open("wb")
        # `replace_env`: `env` is the whole environment (less any proxy variable), not an addition.
        full_env = without_proxy_env(env or {}) if replace_env else without_proxy_env(extra=env)
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=child_setup(cpus, self.nice),
            )
        finally:
            out.close()
        self.services.append((name, p))
        time.sleep(0.05)
        self._record()
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        kill_groups([(p.pid, p)])

    def run(
        self, argv: list[str], cpus: set[int] | None, timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=without_proxy_env(extra=env),
            start_new_session=True,
            preexec_fn=child_setup(cpus, self.nice),
        )
        with self.lock:
            self.tools.add(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_groups([(p.pid, p)], grace=0.5)
            out, err = p.communicate()
            return -999, out.decode(errors="replace"), err.decode(errors="replace") + "\n[timed out]"
        finally:
            if p.poll() is None:
                kill_groups([(p.pid, p)], grace=0.5)
            with self.lock:
                self.tools.discard(p)
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def stop_all(self) -> None:
        with self.lock:
            tools = [(p.pid, p) for p in self.tools]
        # Tools first get SIGINT: a Python tool (loadclient, paid_overhead.py and the
        # x402 stack it runs) then unwinds through its own `finally` and cleans up.
        for pgid, _ in tools:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGINT)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(group_alive(g, p) for g, p in tools):
            time.sleep(0.05)
        groups = tools + [(p.pid, p) for _, p in reversed(self.services)]
        kill_groups(groups)
        self.services.clear()
        PIDFILE.unlink(missing_ok=True)
