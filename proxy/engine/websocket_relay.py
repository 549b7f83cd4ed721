"""WebSocket upgrades, relayed message by message.

Relaying frames through aiohttp on both sides (rather than splicing raw bytes) keeps the upgrade
inside the normal request handler, so it works on plain connections and inside intercepted tunnels.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from proxy.engine import http_semantics as hs
from proxy.engine.responses import proxy_error
from proxy.engine.settings import ProxySettings
from proxy.engine.upstream import Upstream

log = logging.getLogger("x402_proxy.websocket")

# Negotiated per hop by aiohttp itself; forwarding them would confuse both ends.
_WS_OWN = frozenset(
    {
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


async def relay_websocket(
    request: web.BaseRequest, url: URL, upstream: Upstream, settings: ProxySettings
) -> web.StreamResponse:
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    headers = hs.end_to_end_headers(request.headers.items(), hs.connection_tokens(request.headers), _WS_OWN)
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    try:
        upstream_ws = await upstream.session.ws_connect(
            ws_url, headers=headers, protocols=protocols, autoping=False, max_msg_size=0, autoclose=False
        )
    except aiohttp.WSServerHandshakeError as exc:
        return proxy_error(502, "websocket_refused", f"upstream refused the WebSocket upgrade: {exc.status}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return proxy_error(
            502, "upstream_unreachable", f"WebSocket upstream failed: {exc.__class__.__name__}"
        )

    chosen = (upstream_ws.protocol,) if upstream_ws.protocol else ()
    client_ws = web.WebSocketResponse(protocols=chosen, autoping=False, max_msg_size=0, autoclose=False)
    await client_ws.prepare(request)

    async def pump(
        source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == WSMsgType.PONG:
                await sink.pong(message.data)
            elif message.type == WSMsgType.CLOSE:
                await sink.close(code=source.close_code or 1000, message=str(message.extra or "").encode())
                return
            else:
                break
        if not sink.closed:
            await sink.close(code=source.close_code or 1000)

    tasks = [
        asyncio.create_task(pump(client_ws, upstream_ws)),
        asyncio.create_task(pump(upstream_ws, client_ws)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait(tasks, timeout=5)
    finally:
        for task in tasks:
            task.cancel()
        await upstream_ws.close()
        await client_ws.close()
    return client_ws
