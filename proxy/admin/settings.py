"""The `[admin]` config section: where the admin API (REST + MCP) listens and how it authenticates."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.engine.settings import SettingError, is_loopback_host, parse_listen

AUTO = "auto"
DEFAULT_HOST = "127.0.0.1"
# Tokens go in an HTTP header: printable ASCII without spaces, and long enough not to be guessed.
TOKEN_MIN_LENGTH = 16
TOKEN_MAX_LENGTH = 512


def token_problem(token: str) -> str | None:
    """Why `token` cannot be an admin token, or None when it can."""
    if not TOKEN_MIN_LENGTH <= len(token) <= TOKEN_MAX_LENGTH:
        return f"must be {TOKEN_MIN_LENGTH}..{TOKEN_MAX_LENGTH} characters long"
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        return "must be printable ASCII without spaces"
    return None


@dataclass
class AdminSettings:
    enabled: bool = True
    # "auto": 127.0.0.1 on the proxy's port + 1 (8403 next to the default 8402), or an OS-chosen
    # port when the proxy's own port is 0. Anything else is HOST:PORT.
    listen: str = AUTO
    # Binding beyond loopback exposes wallet control (bearer token over plain HTTP): explicit opt-in only.
    allow_remote: bool = False
    # Bearer token. Empty: env X402_PROXY_ADMIN_TOKEN, else <home>/admin-token (created once, 0600).
    token: str = ""

    def validate(self) -> None:
        if self.listen != AUTO:
            try:
                host, _ = parse_listen(self.listen)
            except ValueError as exc:
                raise SettingError("listen", str(exc)) from exc
            if not is_loopback_host(host) and not self.allow_remote:
                raise SettingError(
                    "listen",
                    f"refusing to serve the admin API on non-loopback {host}; set [admin] allow_remote = "
                    "true to opt in (the bearer token then crosses the network in clear text)",
                )
        if self.token:
            problem = token_problem(self.token)
            if problem is not None:
                raise SettingError("token", f"admin token {problem}")

    def listen_address(self, proxy_port: int) -> tuple[str, int]:
        """The address to bind, resolving "auto" against the proxy listener's configured port."""
        if self.listen != AUTO:
            return parse_listen(self.listen)
        if proxy_port == 0:
            return DEFAULT_HOST, 0
        if proxy_port >= 65535:
            raise SettingError(
                "listen", "cannot derive the admin port from proxy port 65535; set [admin] listen"
            )
        return DEFAULT_HOST, proxy_port + 1
