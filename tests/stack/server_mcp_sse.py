"""A Streamable HTTP MCP server written at the wire level, whose tool calls answer as SSE streams.

x402 over MCP without the SDK wrapper, so each part of an exchange can be shaped and broken on purpose:
the answer to a `tools/call` POST is a `text/event-stream` (or `application/json` with `--framing json`)
whose first events are `notifications/progress` (when the request carries a progressToken) and
`notifications/message` log lines, and whose last event is the JSON-RPC response.

    python tests/stack/server_mcp_sse.py --port P --facilitator URL --asset 0xTOKEN --pay-to 0xADDR \\
        [--price 1000] [--mode normal|hang|pending|huge|malformed|rpc-error] [--framing sse|json] \\
        [--events 3] [--event-interval 0.05] [--host 127.0.0.1] [--ssl-certfile F --ssl-keyfile K]

Tools:
  * `echo(text)`       free; answers {"echo": text}
  * `forecast(city)`   paid (--price atomic TestUSDC, exact, eip155:84532, facilitator --facilitator)
Without `_meta["x402/payment"]` the paid tool answers the payment-required result: `isError: true`, the
PaymentRequired in `structuredContent` and as JSON text in `content[0].text`. With a payment it checks
`accepted` against its requirement, POSTs /verify, runs the tool, POSTs /settle and answers the result with
`_meta["x402/payment-response"]` = the facilitator's SettleResponse.

--mode changes the paid tool:
  normal      as above
  hang        verifies the payment, then never answers and never settles (the stream stays open)
  pending     verifies, never settles, answers the settlement-failed result with
              `x402/payment-response` = {success: false, errorReason: "settlement_pending"}
  huge        the payment-required result carries ~2 MiB of padding (`extensions.padding`)
  malformed   the payment-required result is not a PaymentRequired (accepts is no list, text not JSON)
  rpc-error   payment required as a JSON-RPC error: code 402, PaymentRequired in `error.data`

Also: `initialize` (issues Mcp-Session-Id), `ping`, `tools/list`, notifications (202), GET /mcp (405: no
standalone stream), DELETE /mcp (ends the session). `GET /free` (readiness), `GET /__stats` (every
message received, verifies, settlements). Runs in the main venv; imports nothing from the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("x402-stack.server_mcp_sse")

MODES = ("normal", "hang", "pending", "huge", "malformed", "rpc-error")
PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
PAYMENT_META = "x402/payment"
RESPONSE_META = "x402/payment-response"
HUGE_PADDING = 2 * 1024 * 1024

TOOLS = [
    {
        "name": "echo",
        "description": "Echo a text (free).",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "forecast",
        "description": "Weather forecast for a city (paid).",
        "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
]


@dataclass
class Config:
    port: int
    facilitator_url: str
    asset: str
    pay_to: str
    price: int = 1000
    network: str = "eip155:84532"
    token_name: str = "USDC"
    token_version: str = "2"
    max_timeout_seconds: int = 60
    mode: str = "normal"
    framing: str = "sse"
    events: int = 3
    event_interval: float = 0.05
    host: str = "127.0.0.1"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def requirement(self) -> dict[str, Any]:
        return {
            "scheme": "exact",
            "network": self.network,
            "asset": self.asset,
            "amount": str(self.price),
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": {"name": self.token_name, "version": self.token_version},
        }


@dataclass
class Stats:
    messages: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    verified: int = 0
    settlements: list[dict[str, Any]] = field(default_factory=list)
    sessions_ended: list[str] = field(default_factory=list)


def payment_required(cfg: Config, error: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "x402Version": 2,
        "error": error,
        "resource": {"url": "mcp://tool/forecast", "description": "Forecast", "mimeType": "application/json"},
        "accepts": [cfg.requirement],
    }
    if cfg.mode == "huge":
        body["extensions"] = {"padding": "x" * HUGE_PADDING}
    return body


def pr_result(required: dict[str, Any]) -> dict[str, Any]:
    return {
        "isError": True,
        "structuredContent": required,
        "content": [{"type": "text", "text": json.dumps(required)}],
    }


class McpApp:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.sessions: set[str] = set()
        self.event_ids = itertools.count(1)
        self.http = httpx.AsyncClient(timeout=60, trust_env=False)

    # -- transport -------------------------------------------------------------------------

    async def mcp(self, request: Request) -> Response:
        if request.method == "GET":
            return Response(status_code=405, headers={"Allow": "POST, DELETE"})
        sid = request.headers.get("mcp-session-id")
        if request.method == "DELETE":
            if sid in self.sessions:
                self.sessions.discard(sid)
                self.stats.sessions_ended.append(sid)
                return Response(status_code=200)
            return Response(status_code=404)
        try:
            message = json.loads(await request.body())
        except ValueError:
            return self.error_response(None, -32700, "Parse error", status=400)
        if isinstance(message, list):  # batch (2025-03-26): answered as one JSON array, never streamed
            answers = [a for m in message if (a := await self.answer_plain(m, sid)) is not None]
            return JSONResponse(answers) if answers else Response(status_code=202)
        if not isinstance(message, dict):
            return self.error_response(None, -32600, "Invalid Request", status=400)
        self.stats.messages.append(
            {
                "method": message.get("method"),
                "id": message.get("id"),
                "session_id": sid,
                "params": _brief(message),
            }
        )
        method = message.get("method")
        if method is None or "id" not in message:  # a notification or a response from the client
            return Response(status_code=202)
        if method == "initialize":
            sid = secrets.token_hex(16)
            self.sessions.add(sid)
            return self.frame(self.initialize(message), headers={"Mcp-Session-Id": sid})
        if sid not in self.sessions:
            return self.error_response(
                message["id"], -32600, "Bad Request: no valid session", status=400 if sid is None else 404
            )
        if method == "tools/call":
            return self.frame_stream(self.tools_call(message))
        answer = await self.answer_plain(message, sid)
        return self.frame(answer or {}, headers={})

    def frame(self, answer: dict[str, Any], *, headers: dict[str, str]) -> Response:
        if self.cfg.framing == "json":
            return JSONResponse(answer, headers=headers)

        async def one() -> AsyncIterator[bytes]:
            yield self.sse(answer)

        return StreamingResponse(
            one(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )

    def frame_stream(self, messages: AsyncIterator[dict[str, Any]]) -> Response:
        if self.cfg.framing == "json":

            async def last() -> AsyncIterator[bytes]:
                final: dict[str, Any] = {}
                async for message in messages:  # JSON framing: notifications are dropped, only the answer
                    final = message
                yield json.dumps(final).encode()

            return StreamingResponse(last(), media_type="application/json")

        async def events() -> AsyncIterator[bytes]:
            async for message in messages:
                yield self.sse(message)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def sse(self, message: dict[str, Any]) -> bytes:
        return f"id: {next(self.event_ids)}\nevent: message\ndata: {json.dumps(message)}\n\n".encode()

    def error_response(self, rid: Any, code: int, text: str, *, status: int) -> Response:
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": text}}, status)

    # -- methods ---------------------------------------------------------------------------

    def initialize(self, message: dict[str, Any]) -> dict[str, Any]:
        asked = (message.get("params") or {}).get("protocolVersion")
        version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1]
        return {
            "jsonrpc": "2.0",
            "id": message["id"],
            "result": {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": False}, "logging": {}},
                "serverInfo": {"name": "x402-mcp-sse", "version": "1.0.0"},
            },
        }

    async def answer_plain(self, message: Any, sid: str | None) -> dict[str, Any] | None:
        if not isinstance(message, dict) or "id" not in message or "method" not in message:
            return None
        rid, method = message["id"], message["method"]
        if method == "ping":
            return {"jsonrpc": "2.0", "id": rid, "result": {}}
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS}}
        if method == "initialize":
            return self.initialize(message)
        if method == "tools/call":
            final: dict[str, Any] = {}
            async for m in self.tools_call(message):
                final = m
            return final
        return {
            "jsonrpc": "2.0",
            "id": rid,
            "error": {"code": -32601, "message": f"Method not found: {method}"},
        }

    async def tools_call(self, message: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        rid = message["id"]
        params = message.get("params") or {}
        name = params.get("name")
        args = params.get("arguments") or {}
        meta = params.get("_meta") or {}
        self.stats.calls[str(name)] += 1
        token = meta.get("progressToken")
        for i in range(self.cfg.events):
            if i:
                await asyncio.sleep(self.cfg.event_interval)
            if token is not None:
                yield _notify(
                    "notifications/progress",
                    {
                        "progressToken": token,
                        "progress": i + 1,
                        "total": self.cfg.events,
                        "message": f"step {i + 1}",
                    },
                )
            yield _notify(
                "notifications/message",
                {"level": "info", "logger": "x402-mcp-sse", "data": f"{name}: step {i + 1}"},
            )
        if name == "echo":
            text = str(args.get("text", ""))
            yield _result(
                rid,
                {
                    "content": [{"type": "text", "text": json.dumps({"echo": text})}],
                    "structuredContent": {"echo": text},
                },
            )
            return
        if name != "forecast":
            yield _result(
                rid, {"isError": True, "content": [{"type": "text", "text": f"Unknown tool: {name}"}]}
            )
            return
        async for m in self.paid_call(rid, args, meta.get(PAYMENT_META)):
            yield m

    async def paid_call(self, rid: Any, args: dict[str, Any], payment: Any) -> AsyncIterator[dict[str, Any]]:
        cfg = self.cfg
        if payment is None:
            yield self.payment_required_answer(rid, "Payment required to access this tool")
            return
        if not isinstance(payment, dict) or payment.get("accepted") != cfg.requirement:
            yield self.payment_required_answer(rid, "No matching payment requirements found")
            return
        request = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": cfg.requirement}
        verify = (await self.http.post(f"{cfg.facilitator_url}/verify", json=request)).json()
        if not verify.get("isValid"):
            yield self.payment_required_answer(
                rid, str(verify.get("invalidReason") or "Payment verification failed")
            )
            return
        self.stats.verified += 1
        city = str(args.get("city", ""))
        result: dict[str, Any] = {
            "content": [{"type": "text", "text": json.dumps({"city": city, "forecast": "sunny"})}],
            "structuredContent": {"city": city, "forecast": "sunny"},
        }
        if cfg.mode == "hang":
            await asyncio.Event().wait()  # never answers, never settles
        if cfg.mode == "pending":
            failure = {
                "success": False,
                "errorReason": "settlement_pending",
                "transaction": "",
                "network": cfg.network,
            }
            yield _result(
                rid,
                pr_result(
                    {
                        **payment_required(cfg, "Payment settlement failed: settlement_pending"),
                        RESPONSE_META: failure,
                    }
                ),
            )
            return
        settle = (await self.http.post(f"{cfg.facilitator_url}/settle", json=request)).json()
        self.stats.settlements.append(settle)
        if not settle.get("success"):
            reason = str(settle.get("errorReason") or "Unknown settlement failure")
            yield _result(
                rid,
                pr_result(
                    {**payment_required(cfg, f"Payment settlement failed: {reason}"), RESPONSE_META: settle}
                ),
            )
            return
        yield _result(rid, {**result, "_meta": {RESPONSE_META: settle}})

    def payment_required_answer(self, rid: Any, error: str) -> dict[str, Any]:
        required = payment_required(self.cfg, error)
        if self.cfg.mode == "rpc-error":
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": 402, "message": error, "data": required}}
        if self.cfg.mode == "malformed":
            broken = {"x402Version": 2, "error": error, "accepts": {"scheme": "exact"}}
            return _result(
                rid,
                {
                    "isError": True,
                    "structuredContent": broken,
                    "content": [{"type": "text", "text": '{"x402Version": 2, "accepts": ['}],
                },
            )
        return _result(rid, pr_result(required))

    # -- test routes -----------------------------------------------------------------------

    async def free(self, _: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def get_stats(self, _: Request) -> JSONResponse:
        s = self.stats
        return JSONResponse(
            {
                "messages": s.messages,
                "calls": dict(s.calls),
                "verified": s.verified,
                "settlements": s.settlements,
                "sessions_ended": s.sessions_ended,
                "mode": self.cfg.mode,
                "framing": self.cfg.framing,
                "price": self.cfg.price,
            }
        )


def _notify(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _brief(message: dict[str, Any]) -> dict[str, Any]:
    """What /__stats keeps of a message's params: the tool name and whether a payment came along."""
    params = message.get("params")
    if not isinstance(params, dict):
        return {}
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    return {"name": params.get("name"), "paid": PAYMENT_META in (meta or {}), "meta_keys": sorted(meta or {})}


