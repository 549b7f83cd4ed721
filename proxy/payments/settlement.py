"""Read the server's settlement receipt leniently (pure).

``PAYMENT-RESPONSE`` (V2) / ``X-PAYMENT-RESPONSE`` (V1) carry ``base64(JSON SettleResponse)``.
Servers in the wild add fields, use url-safe base64, drop padding, or send ``success`` as a
string; we accept all of that and never raise: a receipt we cannot read is "no receipt".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.payments.headers import PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE, get_header
from proxy.store.base import safe_text

MAX_RECEIPT_CHARS = 16 * 1024
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


@dataclass(frozen=True)
class SettlementReceipt:
    success: bool | None  # None: the field was missing or unreadable
    transaction: str | None
    network: str | None
    payer: str | None
    error_reason: str | None
    raw: Mapping[str, Any]


def read_settlement(headers: Mapping[str, str]) -> SettlementReceipt | None:
    value = get_header(headers, PAYMENT_RESPONSE) or get_header(headers, X_PAYMENT_RESPONSE)
    if not value:
        return None
    document = _decode(value)
    if document is None:
        return None
    return receipt_of(document)


def receipt_of(document: Mapping[str, Any]) -> SettlementReceipt:
    """A SettleResponse document (decoded from a header, or an MCP result's `_meta`), read leniently."""
    success = document.get("success")
    if isinstance(success, str):
        success = {"true": True, "false": False}.get(success.strip().lower())
    transaction = _short_text(document.get("transaction") or document.get("txHash"))
    payer = _short_text(document.get("payer"))
    reason = _short_text(document.get("errorReason") or document.get("error"), limit=500)
    return SettlementReceipt(
        success=success if isinstance(success, bool) else None,
        transaction=transaction,
        network=_short_text(document.get("network")),
        payer=payer if payer and _ADDRESS.match(payer) else None,
        error_reason=reason,
        raw=document,
    )


EXTENSION_RESPONSES = "EXTENSION-RESPONSES"
MAX_EVIDENCE_CHARS = 16 * 1024


def read_evidence(headers: Mapping[str, str], receipt: SettlementReceipt | None) -> str | None:
    """Extension results kept with the ledger row as evidence, parsed leniently: the receipt's
    `extensions` (e.g. a signed `offer-receipt`) and the `EXTENSION-RESPONSES` header (base64 JSON, or
    kept as text when it is not). None when there are none, or when they are too large to keep."""
    evidence: dict[str, Any] = {}
    if receipt is not None and isinstance(receipt.raw.get("extensions"), dict) and receipt.raw["extensions"]:
        evidence["receipt_extensions"] = receipt.raw["extensions"]
    header = get_header(headers, EXTENSION_RESPONSES)
    if header:
        evidence["extension_responses"] = _decode(header) or header.strip()[:MAX_EVIDENCE_CHARS]
    if not evidence:
        return None
    text = json.dumps(evidence, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= MAX_EVIDENCE_CHARS else None


def rejection_reason(headers: Mapping[str, str], body: bytes | None) -> str:
    """Why a server answered our paid request with another 402: its `error` field, if readable."""
    header = get_header(headers, PAYMENT_REQUIRED)
    document: Mapping[str, Any] | None = _decode(header) if header else None
    if document is None and body:
        try:
            parsed = json.loads(body[: MAX_RECEIPT_CHARS * 4].decode("utf-8", errors="replace"))
        except ValueError:
            parsed = None
        document = parsed if isinstance(parsed, dict) else None
    if document is not None:
        error = _short_text(document.get("error"), limit=500)
        if error:
            return error
    return "payment rejected (402 again)"


def _decode(value: str) -> dict[str, Any] | None:
    value = value.strip()
    if len(value) > MAX_RECEIPT_CHARS:
        return None
    padded = value + "=" * (-len(value) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
            document = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
            continue
        return document if isinstance(document, dict) else None
    return None


def _short_text(value: Any, limit: int = 200) -> str | None:
    if isinstance(value, str) and value.strip():
        return safe_text(value.strip()[:limit])
    return None
