"""The proxy listener: binds, wires the front door to the lean HTTP/1.1 server, and drains on stop.

Plain requests and the inside of intercepted tunnels are served by `LeanServer`; a connection that
asks for a protocol upgrade (WebSocket) is handed to aiohttp's request handler at that request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.engine.forwarder import Forwarder, TunnelInfo
from proxy.engine.front_door import FrontDoor, FrontDoorContext
from proxy.engine.lean_exchange import CompletionHook, LeanExchange
from proxy.engine.lean_server import LeanServer
from proxy.engine.responses import ERROR_HEADER, classify_request_error
from proxy.engine.settings import ProxySettings, UpstreamSettings

log = logging.getLogger("x402_proxy.server")


class ProxyRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 connection handler with proxy-appropriate error answers."""

    x402_tunnel: TunnelInfo | None = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, code, text = classify_request_error(exc, status)
        if status >= 500:
            log.error("unhandled error while proxying", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        response = web.Response(status=status, text=f"x402-proxy: {text}\n", headers={ERROR_HEADER: code})
        response.force_close()
        return response


# Young-generation threshold while serving: each proxied request allocates a few hundred container
# objects (frames, futures, multidicts) that die young; at the default of 700 a collection ran every
# couple of requests and cost ~6 % of a small request's CPU (measured, docs/benchmarks.md).
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Freeze what startup built (config, SDKs, the CA) out of every future collection, collect rarely."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, gc.get_threshold()[0]), older, oldest)


class ProxyServer:
    def __init__(
        self,
        settings: ProxySettings,
        upstream_settings: UpstreamSettings,
        forwarder: Forwarder,
        leaf_context: Callable[[str], ssl.SSLContext],
    ) -> None:
        self._settings = settings
        self._forwarder = forwarder
        self._web_server = web.Server(forwarder.handle, handler_cancellation=True, access_log=None)
        self._handler_kwargs: dict[str, Any] = {
            "max_line_size": settings.max_header_bytes,
            "max_field_size": settings.max_header_bytes,
            "keepalive_timeout": settings.keepalive_timeout,
            "access_log": None,
            # A request body is relayed as sent: decompressing it would forward plain bytes still
            # labelled with the client's Content-Encoding.
            "auto_decompress": False,
        }
        self._server: asyncio.Server | None = None
        self._addresses: list[tuple[str, int]] = []
        # Other listeners of this process (the admin API): refused as targets, like our own address.
        self._other_listeners: list[tuple[str, int]] = []
        self._lean_exchange = LeanExchange(forwarder, settings.max_replay_body)
        self._lean = LeanServer(
            self._lean_exchange,
            self._make_handler,
            max_header_bytes=settings.max_header_bytes,
            keepalive_timeout=settings.keepalive_timeout,
        )
        self._front = FrontDoorContext(
            settings=settings,
            make_handler=self._lean.protocol,
            leaf_context=leaf_context,
            listen_addresses=lambda: self._addresses + self._other_listeners,
            connect_timeout=upstream_settings.connect_timeout,
        )

    def set_completion_hook(self, hook: CompletionHook | None) -> None:
        """Called once per request answered by the lean server (see `LeanExchange.completed`)."""
        self._lean_exchange.on_complete = hook

    def _make_handler(self, tunnel: TunnelInfo | None) -> asyncio.Protocol:
        """aiohttp's handler, for connections the lean server hands over (upgrade requests)."""
        handler = ProxyRequestHandler(
            self._web_server, loop=asyncio.get_running_loop(), **self._handler_kwargs
        )
        handler.x402_tunnel = tunnel
        return handler

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self._addresses)

    async def start(self) -> None:
        host, port = self._settings.listen_address
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontDoor(self._front), host, port, backlog=1024, reuse_address=True
        )
        self._addresses = [sock.getsockname()[:2] for sock in self._server.sockets]
        _tune_gc()
        self._forwarder.set_listen_addresses(self._addresses + self._other_listeners)

    def self_targets(self) -> list[tuple[str, int]]:
        """Every listener of this process: the proxy's own and the others registered here."""
        return self._addresses + self._other_listeners

    def add_self_targets(self, addresses: list[tuple[str, int]]) -> None:
        """Refuse requests and CONNECTs aimed at these addresses too (other listeners of this process)."""
        self._other_listeners = [*self._other_listeners, *addresses]
        self._forwarder.set_listen_addresses(self._addresses + self._other_listeners)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.close()
        # close() lets a request in progress finish and ends idle keep-alive connections at once;
        # without it shutdown() waits the whole drain timeout for clients that simply keep a socket open.
        for handler in self._web_server.connections:
            handler.close()
        await asyncio.gather(self._lean.shutdown(drain_timeout), self._web_server.shutdown(drain_timeout))
        if self._server is not None:
            await self._server.wait_closed()
