"""Paid MCP server: the official SDK's Streamable HTTP app behind the PyPI x402 payment middleware.

Every method on `/mcp` (POST messages, the GET event stream, the DELETE that ends a session) is a paid
route with the reference `PaymentMiddlewareASGI`, priced and configured exactly like `server_py.py`
(same command line). With `--siwx` a wallet that paid once is let in again by Sign-In-With-X alone,
which is how a paying proxy keeps one MCP session to one payment.

Routes:
  * /mcp        MCP Streamable HTTP (stateful, SSE answers); tools `add` and `ticks`
  GET /free     readiness probe, no payment
  GET /__stats  every /mcp exchange seen so far: method, request Mcp-Session-Id, status, issued session id,
                content type (tests assert the client's DELETE arrived with its session id)

Run by file path (`python tests/stack/server_mcp.py --port ...`), as the stack does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402.http.middleware.fastapi import PaymentMiddlewareASGI

# Run by file path like server_py.py, whose helpers it shares (the tests package would import the whole stack).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_py import (  # type: ignore[import-not-found]
    ServerConfig,
    Stats,
    _route,
    parse_args,
    payment_server,
    serve,
)

MCP_PATH = "/mcp"


def build_mcp() -> MCPServer[Any]:
    mcp: MCPServer[Any] = MCPServer("x402-paid-mcp")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    async def ticks(count: int, interval: float, ctx: Context) -> str:
        """Report `count` progress notifications `interval` seconds apart (each says when it was sent)."""
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            await ctx.report_progress(i + 1, count, json.dumps({"i": i, "sent_at": time.time()}))
        return f"{count} ticks"

    return mcp


class ExchangeLog:
    """Outermost ASGI layer: records each /mcp exchange as the client's bytes reached this server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != MCP_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        entry: dict[str, Any] = {
            "method": scope["method"],
            "session_id": headers.get("mcp-session-id"),
            "siwx": "sign-in-with-x" in headers,
            "paid": "payment-signature" in headers,
        }
        self.seen.append(entry)

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]}
                entry.update(
                    status=message["status"],
                    issued_session_id=out.get("mcp-session-id"),
                    content_type=out.get("content-type"),
                )
            await send(message)

        await self.app(scope, receive, record)


def create_app(cfg: ServerConfig) -> ASGIApp:
    stats = Stats()
    server, extensions = payment_server(cfg, stats)
    mcp = build_mcp()
    app: Starlette = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        host=cfg.host,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{cfg.host}:*"],
            allowed_origins=[f"{cfg.public_origin}"],
        ),
    )
    log = ExchangeLog(app)

    async def free(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def get_stats(_: Request) -> JSONResponse:
        return JSONResponse({"exchanges": log.seen, "settlements": stats.settlements})

    app.router.routes += [Route("/free", free), Route("/__stats", get_stats)]
    # No verb: every method on /mcp is paid (POST messages, the GET stream and the DELETE).
    routes = {MCP_PATH: _route(cfg, cfg.price, "paid MCP server", extensions)}
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)
    return log


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    serve(create_app(cfg), cfg)


if __name__ == "__main__":
    main()
