"""Paid MCP server built with the reference SDK's MCP wrapper (`x402.mcp`), x402 over MCP (no HTTP 402).

Runs from its own venv (`tests/stack/.venv-mcp1`, made by `make mcp1-venv`): the wrapper imports
`mcp.server.fastmcp`, which exists only in `mcp<2`, while the main venv has mcp 2.x. So this file imports
nothing from the repository and nothing from the main venv.

    tests/stack/.venv-mcp1/bin/python tests/stack/server_mcp_x402.py --port P --facilitator URL \\
        --asset 0xTOKEN --pay-to 0xADDR [--price 1000] [--host 127.0.0.1] [--json-response]

Tools (FastMCP over Streamable HTTP at /mcp, stateful, SSE answers unless --json-response):
  * `add(a, b)`             free
  * `weather(city)`         paid, --price atomic TestUSDC, scheme exact on eip155:84532, settled by --facilitator
A paid call without `_meta["x402/payment"]` answers the payment-required result (`isError: true`, the
PaymentRequired in `structuredContent` and as JSON in `content[0].text`); with a valid payment it verifies,
runs the tool, settles, and returns the result with `_meta["x402/payment-response"]`.

Routes besides /mcp: `GET /free` (readiness), `GET /__stats` (calls per tool, settlements).

SDK caveat worked around here (x402 2.25): `x402.mcp.server_async.wrap_fastmcp_tool` imports two helpers
from `x402.mcp.server` that do not exist (`_extract_meta_from_fastmcp_context`,
`_mcp_tool_result_to_call_tool_result`), so it raises ImportError at the first call. We use the FastMCP
decorator `x402.mcp.create_payment_wrapper` (module `x402.mcp.server`) instead, which reads `_meta` from the
injected FastMCP Context itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import uvicorn
from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mcp import create_payment_wrapper
from x402.mcp.types import PaymentWrapperHooks
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import PaymentRequirements, ResourceInfo

log = logging.getLogger("x402-stack.server_mcp_x402")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="paid MCP server (x402.mcp on FastMCP, mcp<2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--facilitator", required=True)
    p.add_argument("--asset", required=True)
    p.add_argument("--pay-to", required=True)
    p.add_argument("--price", type=int, default=1000, help="atomic units of the token")
    p.add_argument("--network", default="eip155:84532")
    p.add_argument("--token-name", default="USDC")
    p.add_argument("--token-version", default="2")
    p.add_argument("--max-timeout", type=int, default=60)
    p.add_argument("--json-response", action="store_true", help="answer POSTs as application/json, not SSE")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Any:
    calls: Counter[str] = Counter()
    settlements: list[dict[str, Any]] = []

    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=args.facilitator, timeout=60.0))
    server = x402ResourceServer(facilitator)
    scheme: Any = ExactEvmServerScheme
    server.register(args.network, scheme())
    server.initialize()  # GET /supported once, before the first call needs it

    accepts = [
        PaymentRequirements(
            scheme="exact",
            network=args.network,
            asset=args.asset,
            amount=str(args.price),
            pay_to=args.pay_to,
            max_timeout_seconds=args.max_timeout,
            extra={"name": args.token_name, "version": args.token_version},
        )
    ]

    async def after_settlement(ctx: Any) -> None:
        settlements.append(
            {
                "tool": ctx.tool_name,
                "transaction": ctx.settlement.transaction,
                "success": ctx.settlement.success,
                "payer": ctx.settlement.payer,
            }
        )

    # Typed here: the SDK's decorator factory is unannotated.
    paid: Callable[[Callable[..., Any]], Callable[..., Any]] = create_payment_wrapper(
        server,
        accepts=accepts,
        resource=ResourceInfo(
            url="mcp://tool/weather", description="Weather for a city", mime_type="application/json"
        ),
        hooks=PaymentWrapperHooks(on_after_settlement=after_settlement),
    )

    mcp = FastMCP(
        "x402-mcp-reference",
        host=args.host,
        port=args.port,
        json_response=args.json_response,
        transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{args.host}:*"],
            allowed_origins=[f"http://{args.host}:*", f"https://{args.host}:*"],
        ),
    )

    @mcp.tool(name="add", description="Add two integers (free).")
    def add(a: int, b: int) -> str:
        calls["add"] += 1
        return str(a + b)

    @mcp.tool(name="weather", description="Weather for a city (paid).")
    @paid
    async def weather(city: str) -> str:
        calls["weather"] += 1
        await asyncio.sleep(0)
        return json.dumps({"city": city, "weather": "sunny", "temperature": 21})

    app = mcp.streamable_http_app()

    async def free(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse({"calls": dict(calls), "settlements": settlements, "price": args.price})

    app.router.routes += [Route("/free", free), Route("/__stats", stats)]
    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
