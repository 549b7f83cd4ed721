"""Audit: does the ledger agree with the chain? Anyone with the ledger file and an RPC URL can ask.

For each network with an ``[rpc]`` URL, over a window of time, the chain side is every
``AuthorizationUsed(payer, nonce)`` event (any token) and every ERC-20 ``Transfer(from = payer)``;
the ledger side is every row of that network created in the window (with an hour of slack, since a
row's authorization can settle up to its validBefore). They are matched by EIP-3009 nonce:

- ``matched``: the ledger says the money moved (settled, settled_undelivered) and the chain agrees,
  same amount, same recipient;
- ``ledger_only``: the ledger says it moved, the chain has no such authorization used;
- ``chain_only``: money left the wallet without a row (an authorization whose nonce no row holds, or a
  transfer from the wallet outside any matched authorization, e.g. signed with the key elsewhere);
- ``amount_mismatch``: same nonce, another amount or recipient;
- ``state_mismatch``: the ledger says nothing moved (rejected, unsettled) but the chain used it;
- ``open``: rows still in doubt or pending (not a discrepancy: the reconciler will resolve them).

Any of the first-but-one four makes the audit fail (exit 1 in the CLI). ``compare`` is pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.payments.reconcile import AUTHORIZATION_USED_TOPIC
from proxy.store.base import AsyncLedgerStore, PaymentRecord, PaymentState

# keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
ROW_SLACK_SECONDS = 3600
MAX_AUDIT_ROWS = 10_000
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
MOVED = (PaymentState.SETTLED, PaymentState.SETTLED_UNDELIVERED)
NOT_MOVED = (PaymentState.REJECTED, PaymentState.UNSETTLED, PaymentState.DRY_RUN)
OPEN = (PaymentState.IN_DOUBT, PaymentState.PENDING)


@dataclass(frozen=True)
class ChainLog:
    """One event log as the audit needs it."""

    tx_hash: str
    log_index: int
    block: int
    address: str  # the token contract
    topics: tuple[str, ...]
    data: str


@dataclass(frozen=True)
class ChainPayment:
    """An authorization used on chain, with the transfer it made (if found in the same transaction)."""

    nonce: str
    tx_hash: str
    asset: str
    to: str | None
    amount: int | None


@dataclass
class AuditReport:
    network: str
    since: float
    blocks: tuple[int, int] = (0, 0)
    matched: list[dict[str, Any]] = field(default_factory=list)
    ledger_only: list[dict[str, Any]] = field(default_factory=list)
    chain_only: list[dict[str, Any]] = field(default_factory=list)
    amount_mismatch: list[dict[str, Any]] = field(default_factory=list)
    state_mismatch: list[dict[str, Any]] = field(default_factory=list)
    open: list[dict[str, Any]] = field(default_factory=list)
    unchecked: list[dict[str, Any]] = field(default_factory=list)  # rows the token cannot answer for

    @property
    def discrepancies(self) -> int:
        return (
            len(self.ledger_only)
            + len(self.chain_only)
            + len(self.amount_mismatch)
            + len(self.state_mismatch)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "since": self.since,
            "blocks": list(self.blocks),
            "ok": self.discrepancies == 0,
            "discrepancies": self.discrepancies,
            "matched": self.matched,
            "ledger_only": self.ledger_only,
            "chain_only": self.chain_only,
            "amount_mismatch": self.amount_mismatch,
            "state_mismatch": self.state_mismatch,
            "open": self.open,
            "unchecked": self.unchecked,
        }


def _address_topic(address: str) -> str:
    return "0x" + "00" * 12 + address[2:].lower()


def _topic_address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


def chain_payments(payer: str, logs: Iterable[ChainLog]) -> tuple[list[ChainPayment], list[ChainLog]]:
    """Pair each AuthorizationUsed(payer) with the payer's Transfer that follows it in its transaction.
    Returns the payments and the payer's transfers that belong to no authorization."""
    payer_topic = _address_topic(payer)
    ordered = sorted(logs, key=lambda e: (e.block, e.tx_hash, e.log_index))
    transfers = [
        e
        for e in ordered
        if len(e.topics) == 3 and e.topics[0] == TRANSFER_TOPIC and e.topics[1] == payer_topic
    ]
    used: set[tuple[str, int]] = set()
    payments: list[ChainPayment] = []
    for event in ordered:
        if (
            len(event.topics) != 3
            or event.topics[0] != AUTHORIZATION_USED_TOPIC
            or event.topics[1] != payer_topic
        ):
            continue
        transfer = next(
            (
                t
                for t in transfers
                if t.tx_hash == event.tx_hash
                and t.address.lower() == event.address.lower()
                and t.log_index > event.log_index
                and (t.tx_hash, t.log_index) not in used
            ),
            None,
        )
        if transfer is not None:
            used.add((transfer.tx_hash, transfer.log_index))
        payments.append(
            ChainPayment(
                nonce=event.topics[2].lower(),
                tx_hash=event.tx_hash,
                asset=event.address,
                to=_topic_address(transfer.topics[2]) if transfer else None,
                amount=int(transfer.data, 16) if transfer and transfer.data not in ("", "0x") else None,
            )
        )
    loose = [t for t in transfers if (t.tx_hash, t.log_index) not in used]
    return payments, loose


def _row(row: PaymentRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state.value,
        "amount": str(row.amount),
        "asset": row.asset,
        "pay_to": row.pay_to,
        "nonce": row.nonce,
        "tx_hash": row.tx_hash,
        "url": row.url,
    }


