"""The admin bearer token: where it comes from, how it is stored, how it is compared."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.admin.settings import AdminSettings, token_problem
from proxy.home import check_private_file

TOKEN_ENV = "X402_PROXY_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret
TOKEN_FILE = "admin-token"  # noqa: S105 - a file name


class TokenError(Exception):
    pass


@dataclass(frozen=True)
class AdminToken:
    value: str = ""
    # Where it came from, for messages: the env variable, "config", or the file path. Never the value.
    source: str = ""
    path: Path | None = None

    def __repr__(self) -> str:
        return f"AdminToken(source={self.source!r})"


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def resolve_token(settings: AdminSettings, home: Path, env: Mapping[str, str], *, create: bool) -> AdminToken:
    """env X402_PROXY_ADMIN_TOKEN > [admin] token > <home>/admin-token (created when `create`)."""
    from_env = env.get(TOKEN_ENV, "")
    if from_env:
        problem = token_problem(from_env)
        if problem is not None:
            raise TokenError(f"{TOKEN_ENV} {problem}")
        return AdminToken(from_env, f"env {TOKEN_ENV}")
    if settings.token:
        return AdminToken(settings.token, "config [admin] token")
    path = token_path(home)
    if create:
        return AdminToken(load_or_create_token_file(path), str(path), path)
    try:
        return AdminToken(_read_token_file(path), str(path), path)
    except FileNotFoundError:
        raise TokenError(
            f"no admin token: set {TOKEN_ENV}, or [admin] token, or start the proxy once to create {path}"
        ) from None


def _read_token_file(path: Path) -> str:
    complaint = check_private_file(path)
    if complaint is not None:
        raise TokenError(complaint)
    value = path.read_text(encoding="ascii", errors="replace").strip()
    problem = token_problem(value)
    if problem is not None:
        raise TokenError(f"{path}: admin token {problem}")
    return value


def load_or_create_token_file(path: Path) -> str:
    """Read the token file, or create it once: written in full under a temporary name, then linked in
    place, so nobody ever reads a partial token and two processes starting together agree on one."""
    try:
        return _read_token_file(path)
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, f"{token}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process got there first: then theirs wins
        except FileExistsError:
            return _read_token_file(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return token


def token_matches(header: str | None, expected: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not header or not expected:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8", "replace"), expected.encode("utf-8"))
