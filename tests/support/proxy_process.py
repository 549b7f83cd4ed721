"""Run the real `x402-proxy` as a subprocess, as a user would, and read what it prints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LISTEN_RE = re.compile(r"listening on http://([^\s]+)")


class ProxyProcess:
    def __init__(self, home: Path, config_text: str = "", env: dict[str, str] | None = None) -> None:
        self.home = home
        self.config_path = home.parent / f"{home.name}-config.toml"
        self.config_path.write_text(config_text)
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.log_path = home.parent / f"{home.name}-proxy.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "--home",
            str(self.home),
            "--config",
            str(self.config_path),
            *args,
        ]
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=60, check=check, cwd=REPO
        )

    def start(
        self, listen: str = "127.0.0.1:0", timeout: float = 20, extra: tuple[str, ...] = ()
    ) -> ProxyProcess:
        """Run `x402-proxy run` and return once it printed its listen address (startup lines are kept)."""
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "--home",
            str(self.home),
            "--config",
            str(self.config_path),
            "run",
            "--listen",
            listen,
            *extra,
        ]
        self.address = self.launch(cmd, cwd=REPO, timeout=timeout).group(1)
        return self

    def launch(self, cmd: list[str], *, cwd: Path, timeout: float) -> re.Match[str]:
        """Start `cmd`, keep what it prints until its "listening on" line, and return that line's match."""
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd, start_new_session=True
        )
        self.startup_lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.startup_lines.append(line)
            match = LISTEN_RE.search(line)
            if match:
                return match
        self.stop()
        raise RuntimeError(f"{cmd[0]} did not start; log:\n{self.log_text()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def env_exports(self, *extra: str) -> dict[str, str]:
        out = self.cli("env", "--listen", self.address, *extra).stdout
        exports = {}
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            exports[name] = value.strip("'")
        return exports

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None
        return code
