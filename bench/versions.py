"""Versions of what was measured, for results.json: tools, packages, the checkout's commit, the CPU."""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
import subprocess
from pathlib import Path

from bench.paths import ROOT
from tests.support.processes import without_proxy_env


def version_of(argv: list[str], pattern: str = r"(\d+\.\d+[\w.\-+]*)") -> str:
    exe = shutil.which(argv[0]) or (argv[0] if Path(argv[0]).exists() else None)
    if not exe:
        return "missing"
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, timeout=20, env=without_proxy_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (r.stdout + r.stderr).decode(errors="replace")
    m = re.search(pattern, text)
    return m.group(1) if m else text.strip().splitlines()[0][:60] if text.strip() else "?"


def git_describe() -> str:
    """Commit of the checkout being measured (read-only git calls), '+dirty' if modified."""
    try:
        head = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, timeout=10
            )
            .stdout.decode()
            .strip()
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "proxy"],
            capture_output=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def dpkg_version(pkg: str) -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, timeout=10)
        return r.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def pkg_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
