"""The payment ledger's contract: records, states, and the store protocol.

A row is written (and durable) *before* anything is signed, so after any crash every signature
that may have left the process has a row. States:

    pending              -> signed or about to be; outcome not yet known
    settled              -> a success answer naming a transaction, and the answer reached the client
                            (or the chain showed the authorization used for a row delivered in doubt)
    in_doubt             -> money may have moved and nobody has proved which way: a transaction named
                            without success (``settlement_pending``), success without a transaction,
                            a served answer without a receipt (``delivered``), a transport failure or a
                            crash after the header left. Never re-signed; the identical payload may be
                            presented again (``presented``) until ``valid_before``.
    settled_undelivered  -> the money moved (the chain or the server's receipt says so) but the answer
                            it bought never reached the client: never repaid automatically
    rejected             -> the server refused and named no transaction: it says nothing moved; also a
                            payment never signed, or one the chain proved unused and expired
    unsettled            -> the server answered >= 400 (not 402) without naming a transaction
    dry_run              -> policy would have paid; nothing was signed

The chain has the last word (proxy/payments/reconcile.py): ``chain_state`` is ``used`` or ``unused``
once the chain has answered for good. Budgets count pending, settled, in_doubt and
settled_undelivered rows for their whole window, and rejected or unsettled rows until the chain
proved them unused or their authorization expired (a server's 402 is its word, not the chain's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

# How long need_lock / payment_lock wait for a holder elsewhere before StoreError "locked". A need's holder
# keeps it for a whole payment (the paid retry included); the payment lock only around decide + insert.
NEED_LOCK_TIMEOUT = 30.0
PAYMENT_LOCK_TIMEOUT = 10.0


class PaymentState(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    REJECTED = "rejected"
    UNSETTLED = "unsettled"
    IN_DOUBT = "in_doubt"
    SETTLED_UNDELIVERED = "settled_undelivered"
    DRY_RUN = "dry_run"


# States whose money may have moved and that the chain can still correct (proxy/payments/reconcile.py).
CHAIN_CHECKED_STATES = frozenset(
    {
        PaymentState.SETTLED,
        PaymentState.IN_DOUBT,
        PaymentState.SETTLED_UNDELIVERED,
        PaymentState.REJECTED,
        PaymentState.UNSETTLED,
    }
)

# Rows whose money moved or may have: the only ones a refund can be recorded on (record_refund).
REFUNDABLE_STATES = frozenset({PaymentState.SETTLED, PaymentState.SETTLED_UNDELIVERED, PaymentState.IN_DOUBT})


def refund_problem(record: PaymentRecord, refunded: int) -> str | None:
    """Why `refunded` cannot be recorded on `record` (None: it can)."""
    if record.state not in REFUNDABLE_STATES:
        return f"payment #{record.id} is {record.state}: no money of it moved, nothing can come back"
    if not 0 <= refunded <= record.amount:
        return f"payment #{record.id}: a refund of {refunded} is not within its amount {record.amount}"
    return None


# Which states each transition may start from. Nothing ever goes back to pending.
ALLOWED_TRANSITIONS: Mapping[PaymentState, frozenset[PaymentState]] = {
    # A success receipt (first answer or a re-presentation), or the chain for a delivered in-doubt row.
    PaymentState.SETTLED: frozenset({PaymentState.PENDING, PaymentState.IN_DOUBT, PaymentState.UNSETTLED}),
    # Money moved, the answer did not arrive: the server's receipt on a failed answer, or the chain.
    PaymentState.SETTLED_UNDELIVERED: frozenset(
        {PaymentState.PENDING, PaymentState.IN_DOUBT, PaymentState.REJECTED, PaymentState.UNSETTLED}
    ),
    # The server's refusal (the chain's word goes through CHAIN_TRANSITIONS instead).
    PaymentState.REJECTED: frozenset({PaymentState.PENDING, PaymentState.IN_DOUBT}),
    PaymentState.UNSETTLED: frozenset({PaymentState.PENDING}),
    # (An answer to a re-presentation that proves nothing goes through `note_in_doubt`.)
    PaymentState.IN_DOUBT: frozenset({PaymentState.PENDING}),
}


# Start of the reason of a row whose authorization the chain showed used (proxy/payments/reconcile.py).
RECONCILED_USED = "reconciled from chain: authorization used"


class ChainState(StrEnum):
    """The chain's final word on a row's authorization (None on the row: not (yet) known)."""

    USED = "used"
    UNUSED = "unused"  # unused at a block whose time is past validBefore: can never move money


# What the chain's word may turn a row into (record_chain_verdict), by the row's current state.
CHAIN_TRANSITIONS: Mapping[tuple[PaymentState, ChainState], frozenset[PaymentState]] = {
    # used: delivered rows are settled; rows whose answer failed are settled but undelivered.
    (PaymentState.IN_DOUBT, ChainState.USED): frozenset(
        {PaymentState.SETTLED, PaymentState.SETTLED_UNDELIVERED}
    ),
    (PaymentState.REJECTED, ChainState.USED): frozenset({PaymentState.SETTLED_UNDELIVERED}),
    (PaymentState.UNSETTLED, ChainState.USED): frozenset({PaymentState.SETTLED_UNDELIVERED}),
    (PaymentState.SETTLED, ChainState.USED): frozenset({PaymentState.SETTLED}),
    (PaymentState.SETTLED_UNDELIVERED, ChainState.USED): frozenset({PaymentState.SETTLED_UNDELIVERED}),
    # unused and expired: nothing moved, whatever the server said.
    (PaymentState.IN_DOUBT, ChainState.UNUSED): frozenset({PaymentState.REJECTED}),
    (PaymentState.REJECTED, ChainState.UNUSED): frozenset({PaymentState.REJECTED}),
    (PaymentState.UNSETTLED, ChainState.UNUSED): frozenset({PaymentState.UNSETTLED}),
    (PaymentState.SETTLED, ChainState.UNUSED): frozenset({PaymentState.REJECTED}),
    (PaymentState.SETTLED_UNDELIVERED, ChainState.UNUSED): frozenset({PaymentState.REJECTED}),
}


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
    # What this payment is for (see docs/payments.md, "One need, one authorization"): while a payment
    # for a need is in doubt, no new authorization is signed for it.
    need: str | None = None
    # Who approved a payment above [policy] ask_above ("ui", "cli", "api", "mcp", or "grant apr_…"), and when.
    approved_by: str | None = None
    approved_at: float | None = None


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
    need: str | None = None
    delivered: bool = False  # the answer to the paid request reached the client as a success (< 400)
    chain_state: ChainState | None = None
    presentations: int = 0  # how often the signed payload was sent (1 = once, no re-presentation)
    last_presented_at: float | None = None
    # Extension results the server or facilitator returned (offer-receipt, EXTENSION-RESPONSES), as JSON text.
    evidence: str | None = None
    approved_by: str | None = None
    approved_at: float | None = None
    # What came back to the payer, proved on chain (a batch-settlement channel's unused deposit, refunded):
    # budgets count `amount - refunded` (`spent_since`). 0 for every other payment.
    refunded: int = 0


@dataclass(frozen=True)
class StateTotal:
    """Ledger rows of one (state, network, lower-case asset, decimals): how many, their sum (/metrics)."""

    state: str
    network: str
    asset: str
    decimals: int
    count: int
    amount: int


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

    def record_refund(self, payment_id: int, refunded: int, *, now: float | None = None) -> PaymentRecord:
        """What of a payment came back to the payer, read from the chain (a channel's refund): never
        lowered, never above the amount, only on a row whose money moved or may have
        (settled, settled_undelivered, in_doubt). Budgets then count `amount - refunded`."""
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

    def mark_in_doubt(
        self,
        payment_id: int,
        *,
        reason: str,
        tx_hash: str | None = None,
        delivered: bool = False,
        now: float | None = None,
    ) -> PaymentRecord:
        """Money may have moved: keep the transaction the server named, if any. Never re-signed."""
        ...

    def note_in_doubt(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord:
        """A row already in doubt stays so (a re-presentation answered without proof): new reason/hash."""
        ...

    def mark_settled_undelivered(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord: ...

    def record_presentation(
        self, payment_id: int, *, header_name: str, header_value: str, now: float | None = None
    ) -> PaymentRecord:
        """Before the signed header leaves (first time or again): keep it, count it. Durable on return."""
        ...

    def presented_header(self, payment_id: int) -> tuple[str, str] | None:
        """The signed header last sent for this row (secret-ish: never returned by the admin API)."""
        ...

    def record_chain_verdict(
        self,
        payment_id: int,
        *,
        chain_state: ChainState,
        state: PaymentState,
        reason: str,
        tx_hash: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord:
        """The chain's final word; `state` per CHAIN_TRANSITIONS. A row with a chain_state is final."""
        ...

    def add_evidence(self, payment_id: int, evidence: str) -> None:
        """Keep the extension results the server or facilitator returned (JSON text)."""
        ...

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

    def spent_since(
        self,
        since: float,
        host: str | None = None,
        *,
        now: float | None = None,
        chain_checked: frozenset[str] = frozenset(),
    ) -> SpendTotals:
        """Rows created at or after `since` that may move money (see module docstring). On the networks
        in `chain_checked` (an RPC URL is configured), a rejected/unsettled row counts until the chain
        has answered for it, even past its validBefore."""
        ...

    def find_blocking(self, method: str, url: str, need: str | None) -> Sequence[PaymentRecord]:
        """Rows that may forbid a new authorization for this need, newest first: in doubt and not
        delivered, settled but undelivered, or settled by reconciliation (RECONCILED_USED)."""
        ...

    def hosts_since(self, since: float) -> Sequence[str]:
        """Every host with a row created at or after `since` (for the budget report)."""
        ...

    def find_in_doubt(self, method: str, url: str, *, still_valid_at: float) -> PaymentRecord | None:
        """Newest row for this request that must not be paid again yet, while its authorization is valid:
        `in_doubt` (it may still settle), or settled by reconciliation (RECONCILED_USED: the money moved,
        but the answer it bought never reached the client, so paying again would pay twice)."""
        ...

    def recover_on_startup(self, *, now: float | None = None) -> Sequence[PaymentRecord]:
        """Turn rows left `pending` by a crash into `in_doubt`; return them."""
        ...

    def list_in_doubt(self) -> Sequence[PaymentRecord]:
        """Every `in_doubt` row, oldest first."""
        ...

    def list_unresolved(self, limit: int = 500) -> Sequence[PaymentRecord]:
        """Rows whose money could have moved and on which the chain has not answered yet (chain_state
        NULL, a nonce, sent at least once), newest first: what the reconciler checks."""
        ...

    def state_totals(self) -> Sequence[StateTotal]:
        """Rows and amounts by state, network and lower-case asset (the /metrics ledger gauges)."""
        ...

    def close(self) -> None: ...


class AsyncLedgerStore(Protocol):
    """The ledger as the running proxy uses it: every call awaitable (see LedgerStore for what each
    call does). The SQLite ledger runs behind it on a thread of its own (proxy/store/threaded.py), so a
    slow or locked database delays only the requests that need it, never pass-through traffic."""

    async def attach_session(self, payment_id: int, session_id: str) -> None: ...

    async def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord: ...

    async def insert_dry_run(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord: ...

    async def set_authorization(
        self, payment_id: int, *, nonce: str, valid_before: int, now: float | None = None
    ) -> PaymentRecord: ...

    async def record_refund(
        self, payment_id: int, refunded: int, *, now: float | None = None
    ) -> PaymentRecord: ...

    async def mark_settled(
        self,
        payment_id: int,
        *,
        tx_hash: str | None = None,
        payer: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord: ...

    async def mark_rejected(
        self, payment_id: int, *, reason: str, now: float | None = None
    ) -> PaymentRecord: ...

    async def mark_unsettled(
        self, payment_id: int, *, reason: str, now: float | None = None
    ) -> PaymentRecord: ...

    async def mark_in_doubt(
        self,
        payment_id: int,
        *,
        reason: str,
        tx_hash: str | None = None,
        delivered: bool = False,
        now: float | None = None,
    ) -> PaymentRecord: ...

    async def note_in_doubt(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord: ...

    async def mark_settled_undelivered(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord: ...

    async def record_presentation(
        self, payment_id: int, *, header_name: str, header_value: str, now: float | None = None
    ) -> PaymentRecord: ...

    async def presented_header(self, payment_id: int) -> tuple[str, str] | None: ...

    async def record_chain_verdict(
        self,
        payment_id: int,
        *,
        chain_state: ChainState,
        state: PaymentState,
        reason: str,
        tx_hash: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord: ...

    async def add_evidence(self, payment_id: int, evidence: str) -> None: ...

    async def get(self, payment_id: int) -> PaymentRecord | None: ...

    async def list(
        self,
        state: PaymentState | None = None,
        host: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[PaymentRecord]: ...

    async def spent_since(
        self,
        since: float,
        host: str | None = None,
        *,
        now: float | None = None,
        chain_checked: frozenset[str] = frozenset(),
    ) -> SpendTotals: ...

    async def find_blocking(self, method: str, url: str, need: str | None) -> Sequence[PaymentRecord]: ...

    async def hosts_since(self, since: float) -> Sequence[str]: ...

    async def find_in_doubt(
        self, method: str, url: str, *, still_valid_at: float
    ) -> PaymentRecord | None: ...

    async def recover_on_startup(self, *, now: float | None = None) -> Sequence[PaymentRecord]: ...

    async def list_in_doubt(self) -> Sequence[PaymentRecord]: ...

    async def list_unresolved(self, limit: int = 500) -> Sequence[PaymentRecord]: ...

    async def state_totals(self) -> Sequence[StateTotal]:
        """Rows and amounts by state, network and asset (the /metrics ledger gauges)."""
        ...

    async def ping(self) -> None:
        """Raise StoreError promptly when the store cannot be reached (readiness probe)."""
        ...

    # -- fleet primitives: one replica or many on one database (docs/fleet.md) -----------------------

    def need_lock(
        self, need: str, *, timeout: float = NEED_LOCK_TIMEOUT
    ) -> AbstractAsyncContextManager[None]:
        """Single flight per need across every process using this store: held, no other holder of the
        same need runs (PostgreSQL: a session advisory lock on a connection of its own, released by the
        server when that connection dies; SQLite: per process). StoreError ``locked`` after `timeout`
        seconds of waiting, ``io`` when the store is unreachable. Not reentrant."""
        ...

    def payment_lock(self, *, timeout: float = PAYMENT_LOCK_TIMEOUT) -> AbstractAsyncContextManager[None]:
        """Hold around "check the budgets (spent_since, find_blocking), then insert_pending": no other
        process using this store decides a payment meanwhile, so two replicas never both fit into a
        budget that fits one. Errors as need_lock."""
        ...

    async def close(self) -> None: ...


def is_async_store(store: object) -> bool:
    """Is `store` an AsyncLedgerStore (its calls awaitable) rather than a blocking LedgerStore?"""
    import inspect

    return inspect.iscoroutinefunction(getattr(store, "insert_pending", None))


def safe_text(value: str | None) -> str | None:
    """Text a database can hold: lone surrogates (JSON allows "\\ud800") become "?". A hostile
    server's error text must never turn a payment's outcome into an unwritable row."""
    if value is None:
        return None
    return value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value


def record_from_row(row: Any) -> PaymentRecord:
    """A ledger row (sqlite3.Row, an asyncpg Record: anything indexed by column name) as a record."""
    return PaymentRecord(
        id=int(row["id"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        state=PaymentState(row["state"]),
        amount=int(row["amount"]),
        decimals=int(row["decimals"]),
        asset=row["asset"],
        network=row["network"],
        pay_to=row["pay_to"],
        host=row["host"],
        method=row["method"],
        url=row["url"],
        x402_version=int(row["x402_version"]),
        scheme=row["scheme"],
        resource=row["resource"],
        nonce=row["nonce"],
        valid_before=None if row["valid_before"] is None else int(row["valid_before"]),
        payment_id=row["payment_id"],
        payer=row["payer"],
        tx_hash=row["tx_hash"],
        reason=row["reason"],
        session_id=row["session_id"],
        need=row["need"],
        delivered=bool(row["delivered"]),
        chain_state=None if row["chain_state"] is None else ChainState(row["chain_state"]),
        presentations=int(row["presentations"]),
        last_presented_at=None if row["last_presented_at"] is None else float(row["last_presented_at"]),
        evidence=row["evidence"],
        approved_by=row["approved_by"],
        approved_at=None if row["approved_at"] is None else float(row["approved_at"]),
        refunded=int(row["refunded"] or 0),
    )