def create_app(cfg: Config) -> Starlette:
    app = McpApp(cfg)
    return Starlette(
        routes=[
            Route("/mcp", app.mcp, methods=["GET", "POST", "DELETE"]),
            Route("/free", app.free),
            Route("/__stats", app.get_stats),
        ]
    )


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="wire-level Streamable HTTP MCP server with a paid tool")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--facilitator", required=True)
    p.add_argument("--asset", required=True)
    p.add_argument("--pay-to", required=True)
    p.add_argument("--price", type=int, default=1000)
    p.add_argument("--network", default="eip155:84532")
    p.add_argument("--max-timeout", type=int, default=60)
    p.add_argument("--mode", choices=MODES, default="normal")
    p.add_argument("--framing", choices=("sse", "json"), default="sse")
    p.add_argument("--events", type=int, default=3, help="notifications before each tools/call result")
    p.add_argument("--event-interval", type=float, default=0.05)
    p.add_argument("--ssl-certfile", default=None)
    p.add_argument("--ssl-keyfile", default=None)
    a = p.parse_args(argv)
    return Config(
        port=a.port,
        facilitator_url=a.facilitator,
        asset=a.asset,
        pay_to=a.pay_to,
        price=a.price,
        network=a.network,
        max_timeout_seconds=a.max_timeout,
        mode=a.mode,
        framing=a.framing,
        events=a.events,
        event_interval=a.event_interval,
        host=a.host,
        ssl_certfile=a.ssl_certfile,
        ssl_keyfile=a.ssl_keyfile,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        ssl_certfile=cfg.ssl_certfile,
        ssl_keyfile=cfg.ssl_keyfile,
    )


if __name__ == "__main__":
    main()
