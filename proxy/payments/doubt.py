"""One need, one authorization: what a payment is for, and whether an earlier one forbids a new signature.

A **need** is what the client wants bought: the session scope a purchase opens (``scope <key>``), or,
for a request no session can cover, the request itself (``request <METHOD> <normalised URL>``). The
ledger row keeps it. While a payment for a need is in doubt (the signed authorization may have moved
money, nobody has proved which way), no new authorization is signed for that need; the proxy may
instead present the *identical* signed payload again. An EIP-3009 nonce can be used once on chain, so
re-presenting cannot move money twice, and it lets the server's facilitator find its pending transfer
(x402 ``settlement_pending``). Presentations are bounded and spaced out (``backoff``), and stop a
little before ``validBefore`` (facilitators refuse an authorization about to expire).

A payment that settled on chain but whose answer never reached the client (``settled_undelivered``)
blocks its need for good unless ``[policy] repay_undelivered = true``: paying again would pay twice.

Everything here is pure: the payer reads the rows and acts on the answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.payments.challenge import Challenge
from proxy.payments.policy import ReasonCode
from proxy.payments.signer import CLOCK_SKEW_ALLOWANCE
from proxy.store.base import RECONCILED_USED, PaymentRecord, PaymentState

MAX_PRESENTATIONS = 6  # the first send and at most five re-presentations of the same payload
BACKOFF_CAP_SECONDS = 30.0
# Reference facilitators refuse validBefore < now + 6; keep a margin for the trip to the facilitator.
PRESENT_MARGIN_SECONDS = 10
MAX_RETRY_AFTER = 3600


def request_need(method: str, url: str) -> str:
    return f"request {method.upper()} {url}"


def scope_need(scope_key: str) -> str:
    return f"scope {scope_key}"


def backoff(presentations: int) -> float:
    """Seconds to wait after the `presentations`-th send before the next one: 1, 2, 4, 8, 16, 30."""
    return min(BACKOFF_CAP_SECONDS, 2.0 ** max(0, presentations - 1))


@dataclass(frozen=True)
class Represent:
    """Send this row's stored payload again (same header, same payment identifier)."""

    record: PaymentRecord


@dataclass(frozen=True)
class Blocked:
    record: PaymentRecord
    code: ReasonCode
    detail: str
    retry_after: int | None = None


Doubt = Represent | Blocked | None


def offers_same_requirement(record: PaymentRecord, challenge: Challenge) -> bool:
    """Does the new challenge still ask for exactly what the in-doubt payload pays?"""
    return any(
        r.scheme == record.scheme
        and r.network == record.network
        and r.asset.lower() == record.asset.lower()
        and r.pay_to.lower() == record.pay_to.lower()
        and r.amount == record.amount
        for r in challenge.requirements
    )


def judge(
    rows: Iterable[PaymentRecord],
    challenge: Challenge,
    now: float,
    *,
    chain_checked: frozenset[str],
    repay_undelivered: bool,
    has_payload: bool,
    recheck_after: float,
    method: str = "",
    url: str = "",
) -> Doubt:
    """What the blocking rows of a need (newest first, from `LedgerStore.find_blocking`) allow.

    `has_payload`: the newest in-doubt row's signed header is stored (it can be presented again).
    `recheck_after`: seconds until the reconciler looks again (for rows only the chain can release).
    Only a row for this very request (`method`, `url`) is presented again; another request of the
    same need waits for it.
    """
    for row in rows:
        if row.state is PaymentState.SETTLED_UNDELIVERED or _reconciled_used(row):
            if repay_undelivered:
                continue
            if row.state is PaymentState.SETTLED and _expired(row, now):
                continue  # a row from before settled_undelivered existed: blocked for its window only
            return Blocked(
                row,
                ReasonCode.PAYMENT_UNDELIVERED,
                f"payment #{row.id} for this request settled on chain"
                f"{' in tx ' + row.tx_hash if row.tx_hash else ''}, but its answer never reached the "
                "client; not paying again ([policy] repay_undelivered = false): claim delivery from the "
                "seller, or allow the repay",
            )
        if row.state is not PaymentState.IN_DOUBT or row.delivered:
            continue
        if _expired(row, now):
            if row.network not in chain_checked or not reconcilable(row):
                continue  # nobody can ask the chain: as before, paying again is allowed once it expired
            return Blocked(
                row,
                ReasonCode.PAYMENT_IN_DOUBT,
                f"payment #{row.id} for this request may have settled; its authorization has expired and "
                "the chain has not been asked yet; not paying again until it has",
                max(1, math.ceil(recheck_after)),
            )
        same_request = row.method == method.upper() and row.url == url
        return _present_or_wait(row, challenge, now, has_payload and same_request, recheck_after)
    return None


def _present_or_wait(
    row: PaymentRecord, challenge: Challenge, now: float, has_payload: bool, recheck_after: float
) -> Represent | Blocked:
    assert row.valid_before is not None
    until_expiry = row.valid_before - now
    detail = (
        f"payment #{row.id} for this request was paid or may still settle, and its answer never arrived; "
        "not signing again until the chain shows it unused"
    )
    presentable = (
        has_payload
        and row.presentations < MAX_PRESENTATIONS
        and until_expiry > PRESENT_MARGIN_SECONDS
        and offers_same_requirement(row, challenge)
    )
    if not presentable:
        wait = until_expiry + CLOCK_SKEW_ALLOWANCE if until_expiry > 0 else recheck_after
        return Blocked(row, ReasonCode.PAYMENT_IN_DOUBT, detail, _retry_after(wait))
    due = (row.last_presented_at or row.updated_at) + backoff(row.presentations)
    if now < due:
        return Blocked(
            row, ReasonCode.PAYMENT_IN_DOUBT, f"{detail}; presenting it again", _retry_after(due - now)
        )
    return Represent(row)


def reconcilable(row: PaymentRecord) -> bool:
    """Can the token contract answer for this row (an EIP-3009 nonce with payer and expiry)?"""
    nonce = row.nonce or ""
    return (
        row.scheme == "exact"
        and row.network.startswith("eip155:")
        and len(nonce) == 66
        and nonce.startswith("0x")
        and row.payer is not None
        and row.valid_before is not None
    )


def _expired(row: PaymentRecord, now: float) -> bool:
    return row.valid_before is None or row.valid_before <= now - CLOCK_SKEW_ALLOWANCE


def _reconciled_used(row: PaymentRecord) -> bool:
    return row.state is PaymentState.SETTLED and (row.reason or "").startswith(RECONCILED_USED)


def _retry_after(seconds: float) -> int:
    return max(1, min(MAX_RETRY_AFTER, math.ceil(seconds)))
