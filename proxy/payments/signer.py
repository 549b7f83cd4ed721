"""Build the payment header for a selection: EIP-3009 signed here (``evm_sign``), the rest by the SDK.

EIP-3009 (x402 ``exact`` on a token that has it, the common case): the typed-data digest and the
signature come from ``evm_sign`` (coincurve and keccak; pinned to eth-account's and the SDK's output by
tests/test_evm_sign.py), the nonce from ``os.urandom`` as the SDK's ``create_nonce`` draws it, the
payload in the SDK's ``ExactEIP3009Payload`` shape. Neither eth-account nor the SDK is imported on that
path: together they weigh ~25 MiB and ~0.5 ms a signature. Permit2 and upto go through the SDK's
payload builders and ``EthAccountSigner`` (imported at their first use), and so does the
payment-identifier extension when a challenge offers it.

What is hand-written, and why:
- The EIP-3009 authorization window. The SDK's ``ExactEvmScheme`` reads ``time.time()`` itself and
  uses ``validBefore = now + maxTimeoutSeconds``; we take ``now`` as an argument (testable, and the
  ledger row written *before* signing already holds the nonce and window), back-date
  ``validAfter`` by 10 minutes and add 5 minutes to ``validBefore`` so a local clock up to 5
  minutes off in either direction still settles. Reference facilitators check
  ``validAfter <= now`` and ``validBefore >= now + 6`` and no upper bound.
- The V2 envelope. ``accepted`` must deep-equal the server's requirement; the SDK's pydantic
  models drop unknown fields and add defaults, so we echo the server's dict untouched.
- The SDK's ``x402Client`` is not used at all: its requirement selector and spend controls (known
  assets only, $1 cap) would be a second, diverging policy. ``policy.choose_requirement`` is the
  only authority; this module signs exactly the selection it is handed.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

# The x402 SDK's EVM package loads web3 (~0.7 s, tens of MiB): its names are imported where they are
# used (Permit2, upto), so neither an idle proxy nor an EIP-3009 payment loads it.
from proxy.payments.challenge import Challenge
from proxy.payments.evm_sign import checksum_address, eip3009_digest, sign_digest
from proxy.payments.headers import PAYMENT_SIGNATURE, X_PAYMENT
from proxy.payments.policy import Selection, eip712_domain
from proxy.payments.wallet import Wallet

VALID_AFTER_BACKDATE = 600  # seconds; tolerates a local clock up to 10 min fast
CLOCK_SKEW_ALLOWANCE = 300  # seconds added to validBefore; tolerates a clock up to 5 min slow


class SigningError(Exception):
    """The selection could not be signed (missing domain data, unsupported scheme...)."""


@dataclass(frozen=True)
class AuthorizationWindow:
    """Chosen before the ledger row is written, so the row records what will be signed."""

    nonce: str | None  # EIP-3009 bytes32 hex; None for Permit2 (the SDK draws the uint256 nonce)
    valid_after: int
    valid_before: int


@dataclass(frozen=True)
class PaymentHeader:
    name: str  # PAYMENT-SIGNATURE (V2) | X-PAYMENT (V1)
    value: str  # base64(JSON)
    nonce: str
    valid_before: int
    payload_dict: dict[str, Any]  # the JSON that `value` encodes


def plan_authorization(selection: Selection, now: float) -> AuthorizationWindow:
    start = int(now)
    valid_before = start + selection.requirement.max_timeout_seconds + CLOCK_SKEW_ALLOWANCE
    if selection.transfer_method == "eip3009":
        nonce = "0x" + os.urandom(32).hex()  # as the SDK's create_nonce
        return AuthorizationWindow(nonce, max(0, start - VALID_AFTER_BACKDATE), valid_before)
    return AuthorizationWindow(None, 0, valid_before)


# The x402 payment-identifier extension's key (the SDK's PAYMENT_IDENTIFIER; tests/test_evm_sign.py pins
# it): its package loads the SDK's extensions and jsonschema, so only a challenge that offers it loads them.
PAYMENT_IDENTIFIER = "payment-identifier"


def new_payment_id() -> str:
    """An idempotency id as the SDK's ``generate_payment_id`` draws it: ``pay_`` + a UUID4's 32 hex."""
    return f"pay_{uuid.uuid4().hex}"


def offers_payment_identifier(challenge: Challenge) -> bool:
    return challenge.version == 2 and isinstance(challenge.extensions.get(PAYMENT_IDENTIFIER), dict)


def build_payment_header(
    challenge: Challenge,
    selection: Selection,
    wallet: Wallet,
    now: float,
    payment_id: str | None = None,
    window: AuthorizationWindow | None = None,
) -> PaymentHeader:
    window = window or plan_authorization(selection, now)
    try:
        if selection.transfer_method == "eip3009" and selection.scheme == "exact":
            inner = _sign_eip3009(selection, wallet, window)
            nonce = inner["authorization"]["nonce"]
            valid_before = int(inner["authorization"]["validBefore"])
        elif selection.transfer_method == "permit2" and selection.scheme in ("exact", "upto"):
            inner = _sign_permit2(selection, wallet)
            nonce = str(inner["permit2Authorization"]["nonce"])
            valid_before = int(inner["permit2Authorization"]["deadline"])
        else:
            raise SigningError(f"cannot sign {selection.scheme}/{selection.transfer_method}")
    except SigningError:
        raise
    except Exception as exc:
        raise SigningError(f"signing {selection.scheme}/{selection.transfer_method} failed: {exc}") from None

    if challenge.version == 2:
        document = _v2_envelope(challenge, selection, inner, payment_id)
        name = PAYMENT_SIGNATURE
    else:
        document = {
            "x402Version": 1,
            "scheme": selection.requirement.scheme,
            "network": selection.requirement.network_raw,
            "payload": inner,
        }
        name = X_PAYMENT
    value = base64.b64encode(json.dumps(document, separators=(",", ":")).encode("utf-8")).decode("ascii")
    return PaymentHeader(name, value, nonce, valid_before, document)


def _v2_envelope(
    challenge: Challenge, selection: Selection, inner: dict[str, Any], payment_id: str | None
) -> dict[str, Any]:
    document: dict[str, Any] = {"x402Version": 2}
    if "resource" in challenge.raw and challenge.raw["resource"] is not None:
        document["resource"] = challenge.raw["resource"]
    document["accepted"] = selection.requirement.raw  # echoed exactly: servers deep-compare it
    document["payload"] = inner
    extensions = copy.deepcopy(dict(challenge.extensions))
    if payment_id is not None and offers_payment_identifier(challenge):
        from x402.extensions.payment_identifier import append_payment_identifier_to_extensions

        append_payment_identifier_to_extensions(extensions, payment_id)
    if extensions:
        document["extensions"] = extensions
    return document


def _sign_eip3009(selection: Selection, wallet: Wallet, window: AuthorizationWindow) -> dict[str, Any]:
    """The x402 ``exact`` EIP-3009 payload (the SDK's ``ExactEIP3009Payload.to_dict()`` shape), signed by
    ``evm_sign`` (tests/test_evm_sign.py pins it to the SDK's and eth-account's output)."""
    if window.nonce is None:
        raise SigningError("EIP-3009 needs a nonce")
    domain_values = eip712_domain(selection.requirement, selection.asset)
    if domain_values is None:
        raise SigningError("no EIP-712 name/version for the asset")
    token_name, token_version = domain_values
    to = checksum_address(selection.requirement.pay_to)
    digest = eip3009_digest(
        token_name=token_name,
        token_version=token_version,
        chain_id=selection.network.chain_id,
        token=selection.requirement.asset,
        sender=wallet.address,
        to=to,
        value=selection.amount,
        valid_after=window.valid_after,
        valid_before=window.valid_before,
        nonce=window.nonce,
    )
    authorization = {
        "from": wallet.address,
        "to": to,
        "value": str(selection.amount),
        "validAfter": str(window.valid_after),
        "validBefore": str(window.valid_before),
        "nonce": window.nonce,
    }
    return {
        "authorization": authorization,
        "signature": "0x" + sign_digest(wallet.secret_bytes(), digest).hex(),
    }


def _sign_permit2(selection: Selection, wallet: Wallet) -> dict[str, Any]:
    """Permit2 (exact) and upto via the SDK builders, which read the clock themselves.

    We widen their deadline by the same skew allowance through a copy of the requirement; the
    echoed `accepted` is the server's original dict, never this copy. Gas-sponsoring extensions
    are not signed (they need an RPC-capable signer): the wallet must already have approved
    Permit2 for the token.
    """
    from x402.mechanisms.evm.exact.permit2_utils import create_permit2_payload
    from x402.mechanisms.evm.signers import EthAccountSigner
    from x402.mechanisms.evm.upto.client import UptoEvmScheme
    from x402.schemas import PaymentRequirements

    source = selection.requirement
    requirement = PaymentRequirements.model_validate(
        {
            **source.raw,
            "amount": str(selection.amount),  # the SDK model wants a string; JSON may have had an int
            "extra": dict(source.extra),
            "maxTimeoutSeconds": source.max_timeout_seconds + CLOCK_SKEW_ALLOWANCE,
        }
    )
    signer = EthAccountSigner(wallet.account)
    if selection.scheme == "upto":
        return UptoEvmScheme(signer).create_payment_payload(requirement)
    return create_permit2_payload(signer, requirement)
