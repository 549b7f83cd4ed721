"""Local x402 facilitator: a thin FastAPI shell over the reference PyPI SDK facilitator.

Serves `POST /verify`, `POST /settle`, `GET /supported` for V2 (`eip155:84532`) and V1
(`base-sepolia`), both settling on the local anvil chain given by --rpc.

Test-only extras (prefixed `/__`): `GET /__stats` (call counters, settled transactions) and
`POST /__control` (inject a settle delay or a forced settle failure) so proxy tests can reproduce
slow or failing settlement without touching the chain.

Self-contained (no package-relative imports) so it runs both as
`python -m tests.stack.facilitator --port P --rpc URL --key HEX` and as a plain script path.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from x402 import SchemeNotFoundError, x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.facilitator import ExactEvmSchemeV1
from x402.schemas import SettleResponse, VerifyResponse
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

log = logging.getLogger("x402-stack.facilitator")

NETWORK_V2 = "eip155:84532"
NETWORK_V1 = "base-sepolia"


class _State:
    """Counters and injected faults, shared by the (threadpool) request handlers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {"verify": 0, "settle": 0, "verify_invalid": 0, "settle_failed": 0}
        self.settlements: list[dict[str, Any]] = []
        # Distinct EIP-3009 nonces /verify was asked about: one per authorization, however often presented.
        self.verified_nonces: set[str] = set()
        self.settle_delay_s = 0.0
        self.settle_fail_reason: str | None = None

    def bump(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1


def build_facilitator(
    rpc_url: str, private_key: str, confirmation_timeout: float = 30
) -> x402FacilitatorSync:
    # A short confirmation timeout with mining paused (anvil evm_setAutomine false) makes settle answer
    # `settlement_pending` with the broadcast hash, as a slow real chain does.
    signer = FacilitatorWeb3Signer(
        private_key=private_key, rpc_url=rpc_url, confirmation_timeout_seconds=confirmation_timeout
    )
    facilitator = x402FacilitatorSync()
    # Registered explicitly rather than via register_exact_evm_facilitator, which would also
    # advertise ~20 other V1 network names that all point at this one local chain.
    facilitator.register([NETWORK_V2], ExactEvmScheme(signer))
    facilitator.register_v1([NETWORK_V1], ExactEvmSchemeV1(signer))
    return facilitator


def _parse(body: dict[str, Any]) -> tuple[Any, Any]:
    payload_raw = body["paymentPayload"]
    version = int(body.get("x402Version") or payload_raw.get("x402Version") or 0)
    payload = parse_payment_payload(payload_raw)
    requirements = parse_payment_requirements(version, body["paymentRequirements"])
    return payload, requirements


def _dump(model: VerifyResponse | SettleResponse) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True)
    return data


def create_app(rpc_url: str, private_key: str, confirmation_timeout: float = 30) -> FastAPI:
    facilitator = build_facilitator(rpc_url, private_key, confirmation_timeout)
    state = _State()
    app = FastAPI(title="x402 local facilitator")

    # Handlers are sync `def`: the SDK facilitator does blocking web3 calls, FastAPI runs these in
    # its threadpool so concurrent verify/settle requests do not serialize on the event loop.

    @app.get("/supported")
    def supported() -> dict[str, Any]:
        data: dict[str, Any] = facilitator.get_supported().model_dump(by_alias=True, exclude_none=True)
        return data

    @app.post("/verify")
    def verify(body: dict[str, Any]) -> JSONResponse:
        state.bump("verify")
        nonce = (((body.get("paymentPayload") or {}).get("payload") or {}).get("authorization") or {}).get(
            "nonce"
        )
        if isinstance(nonce, str):
            with state.lock:
                state.verified_nonces.add(nonce.lower())
        try:
            payload, requirements = _parse(body)
        except Exception as exc:
            return JSONResponse(
                {"isValid": False, "invalidReason": "invalid_payload", "invalidMessage": str(exc)}, 400
            )
        try:
            result = facilitator.verify(payload, requirements)
        except SchemeNotFoundError as exc:
            return JSONResponse(
                {"isValid": False, "invalidReason": "unsupported_scheme", "invalidMessage": str(exc)}, 400
            )
        if not result.is_valid:
            state.bump("verify_invalid")
            log.warning("verify invalid: %s %s", result.invalid_reason, result.invalid_message)
        return JSONResponse(_dump(result))

    @app.post("/settle")
    def settle(body: dict[str, Any]) -> JSONResponse:
        state.bump("settle")
        try:
            payload, requirements = _parse(body)
        except Exception as exc:
            return JSONResponse(
                {
                    "success": False,
                    "errorReason": "invalid_payload",
                    "errorMessage": str(exc),
                    "transaction": "",
                    "network": "",
                },
                400,
            )
        with state.lock:
            delay, fail_reason = state.settle_delay_s, state.settle_fail_reason
        if delay > 0:
            time.sleep(delay)
        network = str(getattr(requirements, "network", ""))
        if fail_reason:
            state.bump("settle_failed")
            forced = SettleResponse(success=False, error_reason=fail_reason, transaction="", network=network)
            return JSONResponse(_dump(forced))
        try:
            result = facilitator.settle(payload, requirements)
        except SchemeNotFoundError as exc:
            return JSONResponse(
                {
                    "success": False,
                    "errorReason": "unsupported_scheme",
                    "errorMessage": str(exc),
                    "transaction": "",
                    "network": network,
                },
                400,
            )
        if result.success:
            with state.lock:
                state.settlements.append(
                    {"transaction": result.transaction, "payer": result.payer, "network": result.network}
                )
        else:
            state.bump("settle_failed")
            log.warning("settle failed: %s %s", result.error_reason, result.error_message)
        return JSONResponse(_dump(result))

    @app.get("/__stats")
    def stats() -> dict[str, Any]:
        with state.lock:
            return {
                "counts": dict(state.counts),
                "settlements": list(state.settlements),
                "authorizations": sorted(state.verified_nonces),
            }

    @app.post("/__control")
    async def control(request: Request) -> dict[str, Any]:
        body = await request.json()
        with state.lock:
            if "settle_delay_s" in body:
                state.settle_delay_s = float(body["settle_delay_s"])
            if "settle_fail_reason" in body:
                state.settle_fail_reason = body["settle_fail_reason"] or None
            return {"settle_delay_s": state.settle_delay_s, "settle_fail_reason": state.settle_fail_reason}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rpc", required=True, help="loopback JSON-RPC URL of the local chain")
    parser.add_argument("--key", required=True, help="facilitator private key (pays gas)")
    parser.add_argument(
        "--confirmation-timeout", type=float, default=30, help="seconds to wait for a receipt"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(args.rpc, args.key, args.confirmation_timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
