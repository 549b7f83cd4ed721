"""The CA's files as both halves of the CA read them (proxy/tls/authority.py at start, proxy/tls/ca.py
when it issues): their names, the key file read safely, and the one error type for both."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

CA_CERT_NAME: Final = "ca.pem"
CA_KEY_NAME: Final = "ca-key.pem"


class CAError(Exception):
    """The CA files are missing, unsafe, corrupt or do not belong together."""


def read_private_key(path: Path) -> bytes:
    """The key file's bytes, refused unless it is a regular file with no group/other access."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CAError(f"cannot open CA key {path}: {exc.strerror}") from exc
    try:
        # fstat on the open descriptor, so the mode checked is the mode of the file actually read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CAError(f"CA key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise CAError(
                f"CA key {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}"
            )
        chunks: list[bytes] = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
