"""The payment ledger's contract: records, states, and the store protocol.

A row is written (and durable) *before* anything is signed, so after any crash every signature
that may have left the process has a row. States:

    pending   -> signed or about to be; outcome not yet known
    settled   -> the server returned a settlement receipt (or served the resource after payment), or
                 an unknown row's authorization was found used on chain (reason: RECONCILED_USED)
    rejected  -> the server answered 402 again: it says it did not accept the payment; also a
                 payment that never moved money: never signed, or an unknown one the chain proved
                 unused and expired (proxy/payments/reconcile.py; the reason says which)
    unsettled -> the server answered >= 400 without a receipt (handler failed; servers do not settle)
    unknown   -> the outcome cannot be known (transport failure, crash): may or may not settle
    dry_run   -> policy would have paid; nothing was signed

Money may still move for a signed authorization until its ``valid_before``: budgets therefore
count pending, settled and unknown rows, and unsettled or rejected rows whose authorization has
not expired (a server's 402 does not prove that it did not, or will not, settle what it was sent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class PaymentState(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    REJECTED = "rejected"
    UNSETTLED = "unsettled"
    UNKNOWN = "unknown"
    DRY_RUN = "dry_run"


# Which states each transition may start from. Nothing ever goes back to pending.
ALLOWED_TRANSITIONS: Mapping[PaymentState, frozenset[PaymentState]] = {
    # A late receipt or an on-chain check may resolve unknown/unsettled rows as settled.
    PaymentState.SETTLED: frozenset({PaymentState.PENDING, PaymentState.UNKNOWN, PaymentState.UNSETTLED}),
    # unknown -> rejected only when the chain proves the authorization unused and expired (reconcile.py).
    PaymentState.REJECTED: frozenset({PaymentState.PENDING, PaymentState.UNKNOWN}),
    PaymentState.UNSETTLED: frozenset({PaymentState.PENDING}),
    PaymentState.UNKNOWN: frozenset({PaymentState.PENDING}),
}


# Start of the reason of a row that was `unknown` until the chain showed its authorization used
# (proxy/payments/reconcile.py). `find_in_doubt` keeps such a row blocking a retry as long as the
# unknown row did: reconciliation lifts the refusal early only when it proves that no money moved.
RECONCILED_USED = "reconciled from chain: authorization used"


class StoreError(Exception):
    """The ledger cannot be used. `kind`: locked | full | corrupt | io | readonly | schema | transition."""

    def __init__(self, message: str, kind: str = "io") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class NewPayment:
    amount: int  # atomic units of `asset`
    decimals: int  # the asset's decimals, so budgets can be summed without the asset table
    asset: str
    network: str  # CAIP-2
    pay_to: str
    host: str
    method: str
    url: str  # the request URL the payment answers
    x402_version: int
    scheme: str
    resource: str | None = None  # the resource URL the server named in its challenge
    nonce: str | None = None
    valid_before: int | None = None  # unix seconds; after it the authorization cannot settle
    payment_id: str | None = None  # payment-identifier extension id, when the server offers it
    payer: str | None = None  # our wallet address
    session_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PaymentRecord:
    id: int
    created_at: float
    updated_at: float
    state: PaymentState
    amount: int
    decimals: int
    asset: str
    network: str
    pay_to: str
    host: str
    method: str
    url: str
    x402_version: int
    scheme: str
    resource: str | None
    nonce: str | None
    valid_before: int | None
    payment_id: str | None
    payer: str | None
    tx_hash: str | None
    reason: str | None
    session_id: str | None


@dataclass(frozen=True)
class SpendTotals:
    """Atomic amounts per (network, lower-case asset, decimals), and how many rows counted."""

    by_asset: Mapping[tuple[str, str, int], int]
    count: int


class LedgerStore(Protocol):
    def attach_session(self, payment_id: int, session_id: str) -> None:
        """Link a payment to the session it opened or renewed."""
        ...

    def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        """Insert a pending row; returns only once the row is durable on disk."""
        ...

    def insert_dry_run(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord: ...

    def set_authorization(
        self, payment_id: int, *, nonce: str, valid_before: int, now: float | None = None
    ) -> PaymentRecord:
        """Record nonce/expiry drawn during signing (Permit2) on a pending row."""
        ...

    def mark_settled(
        self,
        payment_id: int,
        *,
        tx_hash: str | None = None,
        payer: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord: ...

    def mark_rejected(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord: ...

    def mark_unsettled(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord: ...

    def mark_unknown(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord: ...

    def get(self, payment_id: int) -> PaymentRecord | None: ...

    def list(
        self,
        state: PaymentState | None = None,
        host: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[PaymentRecord]:
        """Newest first."""
        ...

    def spent_since(self, since: float, host: str | None = None, *, now: float | None = None) -> SpendTotals:
        """Rows created at or after `since` that may move money (see module docstring)."""
        ...

    def find_in_doubt(self, method: str, url: str, *, still_valid_at: float) -> PaymentRecord | None:
        """Newest row for this request that must not be paid again yet, while its authorization is valid:
        `unknown` (it may still settle), or settled by reconciliation (RECONCILED_USED: the money moved,
        but the answer it bought never reached the client, so paying again would pay twice)."""
        ...

    def recover_on_startup(self, *, now: float | None = None) -> Sequence[PaymentRecord]:
        """Turn rows left `pending` by a crash into `unknown`; return them."""
        ...

    def list_unknown(self) -> Sequence[PaymentRecord]:
        """Every `unknown` row, oldest first (for reconciliation from the chain)."""
        ...

    def close(self) -> None: ...
