"""The admin listener's guards: the bearer token (where it comes from, how it is stored, how it is
compared) and the Host/Origin checks every route passes first (``ListenerGuard``)."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from proxy.admin.settings import AdminSettings, token_problem
from proxy.engine.http_semantics import TargetError, parse_authority
from proxy.home import check_private_file
from proxy.hosts import HostError, canonical_host, normalize_host

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


# --- who may address the listener: DNS rebinding and cross-origin pages -----------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ListenerGuard:
    """Host and Origin checks for every admin route, the REST API and the MCP endpoint alike.

    - ``Host`` must name this listener: a loopback name or the bound host, at the listener's port,
      compared in canonical form (``proxy.hosts``). Anything else is ``421``: a page on another
      origin whose name was rebound to 127.0.0.1 still sends its own name. A listener bound to a
      wildcard address cannot know the names it is reached by (a compose service name), so there
      any Host is accepted.
    - ``Origin``, when a browser sends one, must be the listener's own origin (``http://`` + one of
      those names + its port; on a wildcard bind, the origin the request's Host names), else
      ``403``. A page the listener serves itself (a future dashboard at ``/ui``) passes; a page on
      any other origin does not, whatever it can make a browser send. ``Origin: null`` is refused.

    The bearer token is checked after these; none of them replaces it.
    """

    hosts: frozenset[str]  # canonical host names the listener answers to; empty = any (wildcard bind)
    ports: frozenset[int]  # where it listens (one port, or one per address family of a name)

    @classmethod
    def for_listener(cls, bound_host: str, addresses: list[tuple[str, int]]) -> ListenerGuard:
        ports = frozenset(port for _, port in addresses)
        if bound_host in WILDCARD_HOSTS:
            return cls(frozenset(), ports)
        return cls(frozenset(normalize_host(h) for h in (*LOOPBACK_HOSTS, bound_host)), ports)

    def refusal(self, host: str | None, origin: str | None) -> tuple[int, str, str] | None:
        """(status, problem code, detail) for a request this listener must not serve, else None."""
        addressed = _authority(host or "")
        if addressed is None or (self.hosts and addressed not in self._origins()):
            shown = (host or "")[:100]
            return 421, "misdirected_request", f"Host {shown!r} does not name this admin listener"
        if origin is None:
            return None
        scheme, sep, rest = origin.partition("://")
        claimed = _authority(rest) if sep and scheme.lower() == "http" else None
        allowed = self._origins() if self.hosts else frozenset({addressed})
        if claimed is None or claimed not in allowed:
            return 403, "cross_origin", f"a page on {origin[:100]!r} may not use the admin API"
        return None

    def _origins(self) -> frozenset[tuple[str, int]]:
        return frozenset((h, p) for h in self.hosts for p in self.ports)


def _authority(text: str) -> tuple[str, int] | None:
    """(canonical host, port) of a Host header or an origin's authority; None if it is not one."""
    try:
        authority = parse_authority(text, default_port=80)
        return canonical_host(authority.host), authority.port
    except (TargetError, HostError):
        return None
