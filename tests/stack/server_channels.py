"""x402 `batch-settlement` (payment channels) for tests: a facilitator and a resource server.

Two subcommands, each one process (started by `tests/stack/channels.py`):

  facilitator --port P --rpc URL --key HEX
      The reference PyPI SDK facilitator with `batch-settlement` (BatchSettlementEvmFacilitator) and
      `exact` on eip155:84532: POST /verify, POST /settle, GET /supported, GET /__stats. It advertises
      no receiverAuthorizer: the seller (the server below) signs its own claims and refunds.

  server --port P --facilitator URL --asset TOKEN --pay-to ADDR --authorizer-key HEX [--price N]
      FastAPI + the SDK's PaymentMiddlewareASGI with the SDK's batch-settlement server scheme
      (BatchSettlementEvmScheme, in-memory channel storage, the receiverAuthorizer key). Routes:
        GET  /free                 no payment
        GET  /paid/ch              paid: batch-settlement first, exact second (--price)
        GET  /paid/ch-only         paid: batch-settlement only (the client's refund probe target)
        GET  /paid/slow?delay=S    batch-settlement; the handler sleeps S seconds (channel busy)
        GET  /paid/many/{n}        batch-settlement only, a scope (so a channel) per n (bench/channel_requests.py)
        GET  /s/{tail}             no payment (a session hit's target in bench/channel_requests.py)
      Seller controls (the seller's side of a channel, driven by tests):
        GET  /__channels           the server's channel records (SDK `Channel.to_dict()`)
        POST /__claim_settle       channel manager: claim every unclaimed voucher, then settle
        POST /__settle             channel manager: settle what is claimed (e.g. by a refund batch)
        POST /__refund             channel manager: refund every idle channel's unclaimed rest
        GET  /__stats              handler invocations and settle results seen

Prices are in the local TestUSDC (explicit asset + atomic amount + EIP-712 `extra`). Self-contained
(no package-relative imports) so it runs by file path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from x402 import SchemeNotFoundError, x402FacilitatorSync, x402ResourceServer
from x402.http import (
    FacilitatorConfig,
    HTTPFacilitatorClient,
    HTTPFacilitatorClientSync,
    PaymentOption,
    RouteConfig,
)
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner
from x402.mechanisms.evm.batch_settlement.constants import SCHEME_BATCH_SETTLEMENT
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.server import (
    BatchSettlementChannelManagerSync,
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeServerConfig,
    ChannelManagerConfigSync,
    ClaimOptions,
)
from x402.mechanisms.evm.exact import ExactEvmServerScheme
from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme
from x402.schemas import AssetAmount, SettleResponse, VerifyResponse
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

log = logging.getLogger("x402-stack.channels")

NETWORK = "eip155:84532"


# -- facilitator ------------------------------------------------------------------------------


def _dump(model: VerifyResponse | SettleResponse) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True)
    return data


def create_facilitator_app(rpc_url: str, private_key: str, confirmation_timeout: float = 30) -> FastAPI:
    signer = FacilitatorWeb3Signer(
        private_key=private_key, rpc_url=rpc_url, confirmation_timeout_seconds=confirmation_timeout
    )
    facilitator = x402FacilitatorSync()
    facilitator.register([NETWORK], BatchSettlementEvmFacilitator(signer))
    facilitator.register([NETWORK], ExactEvmScheme(signer))
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    settled: list[dict[str, Any]] = []
    app = FastAPI(title="x402 batch-settlement facilitator (local)")

    def parse(body: dict[str, Any]) -> tuple[Any, Any]:
        raw = body["paymentPayload"]
        version = int(body.get("x402Version") or raw.get("x402Version") or 2)
        return parse_payment_payload(raw), parse_payment_requirements(version, body["paymentRequirements"])

    def kind(payload: Any) -> str:
        inner = payload.payload if isinstance(payload.payload, dict) else {}
        return f"{payload.accepted.scheme}:{inner.get('type', 'exact')}"

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        data: dict[str, Any] = facilitator.get_supported().model_dump(by_alias=True, exclude_none=True)
        return data

    @app.post("/verify")
    def verify(body: dict[str, Any]) -> JSONResponse:
        try:
            payload, requirements = parse(body)
            result = facilitator.verify(payload, requirements)
        except SchemeNotFoundError as exc:
            return JSONResponse(
                {"isValid": False, "invalidReason": "unsupported_scheme", "invalidMessage": str(exc)}
            )
        except Exception as exc:  # a malformed body is the caller's problem, reported not raised
            return JSONResponse(
                {"isValid": False, "invalidReason": "invalid_payload", "invalidMessage": str(exc)}
            )
        with lock:
            counts[f"verify {kind(payload)} {'ok' if result.is_valid else result.invalid_reason}"] += 1
        if not result.is_valid:
            log.warning("verify invalid: %s %s", result.invalid_reason, result.invalid_message)
        return JSONResponse(_dump(result))

    @app.post("/settle")
    def settle(body: dict[str, Any]) -> JSONResponse:
        try:
            payload, requirements = parse(body)
            result = facilitator.settle(payload, requirements)
        except Exception as exc:
            log.exception("settle raised")
            return JSONResponse(
                {
                    "success": False,
                    "errorReason": "invalid_payload",
                    "errorMessage": str(exc),
                    "transaction": "",
                    "network": NETWORK,
                }
            )
        with lock:
            counts[f"settle {kind(payload)} {'ok' if result.success else result.error_reason}"] += 1
            if result.success:
                settled.append(
                    {"kind": kind(payload), "transaction": result.transaction, "amount": result.amount}
                )
        if not result.success:
            log.warning("settle failed: %s %s", result.error_reason, result.error_message)
        return JSONResponse(_dump(result))

    @app.get("/__stats")
    def stats() -> dict[str, Any]:
        with lock:
            return {"counts": dict(counts), "settled": list(settled)}

    return app


# -- resource server --------------------------------------------------------------------------


@dataclass
class ServerConfig:
    port: int
    facilitator_url: str
    asset: str
    pay_to: str
    authorizer_key: str
    price: int = 1000
    network: str = NETWORK
    token_name: str = "USDC"
    token_version: str = "2"
    max_timeout_seconds: int = 60
    withdraw_delay: int = 900
    host: str = "127.0.0.1"


@dataclass
class Stats:
    handled: Counter[str] = field(default_factory=Counter)
    settlements: list[dict[str, Any]] = field(default_factory=list)


def _option(cfg: ServerConfig, scheme: str) -> PaymentOption:
    return PaymentOption(
        scheme=scheme,
        pay_to=cfg.pay_to,
        price=AssetAmount(
            amount=str(cfg.price),
            asset=cfg.asset,
            extra={"name": cfg.token_name, "version": cfg.token_version},
        ),
        network=cfg.network,
        max_timeout_seconds=cfg.max_timeout_seconds,
    )


def create_server_app(cfg: ServerConfig) -> FastAPI:
    stats = Stats()
    facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=cfg.facilitator_url, timeout=60.0))
    server = x402ResourceServer(facilitator)
    channels = BatchSettlementEvmScheme(
        cfg.pay_to,
        BatchSettlementEvmSchemeServerConfig(
            receiver_authorizer_signer=LocalAuthorizerSigner(cfg.authorizer_key),
            withdraw_delay=cfg.withdraw_delay,
        ),
    )
    # Typed as Any: the SDK scheme classes are unannotated against their Protocol (mypy-only issue).
    exact_cls: Any = ExactEvmServerScheme
    schemes: list[Any] = [channels, exact_cls()]
    for scheme in schemes:
        server.register(cfg.network, scheme)

    async def record_settlement(ctx: Any) -> None:
        inner = ctx.payment_payload.payload if isinstance(ctx.payment_payload.payload, dict) else {}
        stats.settlements.append(
            {
                "scheme": ctx.payment_payload.accepted.scheme,
                "type": inner.get("type"),
                "success": ctx.result.success,
                "transaction": ctx.result.transaction,
                "amount": ctx.result.amount,
            }
        )

    server.on_after_settle(record_settlement)

    # The seller's batch jobs (claim, settle, refund) talk to the same facilitator, synchronously.
    manager = BatchSettlementChannelManagerSync(
        ChannelManagerConfigSync(
            scheme=channels,
            facilitator=HTTPFacilitatorClientSync(FacilitatorConfig(url=cfg.facilitator_url, timeout=60.0)),
            receiver=cfg.pay_to,
            token=cfg.asset,
            network=cfg.network,
        )
    )

    both = [_option(cfg, SCHEME_BATCH_SETTLEMENT), _option(cfg, "exact")]
    only = [_option(cfg, SCHEME_BATCH_SETTLEMENT)]
    routes = {
        "GET /paid/ch": RouteConfig(
            accepts=both, description="paid by channel", mime_type="application/json"
        ),
        "GET /paid/ch-only": RouteConfig(
            accepts=only, description="channel only", mime_type="application/json"
        ),
        "GET /paid/slow": RouteConfig(
            accepts=only, description="slow, channel only", mime_type="application/json"
        ),
        "GET /paid/many/*": RouteConfig(
            accepts=only, description="one of many channel scopes", mime_type="application/json"
        ),
    }

    app = FastAPI(title="x402 batch-settlement reference server")
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)

    def report(request: Request, **extra: Any) -> dict[str, Any]:
        stats.handled[request.url.path] += 1
        return {"ok": True, "path": request.url.path, **extra}

    @app.get("/free")
    async def free(request: Request) -> dict[str, Any]:
        return report(request)

    @app.get("/paid/ch")
    async def paid_ch(request: Request) -> dict[str, Any]:
        return report(request)

    @app.get("/paid/ch-only")
    async def paid_ch_only(request: Request) -> dict[str, Any]:
        return report(request)

    @app.get("/paid/slow")
    async def paid_slow(request: Request, delay: float = 1.0) -> dict[str, Any]:
        await asyncio.sleep(delay)
        return report(request, delay=delay)

    @app.get("/paid/many/{n}")
    async def paid_many(request: Request, n: str) -> dict[str, Any]:
        return report(request)

    @app.get("/s/{tail}")
    async def session_target(request: Request, tail: str) -> dict[str, Any]:
        return report(request)

    @app.get("/__channels")
    def list_channels() -> list[dict[str, Any]]:
        return [c.to_dict() for c in channels.get_storage().list()]

    @app.post("/__claim_settle")
    def claim_settle() -> JSONResponse:
        try:
            out = manager.claim_and_settle(ClaimOptions())
        except Exception as exc:
            log.exception("claim_and_settle failed")
            return JSONResponse({"error": str(exc)}, 500)
        settle = out["settle"]
        return JSONResponse(
            {
                "claims": [{"vouchers": c.vouchers, "transaction": c.transaction} for c in out["claims"]],
                "settle": None if settle is None else {"transaction": settle.transaction},
            }
        )

    @app.post("/__settle")
    def settle_only() -> JSONResponse:
        try:
            result = manager.settle()
        except Exception as exc:
            log.exception("settle failed")
            return JSONResponse({"error": str(exc)}, 500)
        return JSONResponse({"transaction": result.transaction})

    @app.post("/__refund")
    def refund_all() -> JSONResponse:
        try:
            results = manager.refund()
        except Exception as exc:
            log.exception("refund failed")
            return JSONResponse({"error": str(exc)}, 500)
        return JSONResponse([{"channel": r.channel, "transaction": r.transaction} for r in results])

    @app.get("/__stats")
    def get_stats() -> dict[str, Any]:
        return {"handled": dict(stats.handled), "settlements": list(stats.settlements)}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    fac = sub.add_parser("facilitator")
    fac.add_argument("--host", default="127.0.0.1")
    fac.add_argument("--port", type=int, required=True)
    fac.add_argument("--rpc", required=True)
    fac.add_argument("--key", required=True, help="facilitator private key (pays gas)")
    fac.add_argument("--confirmation-timeout", type=float, default=30)
    srv = sub.add_parser("server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--facilitator", required=True)
    srv.add_argument("--asset", required=True)
    srv.add_argument("--pay-to", required=True)
    srv.add_argument("--authorizer-key", required=True, help="the seller's receiverAuthorizer key")
    srv.add_argument("--price", type=int, default=1000)
    srv.add_argument("--withdraw-delay", type=int, default=900)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "facilitator":
        app = create_facilitator_app(args.rpc, args.key, args.confirmation_timeout)
    else:
        app = create_server_app(
            ServerConfig(
                port=args.port,
                facilitator_url=args.facilitator,
                asset=args.asset,
                pay_to=args.pay_to,
                authorizer_key=args.authorizer_key,
                price=args.price,
                withdraw_delay=args.withdraw_delay,
                host=args.host,
            )
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
