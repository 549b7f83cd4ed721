"""The tests' own origin server: HTTP and HTTPS on loopback, run in a thread with its own event loop.

It records what it received so tests can assert on what crossed the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

HOST = "127.0.0.2"  # not in the default NO_PROXY list, so clients send it through the proxy


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_len: int


@dataclass
class Upstream:
    http_url: str = ""
    https_url: str = ""
    bad_tls_url: str = ""
    received: list[Received] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    def last(self, path: str) -> Received:
        for item in reversed(self.received):
            if item.path.split("?")[0] == path:
                return item
        raise AssertionError(f"upstream never received {path}")


def _app(state: Upstream) -> web.Application:
    async def record(request: web.Request) -> tuple[bytes, Received]:
        hasher, size, chunks = hashlib.sha256(), 0, []
        async for chunk in request.content.iter_any():
            hasher.update(chunk)
            size += len(chunk)
            if size <= 1024 * 1024:
                chunks.append(chunk)
        item = Received(
            request.method, request.path_qs, list(request.headers.items()), hasher.hexdigest(), size
        )
        state.received.append(item)
        return b"".join(chunks), item

    async def echo(request: web.Request) -> web.Response:
        _, item = await record(request)
        return web.json_response(
            {
                "method": item.method,
                "path": item.path,
                "headers": item.headers,
                "body_len": item.body_len,
                "body_sha256": item.body_sha256,
                "scheme": request.scheme,
            }
        )

    async def sized(request: web.Request) -> web.StreamResponse:
        """`/bytes?size=N[&chunked=1]`: N deterministic bytes, with or without Content-Length."""
        await record(request)
        size = int(request.query.get("size", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") != "1":
            response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request)
        count = int(request.query.get("count", "3"))
        delay = float(request.query.get("delay", "0.3"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for i in range(count):
            await response.write(f"data: event {i}\n\n".encode())
            await asyncio.sleep(delay)
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=int(request.match_info["code"]), text="status page\n")

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return web.Response(text="slow\n")

    async def reset(request: web.Request) -> web.Response:
        await record(request)
        assert request.transport is not None
        request.transport.abort()
        return web.Response(text="never sent")

    async def cut(request: web.Request) -> web.StreamResponse:
        """Promise 1 MiB, send 64 KiB, then reset: a body that fails mid-stream."""
        await record(request)
        response = web.StreamResponse()
        response.content_length = 1024 * 1024
        await response.prepare(request)
        await response.write(b"x" * 65536)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        await record(request)
        socket_ = web.WebSocketResponse(protocols=("chat", "other"))
        await socket_.prepare(request)
        async for message in socket_:
            if message.type == WSMsgType.TEXT:
                await socket_.send_str(f"echo:{message.data}")
            elif message.type == WSMsgType.BINARY:
                await socket_.send_bytes(message.data[::-1])
        return socket_

    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/bytes", sized)
    app.router.add_post("/upload", echo)
    app.router.add_get("/sse", sse)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/reset", reset)
    app.router.add_get("/cut", cut)
    app.router.add_get("/ws", ws)
    return app


def _bind() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def start_upstream(good_tls: ssl.SSLContext, bad_tls: ssl.SSLContext) -> tuple[Upstream, Any]:
    state = Upstream()
    ready = threading.Event()
    stop_holder: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        state._loop = loop
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(_app(state), access_log=None)
        loop.run_until_complete(runner.setup())
        socks = [_bind(), _bind(), _bind()]
        for sock, ctx in zip(socks, (None, good_tls, bad_tls), strict=True):
            loop.run_until_complete(web.SockSite(runner, sock, ssl_context=ctx).start())
        ports = [s.getsockname()[1] for s in socks]
        state.http_url = f"http://{HOST}:{ports[0]}"
        state.https_url = f"https://{HOST}:{ports[1]}"
        state.bad_tls_url = f"https://{HOST}:{ports[2]}"
        stop_holder["stop"] = lambda: loop.call_soon_threadsafe(loop.stop)
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True, name="test-upstream")
    thread.start()
    ready.wait(10)

    def stop() -> None:
        stop_holder["stop"]()
        thread.join(10)

    return state, stop


def json_body(data: bytes) -> Any:
    return json.loads(data.decode())
