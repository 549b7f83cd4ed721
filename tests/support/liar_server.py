"""A resource server that lies about settlement, on loopback, selling for real on the local stack.

Every route answers an unpaid request with an honest x402 V2 challenge (the stack's token and payTo);
what it does with a payment depends on the first path segment:

- `/settle-then-402/...`: settles the payment through the real facilitator, then answers a fresh 402
  (no receipt): the money moved, the server says it did not.
- `/settle-then-500/...`: settles, then answers 500 without a receipt.
- `/success-no-tx/...`: settles, answers 200 with a receipt `success: true` and no transaction.
- `/fake-tx/...`: settles, answers 200 with `success: true` and a transaction hash that does not exist.
- `/other-tx/...`: does *not* settle; answers 200 with `success: true` and `other_tx` (someone else's
  real transaction).

`maxTimeoutSeconds` is 0 (the proxy clamps its signing window; the attack of issue 12 used it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, web

from tests.stack import Stack

FAKE_TX = "0x" + "ee" * 32


def _b64(document: Any) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


@dataclass
class LiarServer:
    stack: Stack
    other_tx: str = ""
    settlements: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runner: web.AppRunner | None = None

    def start(self) -> LiarServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self._app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True, name="liar-server").start()
        if not ready.wait(10):
            raise RuntimeError("liar server did not start")
        return self

    def stop(self) -> None:
        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _challenge(self, url: str) -> str:
        stack = self.stack
        requirement = {
            "scheme": "exact",
            "network": stack.network_v2,
            "asset": stack.token,
            "amount": str(stack.price),
            "payTo": stack.pay_to,
            "maxTimeoutSeconds": 0,
            "extra": {"name": stack.token_name, "version": stack.token_version},
        }
        return _b64(
            {
                "x402Version": 2,
                "error": "Payment required",
                "resource": {"url": url, "description": "liar", "mimeType": "application/json"},
                "accepts": [requirement],
            }
        )

    async def _settle(self, signature: str) -> dict[str, Any]:
        payload = json.loads(base64.b64decode(signature))
        body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}
        async with (
            ClientSession() as session,
            session.post(f"{self.stack.facilitator_url}/settle", json=body) as r,
        ):
            result: dict[str, Any] = await r.json()
        self.settlements.append(result)
        return result

    def _app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            url = f"{self.url}{request.raw_path}"
            kind = request.path.strip("/").split("/")[0]
            signature = request.headers.get("PAYMENT-SIGNATURE")
            challenge = {"PAYMENT-REQUIRED": self._challenge(url)}
            if not signature:
                return web.json_response({}, status=402, headers=challenge)
            if kind == "other-tx":
                receipt = {"success": True, "transaction": self.other_tx, "network": self.stack.network_v2}
                return web.json_response({"ok": True}, headers={"PAYMENT-RESPONSE": _b64(receipt)})
            result = await self._settle(signature)
            if kind == "settle-then-402":
                return web.json_response({}, status=402, headers=challenge)
            if kind == "settle-then-500":
                return web.json_response({"error": "after settling"}, status=500)
            transaction = "" if kind == "success-no-tx" else FAKE_TX
            receipt = {"success": True, "transaction": transaction, "network": result.get("network")}
            return web.json_response({"ok": True}, headers={"PAYMENT-RESPONSE": _b64(receipt)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app
