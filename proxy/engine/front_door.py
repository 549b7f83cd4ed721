"""The first bytes of every client connection land here.

This small protocol reads the first request line itself: CONNECT is handled here (refuse, tunnel raw,
or intercept TLS); anything else is handed, with the bytes already read, to the HTTP/1.1 client
connection (`client_http.py`) on the same transport. After TLS interception the same protocol runs
again on the decrypted stream.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.engine import http_semantics as hs
from proxy.engine.forwarder import PROXY_AUTH_CHALLENGE, TunnelInfo, check_proxy_auth
from proxy.engine.responses import raw_error
from proxy.engine.settings import ProxySettings, parse_port_ranges
from proxy.engine.splice import Pending, Splice
from proxy.hosts import normalize_host, normalize_host_pattern

log = logging.getLogger("x402_proxy.front_door")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
TLS_HANDSHAKE_TIMEOUT = 15.0


@dataclass
class FrontDoorContext:
    settings: ProxySettings
    make_handler: Callable[[TunnelInfo | None], asyncio.Protocol]
    leaf_context: Callable[[str], Awaitable[ssl.SSLContext]]
    listen_addresses: Callable[[], list[tuple[str, int]]]
    connect_timeout: float

    def __post_init__(self) -> None:
        self.port_ranges = parse_port_ranges(self.settings.connect_ports)
        self.local_names = frozenset({"localhost", "127.0.0.1", "::1"})

    def port_allowed(self, port: int) -> bool:
        return any(lo <= port <= hi for lo, hi in self.port_ranges)

    def is_passthrough(self, host: str) -> bool:
        name = normalize_host(host)  # the canonical host, as every other decision compares it
        patterns = self.settings.passthrough_hosts
        return any(fnmatch.fnmatchcase(name, normalize_host_pattern(p)) for p in patterns)


class FrontDoor(asyncio.Protocol):
    def __init__(self, ctx: FrontDoorContext, tunnel: TunnelInfo | None = None) -> None:
        self._ctx = ctx
        self._tunnel = tunnel
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._done = False
        self._eof = False

    # asyncio may deliver decrypted bytes before start_tls returns, so buffer until we have a transport.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._buffer:
            self._examine()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if self._transport is not None:
            self._examine()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._transport is not None and not self._done:
            self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True

    def _examine(self) -> None:
        assert self._transport is not None
        limit = self._ctx.settings.max_header_bytes
        newline = self._buffer.find(b"\n")
        if newline < 0:
            if len(self._buffer) > limit:
                self._refuse(414, "URI Too Long", "request_line_too_long", "request line too long")
            return
        if not self._buffer.startswith(b"CONNECT "):
            self._hand_off()
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or end > limit:
            if len(self._buffer) > limit:
                self._refuse(
                    431, "Request Header Fields Too Large", "headers_too_large", "CONNECT head too large"
                )
            return
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + 4 :])
        self._done = True
        self._transport.pause_reading()
        asyncio.get_running_loop().create_task(self._connect(head, rest))

    def _hand_off(self) -> None:
        assert self._transport is not None
        self._done = True
        handler = self._ctx.make_handler(self._tunnel)
        self._transport.set_protocol(handler)
        handler.connection_made(self._transport)
        handler.data_received(bytes(self._buffer))
        self._buffer.clear()
        if self._eof:
            handler.eof_received()

    def _refuse(self, status: int, phrase: str, code: str, message: str, extra: str = "") -> None:
        assert self._transport is not None
        self._done = True
        self._transport.write(raw_error(status, phrase, code, message, extra))
        self._transport.close()

    async def _connect(self, head: bytes, early_data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            await self._connect_inner(head, early_data)
        except Exception:  # the connection is ours alone; never let one tunnel hurt the server
            log.exception("CONNECT handling failed")
            transport.abort()

    async def _connect_inner(self, head: bytes, early_data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        ctx = self._ctx
        if self._tunnel is not None:
            self._refuse(
                400, "Bad Request", "nested_connect", "CONNECT inside an intercepted tunnel is not supported"
            )
            return
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            _method, target, version = request_line.split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            authority = hs.parse_authority(target)
        except (ValueError, hs.TargetError) as exc:
            self._refuse(400, "Bad Request", "bad_connect", f"malformed CONNECT request: {exc}")
            return
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._refuse(400, "Bad Request", "bad_header", "malformed header line in CONNECT request")
                return
            headers[name.lower()] = value.strip()
        if not check_proxy_auth(ctx.settings, headers.get("proxy-authorization")):
            self._refuse(
                407,
                "Proxy Authentication Required",
                "proxy_auth_required",
                "proxy authentication required",
                f"Proxy-Authenticate: {PROXY_AUTH_CHALLENGE}\r\n",
            )
            return
        if not ctx.port_allowed(authority.port):
            self._refuse(
                403,
                "Forbidden",
                "connect_port_not_allowed",
                f"CONNECT to port {authority.port} is not allowed",
            )
            return
        if hs.is_self_target(authority, ctx.listen_addresses(), ctx.local_names):
            self._refuse(400, "Bad Request", "self_target", "CONNECT is aimed at the proxy itself")
            return
        refused = hs.host_refusal(authority, ctx.listen_addresses(), ctx.local_names)
        if refused is not None:
            self._refuse(400, "Bad Request", refused[0], refused[1])
            return
        if early_data:
            # A client may not send tunnel bytes before our 200; refusing keeps framing unambiguous.
            self._refuse(
                400, "Bad Request", "early_tunnel_data", "data sent before the tunnel was established"
            )
            return
        if ctx.is_passthrough(authority.host):
            await self._passthrough(authority)
        else:
            await self._intercept(authority)

    async def _passthrough(self, authority: hs.Authority) -> None:
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        upstream = Pending()
        try:
            async with asyncio.timeout(self._ctx.connect_timeout):
                await loop.create_connection(lambda: upstream, authority.host, authority.port)
        except TimeoutError:
            self._refuse(
                504,
                "Gateway Timeout",
                "upstream_connect_timeout",
                f"connecting to {authority.host} timed out",
            )
            return
        except OSError as exc:
            self._refuse(
                502,
                "Bad Gateway",
                "upstream_unreachable",
                f"cannot connect to {authority.host}: {exc.strerror}",
            )
            return
        assert upstream.transport is not None
        transport.write(CONNECT_ESTABLISHED)
        if upstream.lost:  # gone already: what it sent, then the end
            transport.write(bytes(upstream.held))
            transport.close()
            return
        await Splice(transport, upstream.transport, bytes(upstream.held), b_ended=upstream.eof).wait()

    async def _intercept(self, authority: hs.Authority) -> None:
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        transport.write(CONNECT_ESTABLISHED)
        try:
            first = await _peek_first_byte(loop, transport, TLS_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError):
            transport.abort()
            return
        if not first:
            transport.close()
            return
        if first != b"\x16":  # not a TLS handshake record: plain HTTP inside the tunnel
            plain = FrontDoor(self._ctx, TunnelInfo(authority, tls=False))
            transport.set_protocol(plain)
            plain.connection_made(transport)
            transport.resume_reading()
            return
        try:  # the first interception loads the CA off the loop (proxy/tls/authority.py)
            context = await self._ctx.leaf_context(authority.host)
        except Exception as exc:
            log.warning("leaf certificate for %s failed: %s", authority.host, exc)
            transport.abort()
            return
        inner = FrontDoor(self._ctx, TunnelInfo(authority))
        # start_tls resumes reading itself; resuming earlier would hand the ClientHello to the old protocol.
        try:
            tls_transport = await loop.start_tls(
                transport, inner, context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
            log.info("TLS handshake with client for %s failed: %s", authority.host, exc.__class__.__name__)
            transport.abort()
            return
        if tls_transport is None:
            transport.abort()
            return
        inner.connection_made(tls_transport)


async def _peek_first_byte(
    loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, wait_seconds: float
) -> bytes:
    """Look at the tunnel's first byte without consuming it, so start_tls still sees the whole ClientHello.

    The transport is paused; a duplicate descriptor is watched instead of the transport's own, which
    the loop already owns.
    """
    sock = transport.get_extra_info("socket")
    peek = socket.socket(fileno=os.dup(sock.fileno()))
    peek.setblocking(False)
    result: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if result.done():
            return
        try:
            result.set_result(peek.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return
        except OSError as exc:
            result.set_exception(exc)

    loop.add_reader(peek.fileno(), readable)
    try:
        async with asyncio.timeout(wait_seconds):
            return await result
    finally:
        loop.remove_reader(peek.fileno())
        peek.close()
