"""Reference V2 resource server: FastAPI + the PyPI SDK's `PaymentMiddlewareASGI`.

Prices are in the local TestUSDC (explicit asset + atomic amount + EIP-712 `extra`), never "$0.01",
which would resolve to the real Base Sepolia USDC.

Routes (every handler answers JSON including the request headers it received, so tests can
assert which credentials reached the origin):
  GET  /free                 no payment
  POST /free/echo            no payment, echoes body
  GET  /paid/a, /paid/b      paid (--price, --price-b)
  GET  /paid/fail500         paid; handler answers 500, so the SDK must not settle
  GET  /paid/slow?delay=S    paid; handler sleeps S seconds first (timeouts, concurrency)
  POST /paid/echo            paid; echoes body and headers
  GET  /paid/events?count=N&interval=S
                             paid; a text/event-stream of N events, one every S seconds (the SDK
                             middleware buffers the answer it settles; a SIWX-granted request streams)
  GET  /__stats              handler invocation counts and settlements seen by this server

Any route, `?gate=KEY&gate_n=N[&gate_timeout=S]`: a request carrying no payment is held until N such
requests have arrived at gate KEY (or S seconds, default 10, passed since it arrived), then all are let
through at once; once open, a gate stays open. So N concurrent clients all hold their 402 before any of
them can pay (fleet races). `/__stats` shows each gate: how many it held, how many came after, and
whether the count or the timeout opened it.

Options: --ssl-certfile/--ssl-keyfile serve HTTPS (for tests through the proxy's CONNECT interception);
--siwx enables the sign-in-with-x extension on paid routes (a wallet that paid for a path
gets it again by SIWX alone); --payment-identifier optional|required declares that extension and
turns on idempotent replay (same id + same payload -> cached response, different payload -> 409).

Self-contained so it runs as `python -m tests.stack.server_py ...` or by file path.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from x402 import x402ResourceServer
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    declare_payment_identifier_extension,
    payment_identifier_resource_server_extension,
)
from x402.extensions.sign_in_with_x import (
    CreateSIWxResourceServerExtensionOptions,
    DeclareSIWxOptions,
    InMemorySIWxStorage,
    create_siwx_resource_server_extension,
    declare_siwx_extension,
)
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, PaymentOption, RouteConfig
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.schemas import AssetAmount

log = logging.getLogger("x402-stack.server_py")

PAID_ROUTES = (
    "GET /paid/a",
    "GET /paid/b",
    "GET /paid/fail500",
    "GET /paid/slow",
    "POST /paid/echo",
    "GET /paid/events",
)


@dataclass
class ServerConfig:
    port: int
    facilitator_url: str
    asset: str
    pay_to: str
    price: int = 1000
    price_b: int | None = None
    network: str = "eip155:84532"
    token_name: str = "USDC"
    token_version: str = "2"
    max_timeout_seconds: int = 60
    host: str = "127.0.0.1"
    origin: str | None = None
    siwx: bool = False
    payment_identifier: str = "off"  # off | optional | required
    # How a payer may come back without paying again: "off", "lease" (this server issues a cookie and an
    # x-x402-lease header with the paid answer and honours either), or "token" (it honours x402-proxy's
    # signed session token, checked with proxy.tokens.verify_session_token against its own settlements).
    reuse: str = "off"
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @property
    def public_origin(self) -> str:
        scheme = "https" if self.ssl_certfile else "http"
        return self.origin or f"{scheme}://{self.host}:{self.port}"


@dataclass
class Stats:
    handled: Counter[str] = field(default_factory=Counter)
    settlements: list[dict[str, Any]] = field(default_factory=list)
    idempotent_replays: int = 0
    idempotency_conflicts: int = 0
    gates: dict[str, _Gate] = field(default_factory=dict)


# Requests carrying one of these are paying: a gate never holds them.
PAYMENT_HEADERS = ("payment-signature", "x-payment")


@dataclass
class _Gate:
    held: int = 0  # requests without a payment that waited at the closed gate
    after: int = 0  # requests without a payment that found it open
    opened_by: str | None = None  # "count" | "timeout"
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def open(self, by: str) -> None:
        if not self.opened.is_set():
            self.opened_by = by
            self.opened.set()

    def report(self) -> dict[str, Any]:
        return {"held": self.held, "after": self.after, "opened_by": self.opened_by}


def _headers(request: Request) -> dict[str, str]:
    """Request headers as received (lower-cased names; repeated headers joined with ', ')."""
    out: dict[str, str] = {}
    for key, value in request.headers.items():
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _payer(request: Request) -> str | None:
    payload = getattr(request.state, "payment_payload", None)
    if payload is None:
        return None
    auth = (payload.payload or {}).get("authorization") or {}
    return auth.get("from")


def _report(request: Request, **extra: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "headers": _headers(request),
        # True when this request carried a verified payment (False for free routes and SIWX access).
        "paid": getattr(request.state, "payment_payload", None) is not None,
        "payer": _payer(request),
        **extra,
    }


def _route(cfg: ServerConfig, amount: int, description: str, extensions: dict[str, Any]) -> RouteConfig:
    return RouteConfig(
        accepts=PaymentOption(
            scheme="exact",
            pay_to=cfg.pay_to,
            price=AssetAmount(
                amount=str(amount),
                asset=cfg.asset,
                extra={"name": cfg.token_name, "version": cfg.token_version},
            ),
            network=cfg.network,
            max_timeout_seconds=cfg.max_timeout_seconds,
        ),
        description=description,
        mime_type="application/json",
        extensions=dict(extensions) or None,
    )


def _payment_identifier_of(header: str) -> tuple[str, str] | None:
    """(payment id, payload fingerprint) from a PAYMENT-SIGNATURE header, if it carries an id."""
    try:
        data = json.loads(base64.b64decode(header))
        info = ((data.get("extensions") or {}).get(PAYMENT_IDENTIFIER) or {}).get("info") or {}
        pid = info.get("id")
    except Exception:
        return None
    if not isinstance(pid, str) or not pid:
        return None
    fingerprint = hashlib.sha256(
        json.dumps([data.get("accepted"), data.get("payload")], sort_keys=True).encode()
    ).hexdigest()
    return pid, fingerprint


def payment_server(cfg: ServerConfig, stats: Stats) -> tuple[x402ResourceServer, dict[str, Any]]:
    """The SDK resource server (exact EVM scheme, optional SIWX / payment-identifier) and the extensions
    its paid routes declare. Shared with `server_mcp.py`, which puts the same middleware before MCP."""
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=cfg.facilitator_url, timeout=60.0))
    server = x402ResourceServer(facilitator)
    # Typed as Any: the SDK class is unannotated and does not match its own Protocol (mypy-only issue).
    scheme_cls: Any = ExactEvmServerScheme
    server.register(cfg.network, scheme_cls())

    async def record_settlement(ctx: Any) -> None:
        resource = getattr(ctx.payment_payload, "resource", None)
        stats.settlements.append(
            {
                "resource": resource.url if resource else None,
                "payer": ctx.result.payer,
                "transaction": ctx.result.transaction,
                "success": ctx.result.success,
            }
        )

    server.on_after_settle(record_settlement)

    extensions: dict[str, Any] = {}
    if cfg.siwx:
        server.register_extension(
            create_siwx_resource_server_extension(
                CreateSIWxResourceServerExtensionOptions(
                    storage=InMemorySIWxStorage(), origin=cfg.public_origin
                )
            )
        )
        extensions.update(
            declare_siwx_extension(
                DeclareSIWxOptions(
                    network=cfg.network,
                    statement="Sign in to reuse your x402 purchase",
                    expiration_seconds=300,
                )
            )
        )
    if cfg.payment_identifier != "off":
        server.register_extension(cast(Any, payment_identifier_resource_server_extension))
        extensions[PAYMENT_IDENTIFIER] = declare_payment_identifier_extension(
            required=cfg.payment_identifier == "required"
        )
    return server, extensions


def create_app(cfg: ServerConfig) -> FastAPI:
    stats = Stats()
    server, extensions = payment_server(cfg, stats)
    price_b = cfg.price_b if cfg.price_b is not None else cfg.price
    routes = {
        "GET /paid/a": _route(cfg, cfg.price, "paid resource A", extensions),
        "GET /paid/b": _route(cfg, price_b, "paid resource B", extensions),
        "GET /paid/fail500": _route(cfg, cfg.price, "paid resource whose handler fails", extensions),
        "GET /paid/slow": _route(cfg, cfg.price, "paid resource with a slow handler", extensions),
        "POST /paid/echo": _route(cfg, cfg.price, "paid echo", extensions),
        "GET /paid/events": _route(cfg, cfg.price, "paid event stream", extensions),
    }

    app = FastAPI(title="x402 reference server (python)")
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)

    if cfg.payment_identifier != "off":
        idempotency_cache: dict[str, tuple[str, int, dict[str, str], bytes]] = {}
        id_locks: dict[str, asyncio.Lock] = {}

        # Added after the payment middleware, so it wraps it: a replay never reaches verify/settle.
        @app.middleware("http")
        async def payment_identifier_idempotency(request: Request, call_next: Any) -> Response:
            header = request.headers.get("payment-signature")
            ident = _payment_identifier_of(header) if header else None
            if ident is None:
                response: Response = await call_next(request)
                return response
            pid, fingerprint = ident
            async with id_locks.setdefault(pid, asyncio.Lock()):
                cached = idempotency_cache.get(pid)
                if cached is not None:
                    if cached[0] != fingerprint:
                        stats.idempotency_conflicts += 1
                        return JSONResponse(
                            {"error": "payment identifier already used with a different payload"}, 409
                        )
                    stats.idempotent_replays += 1
                    return Response(content=cached[3], status_code=cached[1], headers=cached[2])
                response = await call_next(request)
                body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
                headers = dict(response.headers)
                if response.status_code < 400 and "payment-response" in headers:
                    idempotency_cache[pid] = (fingerprint, response.status_code, headers, body)
                return Response(content=body, status_code=response.status_code, headers=headers)

    if cfg.reuse != "off":
        _install_reuse(app, cfg, stats)
    _install_gates(app, stats)

    @app.get("/free")
    async def free(request: Request) -> dict[str, Any]:
        stats.handled["/free"] += 1
        return _report(request)

    @app.post("/free/echo")
    async def free_echo(request: Request) -> dict[str, Any]:
        stats.handled["/free/echo"] += 1
        body = await request.body()
        return _report(
            request, body=body.decode("utf-8", "replace"), body_sha256=hashlib.sha256(body).hexdigest()
        )

    @app.get("/paid/a")
    async def paid_a(request: Request) -> dict[str, Any]:
        stats.handled["/paid/a"] += 1
        return _report(request, resource="a")

    @app.get("/paid/b")
    async def paid_b(request: Request) -> dict[str, Any]:
        stats.handled["/paid/b"] += 1
        return _report(request, resource="b")

    @app.get("/paid/fail500")
    async def paid_fail500(request: Request) -> JSONResponse:
        stats.handled["/paid/fail500"] += 1
        return JSONResponse({**_report(request), "ok": False, "error": "handler failed on purpose"}, 500)

    @app.get("/paid/slow")
    async def paid_slow(request: Request, delay: float = 1.0) -> dict[str, Any]:
        stats.handled["/paid/slow"] += 1
        await asyncio.sleep(delay)
        return _report(request, resource="slow", delay=delay)

    @app.post("/paid/echo")
    async def paid_echo(request: Request) -> dict[str, Any]:
        stats.handled["/paid/echo"] += 1
        body = await request.body()
        return _report(
            request, body=body.decode("utf-8", "replace"), body_sha256=hashlib.sha256(body).hexdigest()
        )

    @app.get("/paid/events")
    async def paid_events(request: Request, count: int = 5, interval: float = 0.3) -> StreamingResponse:
        stats.handled["/paid/events"] += 1
        paid = getattr(request.state, "payment_payload", None) is not None

        async def events() -> AsyncIterator[bytes]:
            for i in range(count):
                if i:
                    await asyncio.sleep(interval)
                data = json.dumps({"i": i, "paid": paid, "sent_at": time.time()})
                yield f"id: {i}\nevent: tick\ndata: {data}\n\n".encode()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @app.get("/__stats")
    async def get_stats() -> dict[str, Any]:
        return {
            "handled": dict(stats.handled),
            "settlements": list(stats.settlements),
            "idempotent_replays": stats.idempotent_replays,
            "idempotency_conflicts": stats.idempotency_conflicts,
            "gates": {key: gate.report() for key, gate in stats.gates.items()},
            "config": {
                "price": cfg.price,
                "price_b": price_b,
                "siwx": cfg.siwx,
                "payment_identifier": cfg.payment_identifier,
            },
        }

    return app


def _install_reuse(app: FastAPI, cfg: ServerConfig, stats: Stats) -> None:
    """Server-side reuse of a purchase, the way an API provider might add it in front of the middleware."""
    import secrets

    from proxy.tokens import InvalidSessionToken, verify_session_token

    leases: dict[str, str] = {}  # lease -> paid path
    settlements: set[str] = set()  # tx hashes this server settled

    # Registered after the payment middleware, so it runs first: a valid credential never reaches it.
    @app.middleware("http")
    async def reuse(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if cfg.reuse == "lease":
            lease = request.headers.get("x-x402-lease") or request.cookies.get("x402_lease")
            if lease is not None and leases.get(lease) == path:
                stats.handled[f"{path} (lease)"] += 1
                return JSONResponse(_report(request, reused="lease"))
        elif request.headers.get("x-session-token"):
            try:
                claim = verify_session_token(
                    request.headers["x-session-token"],
                    url=str(request.url),
                    wallet=request.headers.get("x-session-wallet"),
                    session_id=request.headers.get("payment-session"),
                )
            except InvalidSessionToken as exc:
                return JSONResponse({"error": f"session token refused: {exc.reason}"}, 401)
            if claim.tx_hash in settlements and (claim.pay_to or "").lower() == cfg.pay_to.lower():
                stats.handled[f"{path} (token)"] += 1
                return JSONResponse(_report(request, reused="token"))
        response: Response = await call_next(request)
        receipt = response.headers.get("payment-response")
        if response.status_code < 400 and receipt:
            settled = json.loads(base64.b64decode(receipt))
            settlements.add(str(settled.get("transaction")))
            if cfg.reuse == "lease":
                lease = secrets.token_urlsafe(16)
                leases[lease] = path
                response.headers["x-x402-lease"] = lease
                response.set_cookie("x402_lease", lease, path=path, httponly=True)
        return response


def _install_gates(app: FastAPI, stats: Stats) -> None:
    """`?gate=KEY&gate_n=N`: hold requests without a payment until N have arrived (see the module doc)."""

    # Registered last, so it runs before every other middleware (the 402 is written after the wait).
    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Response:
        key = request.query_params.get("gate")
        if key is None or any(name in request.headers for name in PAYMENT_HEADERS):
            response: Response = await call_next(request)
            return response
        try:
            count = int(request.query_params.get("gate_n", "1"))
            timeout = float(request.query_params.get("gate_timeout", "10"))
        except ValueError:
            return JSONResponse({"error": "gate_n must be an integer, gate_timeout a number"}, 400)
        held = stats.gates.setdefault(key, _Gate())
        if held.opened.is_set():
            held.after += 1
        else:
            held.held += 1
            if held.held >= count:
                held.open("count")
            else:
                try:
                    await asyncio.wait_for(held.opened.wait(), timeout)
                except TimeoutError:
                    held.open("timeout")
        response = await call_next(request)
        return response


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    env = os.environ.get
    p = argparse.ArgumentParser(description="x402 reference resource server (FastAPI, V2)")
    p.add_argument("--host", default=env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PORT", "0")) or None, required=env("PORT") is None)
    p.add_argument(
        "--facilitator", default=env("X402_FACILITATOR_URL"), required=env("X402_FACILITATOR_URL") is None
    )
    p.add_argument("--asset", default=env("X402_ASSET"), required=env("X402_ASSET") is None)
    p.add_argument("--pay-to", default=env("X402_PAY_TO"), required=env("X402_PAY_TO") is None)
    p.add_argument("--price", type=int, default=int(env("X402_PRICE", "1000")), help="atomic units")
    p.add_argument("--price-b", type=int, default=None, help="price of /paid/b (default: --price)")
    p.add_argument("--network", default=env("X402_NETWORK", "eip155:84532"))
    p.add_argument("--max-timeout", type=int, default=60)
    p.add_argument("--origin", default=None, help="public origin for SIWX (default http(s)://host:port)")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this PEM certificate (chain)")
    p.add_argument("--ssl-keyfile", default=None, help="private key for --ssl-certfile")
    p.add_argument("--siwx", action="store_true", default=env("X402_SIWX") == "1")
    p.add_argument(
        "--payment-identifier", choices=("off", "optional", "required"), default=env("X402_PAYMENT_ID", "off")
    )
    p.add_argument("--reuse", choices=("off", "lease", "token"), default="off")
    a = p.parse_args(argv)
    return ServerConfig(
        port=a.port,
        facilitator_url=a.facilitator,
        asset=a.asset,
        pay_to=a.pay_to,
        price=a.price,
        price_b=a.price_b,
        network=a.network,
        max_timeout_seconds=a.max_timeout,
        host=a.host,
        origin=a.origin,
        siwx=a.siwx,
        payment_identifier=a.payment_identifier,
        reuse=a.reuse,
        ssl_certfile=a.ssl_certfile,
        ssl_keyfile=a.ssl_keyfile,
    )


def serve(app: Any, cfg: ServerConfig) -> None:
    """Run an app on the configured address (and TLS); shared with server_mcp.py."""
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        ssl_certfile=cfg.ssl_certfile,
        ssl_keyfile=cfg.ssl_keyfile,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(create_app(cfg), cfg)


if __name__ == "__main__":
    main()
