"""Builders shared by the payments tests (no tests here): `from tests.test_payments_fixtures import ...`."""

from __future__ import annotations

import base64
import json
from typing import Any

BASE_SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
AMOY_USDC = "0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OTHER_PAY_TO = "0x1111111111111111111111111111111111111111"


def v2_requirement(**overrides: Any) -> dict[str, Any]:
    requirement: dict[str, Any] = {
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": "10000",
        "asset": BASE_SEPOLIA_USDC,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    requirement.update(overrides)
    return {k: v for k, v in requirement.items() if v is not _DROP}


def v1_requirement(**overrides: Any) -> dict[str, Any]:
    requirement: dict[str, Any] = {
        "scheme": "exact",
        "network": "base-sepolia",
        "maxAmountRequired": "10000",
        "resource": "http://shop.test/paid",
        "description": "a paid thing",
        "mimeType": "application/json",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "asset": BASE_SEPOLIA_USDC,
        "outputSchema": None,
        "extra": {"name": "USDC", "version": "2"},
    }
    requirement.update(overrides)
    return {k: v for k, v in requirement.items() if v is not _DROP}


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


_DROP: Any = _Drop()
DROP: Any = _DROP  # pass as an override value to remove a field


def v2_document(*accepts: dict[str, Any], **top: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "x402Version": 2,
        "error": "Payment required",
        "resource": {"url": "http://shop.test/paid", "description": "paid", "mimeType": "application/json"},
        "accepts": list(accepts) or [v2_requirement()],
    }
    document.update(top)
    return {k: v for k, v in document.items() if v is not _DROP}


def v1_document(*accepts: dict[str, Any], **top: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "x402Version": 1,
        "error": "X-PAYMENT header is required",
        "accepts": list(accepts) or [v1_requirement()],
    }
    document.update(top)
    return document


def b64json(document: Any) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def v2_response(*accepts: dict[str, Any], **top: Any) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a V2 402."""
    return 402, {"PAYMENT-REQUIRED": b64json(v2_document(*accepts, **top))}, b"{}"


def v1_response(*accepts: dict[str, Any], **top: Any) -> tuple[int, dict[str, str], bytes]:
    return 402, {"Content-Type": "application/json"}, json.dumps(v1_document(*accepts, **top)).encode()


def decode_header(value: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.b64decode(value))
    return result


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
