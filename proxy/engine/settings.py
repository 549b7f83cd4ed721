"""Engine settings: the `[proxy]` and `[upstream]` config sections."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from proxy.engine.http_semantics import TargetError, parse_authority


class SettingError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT for a listener; port 0 asks the OS for a free port (tests, sidecars)."""
    if value.endswith(":0"):
        host, port = parse_listen(value[:-2] + ":1")[0], 0
        return host, port
    try:
        authority = parse_authority(value)
    except TargetError as exc:
        raise ValueError(f"expected HOST:PORT, got {value!r}: {exc}") from exc
    return authority.host, authority.port


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_port_ranges(items: list[str]) -> list[tuple[int, int]]:
    """`["443", "8000-9000"]` -> [(443, 443), (8000, 9000)]; `"*"` allows every port."""
    ranges = []
    for item in items:
        text = str(item).strip()
        if text == "*":
            ranges.append((1, 65535))
            continue
        low, _, high = text.partition("-")
        # ASCII digits only: str.isdigit() alone also takes Arabic-Indic or fullwidth digits.
        if not _ascii_digits(low) or (high and not _ascii_digits(high)):
            raise ValueError(f"port range {text!r} is not N or N-M or *")
        lo, hi = int(low), int(high or low)
        if not 0 < lo <= hi < 65536:
            raise ValueError(f"port range {text!r} out of 1..65535")
        ranges.append((lo, hi))
    return ranges


@dataclass
class ProxyAuth:
    username: str = ""
    password: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.username)


@dataclass
class ProxySettings:
    listen: str = "127.0.0.1:8402"
    # Binding beyond loopback without proxy auth turns the wallet into an open relay.
    allow_unauthenticated_remote: bool = False
    auth: ProxyAuth = field(default_factory=ProxyAuth)
    # Hosts (globs) tunnelled raw: never intercepted, so never paid for.
    passthrough_hosts: list[str] = field(default_factory=list)
    # CONNECT is refused (403) to ports outside these ranges.
    connect_ports: list[str] = field(default_factory=lambda: ["443", "8443"])
    max_header_bytes: int = 16384
    # Request bodies up to this size are buffered so a paid retry can replay them.
    max_replay_body: int = 10 * 1024 * 1024
    keepalive_timeout: float = 75.0
    # On SIGTERM/SIGINT: how long requests in flight (a payment among them) may take to finish.
    drain_timeout: float = 10.0

    def validate(self) -> None:
        try:
            host, _ = parse_listen(self.listen)
        except ValueError as exc:
            raise SettingError("listen", str(exc)) from exc
        try:
            parse_port_ranges(self.connect_ports)
        except ValueError as exc:
            raise SettingError("connect_ports", str(exc)) from exc
        if not is_loopback_host(host) and not self.auth.enabled and not self.allow_unauthenticated_remote:
            raise SettingError(
                "listen",
                f"refusing to listen on non-loopback {host} without proxy auth; set [proxy.auth] "
                "username/password or allow_unauthenticated_remote = true",
            )
        if self.auth.enabled and not self.auth.password:
            raise SettingError("auth", "proxy auth needs both username and password")
        if not 1024 <= self.max_header_bytes <= 1024 * 1024:
            raise SettingError("max_header_bytes", "must be between 1024 and 1048576")
        if self.max_replay_body < 0:
            raise SettingError("max_replay_body", "must be >= 0")
        if not 0 <= self.drain_timeout <= 3600:
            raise SettingError("drain_timeout", "must be between 0 and 3600 seconds")

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


@dataclass
class UpstreamSettings:
    connect_timeout: float = 15.0
    # No total timeout: SSE and LLM streams run for minutes. This bounds silence between reads.
    idle_timeout: float = 300.0
    # Extra CA certificates trusted for upstreams, on top of the system roots.
    extra_ca_bundle: Path | None = None

    def validate(self) -> None:
        if self.connect_timeout <= 0:
            raise SettingError("connect_timeout", "must be > 0")
        if self.idle_timeout <= 0:
            raise SettingError("idle_timeout", "must be > 0")
        if self.extra_ca_bundle is not None and not self.extra_ca_bundle.is_file():
            raise SettingError("extra_ca_bundle", f"file not found: {self.extra_ca_bundle}")


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
