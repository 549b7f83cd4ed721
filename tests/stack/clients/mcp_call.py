"""Call one MCP tool over Streamable HTTP with the official MCP Python SDK (mcp 2.x), configured by the environment.

    python mcp_call.py URL TOOL [ARGS_JSON] [--pay-key 0xKEY] [--network eip155:84532]

Initialises a session, calls TOOL with ARGS_JSON (default {}), and prints one JSON object:
  {"tools": [...], "result": <CallToolResult as JSON>, "progress": [...], "logs": [...]}
`result` is the wire form of the result (`isError`, `content`, `structuredContent`, `_meta`).

With `--pay-key`, a payment-required result (x402 over MCP: `isError` with a PaymentRequired in
`structuredContent` or `content[0].text`) is paid directly, without any proxy: the SDK's
`x402Client.create_payment_payload` signs it and the same call is sent again with
`meta={"x402/payment": <PaymentPayload JSON>}`. Then the output also has "payment_required" (the first
result) and "payload" (what was sent).

The SDK's default HTTP client (httpx) reads HTTP_PROXY / HTTPS_PROXY / NO_PROXY and SSL_CERT_FILE from the
environment, so running this in an environment printed by `x402-proxy env` sends it through the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, cast

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


def wire(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    return data


def payment_required_of(result: dict[str, Any]) -> dict[str, Any] | None:
    if not result.get("isError"):
        return None
    sc = result.get("structuredContent")
    if isinstance(sc, dict) and "accepts" in sc:
        return sc
    content = result.get("content") or []
    if content and content[0].get("type") == "text":
        try:
            data = json.loads(content[0]["text"])
        except ValueError:
            return None
        if isinstance(data, dict) and "accepts" in data:
            return data
    return None


async def sign(payment_required: dict[str, Any], key: str, network: str) -> dict[str, Any]:
    from eth_account import Account
    from x402 import x402Client
    from x402.mechanisms.evm.exact.register import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner
    from x402.schemas import PaymentRequired

    client = x402Client()
    client.set_spend_controls(False)  # the local TestUSDC is no known asset
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(key)), networks=network)
    payload = await client.create_payment_payload(PaymentRequired.model_validate(payment_required))
    data: dict[str, Any] = payload.model_dump(by_alias=True, exclude_none=True)
    return data


async def call(
    url: str, tool: str, arguments: dict[str, Any], key: str | None, network: str
) -> dict[str, Any]:
    arrivals: list[dict[str, Any]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append({"progress": progress, "total": total, "message": message})

    out: dict[str, Any] = {}
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
        result = wire(await session.call_tool(tool, arguments, progress_callback=on_progress))
        required = payment_required_of(result) if key else None
        if key and required is not None:
            out["payment_required"] = result
            payload = await sign(required, key, network)
            out["payload"] = payload
            result = wire(await session.call_tool(tool, arguments, meta=cast(Any, {"x402/payment": payload})))
        out["result"] = result
    out["progress"] = arrivals
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("tool")
    p.add_argument("arguments", nargs="?", default="{}")
    p.add_argument("--pay-key", default=None)
    p.add_argument("--network", default="eip155:84532")
    a = p.parse_args()
    out = asyncio.run(call(a.url, a.tool, json.loads(a.arguments), a.pay_key, a.network))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
