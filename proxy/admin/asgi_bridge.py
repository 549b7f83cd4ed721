"""Serve one ASGI application from an aiohttp handler (the MCP SDK's Streamable HTTP endpoint).

The request body is read (and size-checked) by the caller and handed over whole; the response is
streamed back as the application sends it, so Server-Sent Events flow as they are produced. After the
body, `receive()` reports `http.disconnect` once the client's connection closes, which is how SSE
responses notice a client that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web

log = logging.getLogger("x402_proxy.admin")

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

DISCONNECT_POLL_SECONDS = 0.5


def _scope(request: web.Request) -> dict[str, Any]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    local = transport.get_extra_info("sockname") if transport is not None else None
    path = request.path
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1", "replace"),
        "query_string": request.query_string.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": tuple(peer[:2]) if peer else None,
        "server": tuple(local[:2]) if local else None,
        "state": {},
        "extensions": {},
    }


async def call_asgi(app: ASGIApp, request: web.Request, body: bytes) -> web.StreamResponse:
    """Run `app` for `request` (whose body was already read into `body`) and stream its answer."""
    body_sent = False
    finished = asyncio.Event()
    started: dict[str, Any] = {}
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not finished.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            try:
                await asyncio.wait_for(finished.wait(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                continue
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        kind = message["type"]
        if kind == "http.response.start":
            started["status"] = int(message["status"])
            started["headers"] = list(message.get("headers", []))
            return
        if kind != "http.response.body" or finished.is_set():
            return
        try:
            if response is None:
                response = _response(started)
                await response.prepare(request)
            chunk = bytes(message.get("body", b""))
            if chunk:
                await response.write(chunk)
            if not message.get("more_body", False):
                await response.write_eof()
                finished.set()
        except ConnectionResetError:
            # The client went away (e.g. it stopped reading an SSE stream once it had its answer). Like
            # ASGI servers do, drop further output; receive() now reports the disconnect.
            finished.set()

    try:
        await app(_scope(request), receive, send)
    except Exception:
        if response is None:
            raise  # nothing sent yet: the caller answers with a problem document
        log.exception("ASGI application failed after it started its response")
    finally:
        finished.set()
    if response is None:
        response = _response(started)
        with contextlib.suppress(ConnectionResetError):
            await response.prepare(request)
            await response.write_eof()
    return response


def _response(started: dict[str, Any]) -> web.StreamResponse:
    if "status" not in started:
        raise RuntimeError("the ASGI application sent no response start")
    response = web.StreamResponse(status=started["status"])
    for raw_name, raw_value in started["headers"]:
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else str(raw_name)
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else str(raw_value)
        if name.lower() in ("transfer-encoding", "connection", "keep-alive"):
            continue
        response.headers.add(name, value)
    return response
