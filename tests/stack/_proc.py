"""Child-process plumbing shared by the stack: spawn in own process group, wait until ready, kill.

Every process started here is registered so that it is killed on `stop()`, on interpreter exit
(atexit), and - on Linux, when spawned from the main thread - when the parent dies (PDEATHSIG),
so a crashed or killed test run does not leave anvil or servers listening.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from tests.support.processes import die_with_parent, tail_lines, without_proxy_env
from tests.support.processes import free_port as free_port  # re-exported: the stack's callers use it

STACK_DIR = Path(__file__).resolve().parent
REPO_ROOT = STACK_DIR.parent.parent
NODE_MODULES = STACK_DIR / "node_modules"

_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class StackStartupError(RuntimeError):
    """A stack component did not come up; the message carries its log tail."""


def tail(path: Path, lines: int = 40) -> str:
    found = tail_lines(path, lines)
    return "\n".join(found) if found or path.exists() else "<no log>"


class ManagedProcess:
    """One child process with its combined stdout/stderr in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # The children talk to loopback only; an inherited proxy setting would reroute them.
        child_env = without_proxy_env()
        child_env["NO_PROXY"] = child_env["no_proxy"] = "127.0.0.1,localhost,::1"
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
        use_pdeathsig = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(cwd),
                env=child_env,
                start_new_session=True,  # own process group: stop() kills grandchildren too
                preexec_fn=die_with_parent if use_pdeathsig else None,
            )
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def failure(self, what: str) -> StackStartupError:
        rc = self.popen.poll()
        state = f"exited with {rc}" if rc is not None else "still running"
        return StackStartupError(
            f"{self.name}: {what} ({state}); command: {' '.join(self.argv)}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        with _live_lock:
            _live.discard(self)
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)


def _kill_all() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout=2.0)


atexit.register(_kill_all)


def wait_until(
    proc: ManagedProcess,
    probe: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll `probe` until it returns True; fail fast with the log tail if the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise proc.failure(f"died before {what}")
        try:
            if probe():
                return
        except (httpx.HTTPError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise proc.failure(f"not {what} after {timeout:.0f}s")
        time.sleep(interval)


def http_ready(url: str) -> Callable[[], bool]:
    """Probe: the URL answers with any HTTP status below 500 (e.g. 200 or 402).

    Certificates are not checked: this only asks "is it listening yet" of our own loopback child.
    """

    def probe() -> bool:
        r = httpx.get(url, timeout=1.0, trust_env=False, verify=False)
        return r.status_code < 500

    return probe


def wait_all(waits: Sequence[tuple[ManagedProcess, Callable[[], bool], str]], timeout: float) -> None:
    """Wait for several processes concurrently (single thread, round robin)."""
    deadline = time.monotonic() + timeout
    pending = list(waits)
    while pending:
        still: list[tuple[ManagedProcess, Callable[[], bool], str]] = []
        for proc, probe, what in pending:
            if not proc.alive():
                raise proc.failure(f"died before {what}")
            try:
                ok = probe()
            except (httpx.HTTPError, OSError, ValueError):
                ok = False
            if not ok:
                still.append((proc, probe, what))
        pending = still
        if not pending:
            return
        if time.monotonic() > deadline:
            proc, _, what = pending[0]
            raise proc.failure(f"not {what} after {timeout:.0f}s")
        time.sleep(0.05)
