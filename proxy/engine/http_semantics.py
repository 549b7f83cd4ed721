"""Pure RFC 9110/9112 decisions for a forward proxy: no sockets, no event loop.

The engine calls these on every request, so they avoid allocations they do not need.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, MultiMapping

from proxy.hosts import HostError, NonCanonicalHost, canonical_host

# RFC 9110 7.6.1 plus the de-facto Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

VIA_PSEUDONYM = "x402-proxy"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class TargetError(ValueError):
    """The request target cannot be forwarded; the message is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Authority:
    host: str  # lower-case; IPv6 without brackets
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def netloc(self, scheme: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if DEFAULT_PORTS.get(scheme) == self.port:
            return host
        return f"{host}:{self.port}"


def parse_authority(value: str, default_port: int | None = None) -> Authority:
    """Parse `host:port` (CONNECT target or Host header); IPv6 must be bracketed."""
    value = value.strip()
    if not value or any(c in value for c in "/\\@ \t?#"):
        raise TargetError(f"invalid authority {value[:200]!r}")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise TargetError("unterminated IPv6 literal")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise TargetError(f"invalid IPv6 literal {host[:100]!r}") from exc
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise TargetError("garbage after IPv6 literal")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
    if port_text:
        # RFC 3986 port = *DIGIT, ASCII only: str.isdigit() alone also takes Arabic-Indic or fullwidth
        # digits (which int() reads as 80 for "\u0668\u0660") and "\u00b9" (which int() refuses with a
        # message that names no port).
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise TargetError(f"invalid port {port_text[:20]!r}")
        port = int(port_text)
    elif default_port is not None:
        port = default_port
    else:
        raise TargetError("port required")
    if not host:
        raise TargetError("empty host")
    return Authority(host.lower().rstrip("."), port)


def connection_tokens(headers: Mapping[str, str] | MultiMapping[str]) -> set[str]:
    """Header names listed in Connection (and Proxy-Connection) are hop-by-hop too."""
    tokens: set[str] = set()
    getall = getattr(headers, "getall", None)
    if getall is not None and "Connection" not in headers and "Proxy-Connection" not in headers:
        return tokens  # the common request: nothing listed
    for name in ("Connection", "Proxy-Connection"):
        values: Iterable[str] = getall(name, ()) if getall else [headers.get(name, "")]
        for value in values:
            for token in value.split(","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def end_to_end_headers(
    headers: Iterable[tuple[str, str]],
    connection_listed: set[str],
    drop: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """Copy headers minus hop-by-hop ones, those named in Connection, and `drop` (lower-case)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed or lower in drop:
            continue
        out.add(name, value)
    return out


_VIA_ENTRIES = {(1, 1): f"1.1 {VIA_PSEUDONYM}", (1, 0): f"1.0 {VIA_PSEUDONYM}"}


def connection_line(version: tuple[int, int], keep_alive: bool) -> str:
    """The `Connection` header line an answer needs, or "": 1.1 is persistent unless it says close,
    1.0 closes unless it says keep-alive."""
    if version >= (1, 1):
        return "" if keep_alive else "Connection: close\r\n"
    return "Connection: keep-alive\r\n" if keep_alive else ""


def via_value(existing: str | None, http_version: tuple[int, int]) -> str:
    entry = _VIA_ENTRIES.get(http_version) or f"{http_version[0]}.{http_version[1]} {VIA_PSEUDONYM}"
    return f"{existing}, {entry}" if existing else entry


def via_has_loop(via_values: Iterable[str]) -> bool:
    """Our own pseudonym in an incoming Via means the request has come round again."""
    for value in via_values:
        for hop in value.split(","):
            parts = hop.split()
            if len(parts) >= 2 and parts[1] == VIA_PSEUDONYM:
                return True
    return False


def framing_error(headers: MultiMapping[str]) -> str | None:
    """Reject ambiguous message framing (request smuggling), RFC 9112 6.1 and 6.3."""
    cls = headers.getall("Content-Length", [])
    if headers.get("Transfer-Encoding") is not None and cls:
        return "request has both Content-Length and Transfer-Encoding"
    if len(cls) > 1 or (cls and "," in cls[0]):
        values = {v.strip() for c in cls for v in c.split(",")}
        if len(values) > 1:
            return "request has conflicting Content-Length values"
    return None


def is_self_target(
    authority: Authority, listen_addresses: Iterable[tuple[str, int]], local_names: frozenset[str]
) -> bool:
    """True when a request is aimed at one of our own listeners (would loop back to us)."""
    for host, port in listen_addresses:
        if authority.port != port:
            continue
        if authority.host == host.lower() or authority.host in local_names:
            return True
        if host in ("0.0.0.0", "::") and authority.is_ip:
            return True
    return False


def host_refusal(
    authority: Authority, listen_addresses: Iterable[tuple[str, int]], local_names: frozenset[str]
) -> tuple[str, str] | None:
    """(reason code, message) when a target's host is another spelling of an IPv4 address, else None.

    Such a host is never forwarded (see ``proxy.hosts``): ``self_target`` when the address it denotes
    is one of our listeners, ``non_canonical_host`` otherwise. Other hosts that are not canonical
    names (a bad label, say) are left to the resolver, as before.
    """
    try:
        canonical_host(authority.host)
    except NonCanonicalHost as exc:
        if exc.canonical is not None and is_self_target(
            Authority(exc.canonical, authority.port), listen_addresses, local_names
        ):
            return "self_target", "request is aimed at the proxy itself"
        return "non_canonical_host", str(exc)
    except HostError:
        return None
    return None


def is_own_listener(peer: tuple[str, int], local_ip: str, listeners: Iterable[tuple[str, int]]) -> bool:
    """True when an upstream connection reached one of our own listeners.

    Names are no guide (any hostname may resolve to this machine: a compose service name, an
    /etc/hosts alias), so this looks at where the connection actually went: a listener's port at
    its address, or at any address of this host for a wildcard listener (the peer is this host
    when it is loopback or the very address our end of the connection has).
    """
    peer_ip = _plain_ip(peer[0])
    if peer_ip is None:
        return False
    for host, port in listeners:
        if port != peer[1]:
            continue
        if host in ("0.0.0.0", "::", ""):
            if peer_ip.is_loopback or peer_ip == _plain_ip(local_ip):
                return True
        elif _plain_ip(host) == peer_ip:
            return True
    return False


def _plain_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def expects_continue(headers: MultiMapping[str]) -> bool:
    return headers.get("Expect", "").strip().lower() == "100-continue"


def is_websocket_upgrade(headers: MultiMapping[str]) -> bool:
    return "websocket" in headers.get("Upgrade", "").lower() and "upgrade" in connection_tokens(headers)
