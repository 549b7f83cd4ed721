"""The state directory: CA, keys, tokens and the SQLite database live here, private to the user."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

HOME_ENV = "X402_PROXY_HOME"
DEFAULT_HOME = "~/.x402-proxy"


def resolve_home(cli_value: str | None, env: Mapping[str, str]) -> Path:
    raw = cli_value or env.get(HOME_ENV) or DEFAULT_HOME
    return Path(raw).expanduser().resolve()


def ensure_home(home: Path) -> Path:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        # Tighten rather than refuse: the directory may predate us, but its secrets must not be shared.
        os.chmod(home, mode & 0o700)
    return home


def write_private_file(path: Path, data: bytes) -> None:
    """Create a 0600 file atomically (never world-readable, not even for an instant)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_private_file(path: Path) -> str | None:
    """Return a complaint if a secret file is readable by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}; secrets must be 0600 (chmod 600 {path})"
    return None