def _chain(payment: ChainPayment) -> dict[str, Any]:
    return {
        "nonce": payment.nonce,
        "tx_hash": payment.tx_hash,
        "asset": payment.asset,
        "to": payment.to,
        "amount": None if payment.amount is None else str(payment.amount),
    }


def compare(
    report: AuditReport,
    rows: Sequence[PaymentRecord],
    payments: Sequence[ChainPayment],
    loose_transfers: Sequence[ChainLog],
    row_cutoff: float | None = None,
) -> AuditReport:
    """Fill `report` from the ledger rows of its network and what the chain says (pure).

    Rows reach further back than the chain's window (so every payment the chain shows finds its row);
    a row created before `row_cutoff` that the window does not show is outside it, not ledger-only."""
    by_nonce = {p.nonce: p for p in payments}
    claimed: set[str] = set()
    for row in rows:
        nonce = (row.nonce or "").lower()
        if not _NONCE.fullmatch(nonce) or row.scheme != "exact":
            if row.state not in (PaymentState.DRY_RUN,):
                report.unchecked.append(_row(row))
            continue
        claimed.add(nonce)
        found = by_nonce.get(nonce)
        if row.state in OPEN:
            report.open.append({**_row(row), "chain": _chain(found) if found else None})
        elif found is None:
            if row.state in MOVED and (row_cutoff is None or row.created_at >= row_cutoff):
                report.ledger_only.append(_row(row))
        elif row.state in NOT_MOVED:
            report.state_mismatch.append({**_row(row), "chain": _chain(found)})
        elif found.amount != row.amount or (found.to or "").lower() != row.pay_to.lower():
            report.amount_mismatch.append({**_row(row), "chain": _chain(found)})
        else:
            report.matched.append({**_row(row), "chain": _chain(found)})
    for payment in payments:
        if payment.nonce not in claimed:
            report.chain_only.append({"kind": "authorization", **_chain(payment)})
    for transfer in loose_transfers:
        report.chain_only.append(
            {
                "kind": "transfer",
                "tx_hash": transfer.tx_hash,
                "asset": transfer.address,
                "to": _topic_address(transfer.topics[2]),
                "amount": str(int(transfer.data, 16)) if transfer.data not in ("", "0x") else None,
            }
        )
    return report


class AuditError(Exception):
    """The chain could not be read for the audit (named, for the CLI's exit code 2)."""


async def audit_network(
    rpc_url: str, network: str, payer: str, rows: Sequence[PaymentRecord], since: float
) -> AuditReport:
    """Read the chain for `payer` since `since` (unix seconds) and compare with `rows`."""
    from proxy.payments.reconcile import ChainReadError, Web3ChainReader

    reader = Web3ChainReader(rpc_url)
    report = AuditReport(network, since)
    try:
        try:
            expected = int(network.split(":", 1)[1])
            actual = await reader.chain_id()
            if actual != expected:
                raise AuditError(f"the [rpc] URL for {network} serves chain id {actual}")
            last, _ = await reader.latest_block()
            first = await reader.first_block_at_or_after(int(window_start(since)), last)
            report.blocks = (first, last)
            topic = _address_topic(payer)
            logs = [
                *await reader.logs([AUTHORIZATION_USED_TOPIC, topic], first, last),
                *await reader.logs([TRANSFER_TOPIC, topic], first, last),
            ]
        except ChainReadError as exc:
            raise AuditError(str(exc)) from None
    finally:
        await reader.close()
    payments, loose = chain_payments(payer, (_as_log(entry) for entry in logs))
    return compare(report, rows, payments, loose, row_cutoff=window_start(since))


def _as_log(entry: Any) -> ChainLog:
    def text(value: Any) -> str:
        if isinstance(value, bytes | bytearray):
            return "0x" + bytes(value).hex()
        return str(value) if str(value).startswith("0x") else "0x" + str(value)

    return ChainLog(
        tx_hash=text(entry["transactionHash"]).lower(),
        log_index=int(entry["logIndex"]),
        block=int(entry["blockNumber"]),
        address=str(entry["address"]),
        topics=tuple(text(t).lower() for t in entry["topics"]),
        data=text(entry["data"]),
    )


def rows_for_audit(rows: Iterable[PaymentRecord], network: str) -> list[PaymentRecord]:
    return [r for r in rows if r.network == network]


def window_start(since: float) -> float:
    """The chain is read from an hour before `since` (an authorization settles up to its validBefore,
    at most an hour after its row), and the ledger from an hour before that."""
    return since - ROW_SLACK_SECONDS


def rows_start(since: float) -> float:
    return since - 2 * ROW_SLACK_SECONDS


async def run_audit(
    store: AsyncLedgerStore, rpc_urls: Mapping[str, str], payer: str, since: float
) -> dict[str, Any]:
    """The whole audit: every network with an RPC URL, from the ledger `store`. Raises AuditError."""
    rows = await store.list(since=rows_start(since), limit=MAX_AUDIT_ROWS)
    networks = sorted(rpc_urls)
    reports = [await audit_network(rpc_urls[n], n, payer, rows_for_audit(rows, n), since) for n in networks]
    without_rpc = sorted({r.network for r in rows} - set(networks))
    return {
        "ok": all(r.discrepancies == 0 for r in reports),
        "since": since,
        "payer": payer,
        "networks": [r.to_dict() for r in reports],
        "skipped": [{"network": n, "reason": "no [rpc] URL"} for n in without_rpc],
    }
