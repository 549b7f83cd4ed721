"""The proxy listener: binds, wires the front door to the HTTP/1.1 client connections, and drains on stop.

Every client connection, plain or the inside of an intercepted tunnel, is served by `ClientConnection`
(`client_http.py`), each request by `RequestHandler` (`request_handler.py`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import ssl
from collections.abc import Awaitable, Callable

from proxy.engine.client_http import ClientConnections
from proxy.engine.forwarder import Forwarder
from proxy.engine.front_door import FrontDoor, FrontDoorContext
from proxy.engine.request_handler import CompletionHook, RequestHandler
from proxy.engine.settings import ProxySettings, UpstreamSettings

log = logging.getLogger("x402_proxy.server")


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
        leaf_context: Callable[[str], Awaitable[ssl.SSLContext]],
    ) -> None:
        self._settings = settings
        self._forwarder = forwarder
        self._server: asyncio.Server | None = None
        self._addresses: list[tuple[str, int]] = []
        # Other listeners of this process (the admin API): refused as targets, like our own address.
        self._other_listeners: list[tuple[str, int]] = []
        self._handler = RequestHandler(forwarder, settings.max_replay_body)
        self._clients = ClientConnections(
            self._handler,
            max_header_bytes=settings.max_header_bytes,
            keepalive_timeout=settings.keepalive_timeout,
        )
        self._front = FrontDoorContext(
            settings=settings,
            make_handler=self._clients.protocol,
            leaf_context=leaf_context,
            listen_addresses=lambda: self._addresses + self._other_listeners,
            connect_timeout=upstream_settings.connect_timeout,
        )

    def set_completion_hook(self, hook: CompletionHook | None) -> None:
        """Called once per answered request (see `RequestHandler.completed`)."""
        self._handler.on_complete = hook

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self._addresses)

    async def bind(self) -> None:
        """Bind the listening sockets (the addresses are known from here on) without accepting yet."""
        host, port = self._settings.listen_address
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FrontDoor(self._front), host, port, backlog=1024, reuse_address=True, start_serving=False
        )
        self._addresses = [sock.getsockname()[:2] for sock in self._server.sockets]
        self._forwarder.set_listen_addresses(self._addresses + self._other_listeners)

    async def start(self) -> None:
        """Accept connections (binding first if `bind` was not called)."""
        if self._server is None:
            await self.bind()
        assert self._server is not None
        _tune_gc()
        await self._server.start_serving()

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
        await self._clients.shutdown(drain_timeout)
        if self._server is not None:
            await self._server.wait_closed()
