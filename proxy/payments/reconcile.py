"""The chain decides: resolve every ledger row whose money could have moved from the chain.

Candidates (``LedgerStore.list_unresolved``): rows in doubt (a crash, a transport failure, a
``settlement_pending`` answer, a receipt without success or without a transaction), and also rows the
*server* called settled, rejected or unsettled: a server's word about settlement is not proof (one
that settles and answers 402 would otherwise be paid again once its rows left the budget). The EIP-3009
token contract answers (for `exact` rows, and for a batch-settlement channel's deposit: the ERC-3009
deposit collector takes it with the token's receiveWithAuthorization under the row's nonce):

- ``authorizationState(payer, nonce)`` true: the authorization was used, the money moved. The
  ``AuthorizationUsed(authorizer, nonce)`` event names the transaction (when the server named one, its
  receipt is read first: one call instead of a log search).
- false, and ``validBefore`` at or before the timestamp of the block we read it at: it can never
  be used any more (the token requires ``block.timestamp < validBefore`` and block timestamps
  never decrease), so no money moved, ever.
- false and still valid: still open; asked again on the next pass.

Expiry is judged by the chain's block time, never the local clock. Both reads are pinned to one block.
The chain's answer is recorded once, for good (``chain_state``), with the state it implies
(``store.base.CHAIN_TRANSITIONS``): used + delivered -> ``settled``; used + the answer never reached
the client -> ``settled_undelivered`` (never repaid automatically); unused and expired -> ``rejected``
(a row the server called settled included: the chain has the last word). The decision (``decide``)
is pure; ``Reconciler`` does the reads and writes. A pass runs at start, every ``[reconcile]
interval``, and on demand (``POST /payments/reconcile``, ``x402-proxy payments reconcile``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from proxy.payments.errors import ConfigValueError
from proxy.payments.networks import EIP155_PATTERN
from proxy.payments.payer import log_undelivered
from proxy.store.base import (
    CHAIN_CHECKED_STATES,
    RECONCILED_USED,
    AsyncLedgerStore,
    ChainState,
    LedgerStore,
    PaymentRecord,
    PaymentState,
    StoreError,
)
from proxy.store.threaded import as_async

log = logging.getLogger("x402_proxy.reconcile")

DEFAULT_INTERVAL = 60.0
RPC_TIMEOUT = 10.0  # seconds per JSON-RPC call; a pass is in the background, so it may wait a little
# The transfer is in a block with timestamp > validAfter, which we sign as the row's creation time
# minus 600 s. The log search starts an hour before creation: generous, and only costs a wider range.
LOG_LOOKBACK_SECONDS = 3600
# eth_getLogs block ranges are capped by many RPC providers (often 1 000 to 10 000 blocks).
LOG_CHUNK_BLOCKS = 1000
MAX_REASON_CHARS = 500
EIP3009_NONCE = re.compile(r"^0x[0-9a-fA-F]{64}$")
# Schemes whose rows may name an EIP-3009 authorization the token answers for: `exact`, and a
# batch-settlement channel's deposit, which the ERC-3009 deposit collector takes with the token's
# receiveWithAuthorization under the nonce on the row (proxy/channels/holder.py `open`), so the token's
# authorizationState and AuthorizationUsed log tell whether the deposit moved, like any payment.
EIP3009_SCHEMES = frozenset({"exact", "batch-settlement"})
EVM_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
# keccak256("AuthorizationUsed(address,bytes32)")
AUTHORIZATION_USED_TOPIC = "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5"

TOKEN_ABI: list[dict[str, Any]] = [
    {
        "inputs": [
            {"name": "authorizer", "type": "address"},
            {"name": "nonce", "type": "bytes32"},
        ],
        "name": "authorizationState",
        "outputs": [{"name": "", "type": "bool"}],
        "stateMutability": "view",
        "type": "function",
    }
]


@dataclass
class ReconcileSettings:
    """The `[reconcile]` config section."""

    # Seconds between passes over `unknown` rows (the first pass runs at startup).
    interval: float = DEFAULT_INTERVAL

    def validate(self) -> None:
        if not 1 <= self.interval <= 86_400:
            raise ConfigValueError("interval", f"must be between 1 and 86400 seconds, got {self.interval}")


# -- the decision (pure) ------------------------------------------------------------------------


class Outcome(StrEnum):
    SETTLED = "settled"
    NEVER_MOVED = "never_moved"
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True)
class ChainFacts:
    """What the chain said about one authorization, all read at one block."""

    block_number: int
    block_timestamp: int
    used: bool
    # The AuthorizationUsed log's transaction when `used` and the log was searched and found.
    tx_hash: str | None = None


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    tx_hash: str | None = None


def uncheckable(row: PaymentRecord) -> str | None:
    """Why the chain cannot answer for this row (None: it can)."""
    if row.state not in CHAIN_CHECKED_STATES:
        return f"the row is {row.state}, not a payment whose money may have moved"
    if row.chain_state is not None:
        return f"the chain already answered ({row.chain_state})"
    if EIP155_PATTERN.match(row.network) is None:
        return f"{row.network} is not an EVM (eip155) network"
    if row.scheme not in EIP3009_SCHEMES or row.nonce is None or EIP3009_NONCE.match(row.nonce) is None:
        # Permit2 (exact or upto) nonces live in the Permit2 contract, not in the token.
        return "not an EIP-3009 authorization: the token's authorizationState cannot tell"
    if row.payer is None or EVM_ADDRESS.match(row.payer) is None:
        return "no payer address recorded"
    if EVM_ADDRESS.match(row.asset) is None:
        return "the asset is not an EVM address"
    if row.valid_before is None:
        return "no validBefore recorded"
    return None


def decide(row: PaymentRecord, facts: ChainFacts) -> Verdict:
    """Settled, never moved, or still in doubt, from the row and what the chain said."""
    problem = uncheckable(row)
    if problem is not None:
        return Verdict(Outcome.IN_DOUBT, f"cannot check on chain: {problem}")
    assert row.valid_before is not None
    at = f"block {facts.block_number}"
    if facts.used:
        if facts.tx_hash:
            return Verdict(
                Outcome.SETTLED,
                f"{RECONCILED_USED} in tx {facts.tx_hash} (checked at {at})",
                facts.tx_hash,
            )
        # authorizationState is also true after a cancelAuthorization (we never send one): counted as
        # spent, the safe side for budgets, with the reason saying what is missing.
        return Verdict(
            Outcome.SETTLED,
            f"{RECONCILED_USED} (checked at {at}), but no AuthorizationUsed log was found "
            "(cancelled?), so the transaction hash is unknown",
        )
    if row.valid_before <= facts.block_timestamp:
        return Verdict(
            Outcome.NEVER_MOVED,
            f"reconciled from chain: never moved; authorization unused at {at} and expired "
            f"(validBefore {row.valid_before} <= block time {facts.block_timestamp})",
        )
    return Verdict(
        Outcome.IN_DOUBT,
        f"authorization unused at {at}; it can still settle until validBefore {row.valid_before} "
        f"(block time {facts.block_timestamp})",
    )


def ledger_reason(row: PaymentRecord, verdict: Verdict) -> str:
    """The reason written to the row: the verdict, and what the row said before (kept for audit)."""
    text = verdict.reason
    if row.tx_hash and verdict.tx_hash and row.tx_hash.lower() != verdict.tx_hash.lower():
        text += f"; the server named tx {row.tx_hash}, which did not use this authorization"
    elif row.tx_hash and verdict.outcome is Outcome.NEVER_MOVED:
        text += f"; the server named tx {row.tx_hash}"
    if row.reason:
        text += f"; was {row.state}: {row.reason}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def chain_state_change(row: PaymentRecord, verdict: Verdict) -> tuple[ChainState, PaymentState] | None:
    """The chain's final word for `row` and the ledger state it implies (None: not final yet)."""
    if verdict.outcome is Outcome.IN_DOUBT:
        return None
    if verdict.outcome is Outcome.NEVER_MOVED:
        keeps = row.state in (PaymentState.REJECTED, PaymentState.UNSETTLED)
        return ChainState.UNUSED, row.state if keeps else PaymentState.REJECTED
    if row.state is PaymentState.SETTLED or (row.state is PaymentState.IN_DOUBT and row.delivered):
        return ChainState.USED, PaymentState.SETTLED
    return ChainState.USED, PaymentState.SETTLED_UNDELIVERED


# -- reading the chain --------------------------------------------------------------------------


class ChainReadError(Exception):
    """A JSON-RPC read failed or answered something unusable."""


class ChainReader(Protocol):
    async def chain_id(self) -> int: ...

    async def latest_block(self) -> tuple[int, int]:
        """(number, timestamp) of the latest block."""
        ...

    async def authorization_used(self, asset: str, authorizer: str, nonce: str, block: int) -> bool: ...

    async def find_authorization_tx(
        self, asset: str, authorizer: str, nonce: str, *, after: int, before: int, upto_block: int
    ) -> str | None:
        """Tx hash of AuthorizationUsed(authorizer, nonce) in blocks with after <= timestamp < before."""
        ...

    async def receipt_uses_authorization(self, tx_hash: str, asset: str, authorizer: str, nonce: str) -> bool:
        """Does the mined transaction `tx_hash` carry AuthorizationUsed(authorizer, nonce) from `asset`?
        False also when there is no such (mined) transaction."""
        ...

    async def close(self) -> None: ...


class Web3ChainReader:
    """ChainReader over JSON-RPC with web3's AsyncWeb3 (aiohttp), like `wallet.token_balance`."""

    def __init__(self, rpc_url: str, *, timeout: float = RPC_TIMEOUT) -> None:
        import aiohttp
        from web3 import AsyncHTTPProvider, AsyncWeb3

        self.rpc_url = rpc_url
        # No retries: a failed read leaves the row alone until the next pass.
        self._provider = AsyncHTTPProvider(
            rpc_url,
            request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
            exception_retry_configuration=None,
        )
        self._w3 = AsyncWeb3(self._provider)

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise ChainReadError(f"{what} via {self.rpc_url} failed: {type(exc).__name__}: {exc}") from None

    async def chain_id(self) -> int:
        return int(await self._call("eth_chainId", self._w3.eth.chain_id))

    async def latest_block(self) -> tuple[int, int]:
        block = await self._call("eth_getBlockByNumber(latest)", self._w3.eth.get_block("latest"))
        return int(block["number"]), int(block["timestamp"])

    async def _timestamp(self, number: int) -> int:
        block = await self._call(f"eth_getBlockByNumber({number})", self._w3.eth.get_block(number))
        return int(block["timestamp"])

    async def authorization_used(self, asset: str, authorizer: str, nonce: str, block: int) -> bool:
        from web3 import AsyncWeb3

        contract = self._w3.eth.contract(address=AsyncWeb3.to_checksum_address(asset), abi=TOKEN_ABI)
        call = contract.functions.authorizationState(
            AsyncWeb3.to_checksum_address(authorizer), bytes.fromhex(nonce[2:])
        ).call(block_identifier=block)
        used = await self._call(f"authorizationState({authorizer}, {nonce}) on {asset}", call)
        if not isinstance(used, bool):
            raise ChainReadError(f"authorizationState returned {used!r}")
        return used

    async def first_block_at_or_after(self, timestamp: int, last: int) -> int:
        return await self._first_block_at_or_after(timestamp, last)

    async def logs(self, topics: list[str], first: int, last: int, address: str | None = None) -> list[Any]:
        """Every log matching `topics` in blocks first..last, in chunks of LOG_CHUNK_BLOCKS."""
        from web3 import AsyncWeb3
        from web3.types import FilterParams

        found: list[Any] = []
        start = first
        while start <= last:
            end = min(last, start + LOG_CHUNK_BLOCKS - 1)
            query: FilterParams = {"fromBlock": start, "toBlock": end, "topics": list(topics)}
            if address is not None:
                query["address"] = AsyncWeb3.to_checksum_address(address)
            batch = await self._call(f"eth_getLogs({start}..{end})", self._w3.eth.get_logs(query))
            found.extend(entry for entry in batch if not entry.get("removed", False))
            start = end + 1
        return found

    async def _first_block_at_or_after(self, timestamp: int, last: int) -> int:
        """Smallest block number in 0..last whose timestamp is >= `timestamp` (last + 1 if none)."""
        low, high = 0, last + 1
        while low < high:  # block timestamps never decrease
            middle = (low + high) // 2
            if await self._timestamp(middle) >= timestamp:
                high = middle
            else:
                low = middle + 1
        return low

    async def find_authorization_tx(
        self, asset: str, authorizer: str, nonce: str, *, after: int, before: int, upto_block: int
    ) -> str | None:
        from web3 import AsyncWeb3
        from web3.types import FilterParams

        first = await self._first_block_at_or_after(after, upto_block)
        last = min(upto_block, await self._first_block_at_or_after(before, upto_block) - 1)
        topics = [AUTHORIZATION_USED_TOPIC, "0x" + "00" * 12 + authorizer[2:].lower(), nonce.lower()]
        address = AsyncWeb3.to_checksum_address(asset)
        start = first
        while start <= last:
            end = min(last, start + LOG_CHUNK_BLOCKS - 1)
            query: FilterParams = {"address": address, "fromBlock": start, "toBlock": end, "topics": topics}
            logs = await self._call(f"eth_getLogs({start}..{end})", self._w3.eth.get_logs(query))
            for entry in logs:
                if not entry.get("removed", False):
                    return str(AsyncWeb3.to_hex(entry["transactionHash"]))
            start = end + 1
        return None

    async def receipt_uses_authorization(self, tx_hash: str, asset: str, authorizer: str, nonce: str) -> bool:
        if re.fullmatch(r"0x[0-9a-fA-F]{64}", tx_hash) is None:
            return False  # not even a hash: a server's invention
        try:
            receipt = await self._w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "TransactionNotFound":
                return False
            raise ChainReadError(
                f"eth_getTransactionReceipt({tx_hash}) via {self.rpc_url} failed: {exc}"
            ) from None
        topics = [AUTHORIZATION_USED_TOPIC, "0x" + "00" * 12 + authorizer[2:].lower(), nonce.lower()]
        for entry in receipt.get("logs", []):
            if str(entry["address"]).lower() != asset.lower():
                continue
            if [_hex(t).lower() for t in entry["topics"]] == topics:
                return True
        return False

    async def close(self) -> None:
        await self._provider.disconnect()


def _hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    text = str(value)
    return text if text.startswith("0x") else "0x" + text


ReaderFactory = Callable[[str], ChainReader]


# -- the reconciler (I/O) -----------------------------------------------------------------------


RECONCILE_FIELDS = ("settled", "undelivered", "never_moved", "in_doubt", "no_rpc", "errors")


@dataclass
class PassReport:
    """What one pass did (ids per outcome); rows left out for lack of an RPC URL are `no_rpc`."""

    settled: list[int] = field(default_factory=list)  # the chain showed the authorization used
    undelivered: list[int] = field(default_factory=list)  # ... and the answer never reached the client
    never_moved: list[int] = field(default_factory=list)
    in_doubt: list[int] = field(default_factory=list)
    no_rpc: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)


class Reconciler:
    """Runs passes over the ledger's unresolved rows; never raises out of a pass (logs instead)."""

    def __init__(
        self,
        store: LedgerStore | AsyncLedgerStore,
        rpc_urls: Mapping[str, str],
        *,
        interval: float = DEFAULT_INTERVAL,
        reader_factory: ReaderFactory | None = None,
    ) -> None:
        self.store = as_async(store)  # the payer's, in the proxy: one ledger thread for every write
        self.rpc_urls = dict(rpc_urls)  # CAIP-2 -> JSON-RPC URL
        self.interval = interval
        self._reader_factory: ReaderFactory = reader_factory or Web3ChainReader
        self._told_no_rpc: set[str] = set()
        self._told_in_doubt: set[int] = set()
        self._pass_lock = asyncio.Lock()  # the loop and an on-demand pass never run at once

    async def run_forever(self) -> None:
        """A pass now, then one every `interval` seconds.

        A pass with no unresolved row reads only the local ledger (no RPC), so the loop also picks up
        rows that appear while the proxy runs (a connection cut after paying, a settled answer).
        """
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not take the proxy down; the next pass retries
                log.exception("reconciling payments from the chain failed")
            await asyncio.sleep(self.interval)

    async def run_once(self) -> PassReport:
        async with self._pass_lock:
            return await self._pass()

    async def _pass(self) -> PassReport:
        report = PassReport()
        try:
            rows = list(reversed(await self.store.list_unresolved()))  # oldest first
        except StoreError as exc:
            log.error("cannot read unresolved payments from the ledger: %s", exc)
            return report
        by_network: dict[str, list[PaymentRecord]] = {}
        for row in rows:
            by_network.setdefault(row.network, []).append(row)
        for network, group in by_network.items():
            url = self.rpc_urls.get(network)
            if url is None:
                report.no_rpc.extend(r.id for r in group)
                if network not in self._told_no_rpc:
                    self._told_no_rpc.add(network)
                    log.warning(
                        "payments %s on %s stay unresolved: no [rpc] URL to check them on chain",
                        ", ".join(f"#{r.id}" for r in group),
                        network,
                    )
                continue
            await self._network_pass(network, url, group, report)
        return report

    async def _network_pass(
        self, network: str, url: str, rows: Sequence[PaymentRecord], report: PassReport
    ) -> None:
        checkable = []
        for row in rows:
            problem = uncheckable(row)
            if problem is None:
                checkable.append(row)
            else:
                report.in_doubt.append(row.id)
                self._tell_in_doubt(row, f"cannot check on chain: {problem}")
        if not checkable:
            return
        reader = self._reader_factory(url)
        try:
            try:
                await self._check_chain_id(reader, network)
                block, timestamp = await reader.latest_block()
            except ChainReadError as exc:
                report.errors.extend(r.id for r in checkable)
                log.warning("cannot reconcile payments on %s now: %s", network, exc)
                return
            for row in checkable:
                try:
                    facts = await self._facts(reader, row, block, timestamp)
                except ChainReadError as exc:
                    report.errors.append(row.id)
                    log.warning("cannot reconcile payment #%s now: %s", row.id, exc)
                    continue
                await self._apply(row, decide(row, facts), report)
        finally:
            try:
                await reader.close()
            except Exception as exc:  # closing a connection pool: nothing to recover
                log.debug("closing the RPC client for %s: %s", network, exc)

    async def _check_chain_id(self, reader: ChainReader, network: str) -> None:
        # An RPC URL for another chain would answer "unused" for every nonce: refuse to trust it.
        match = EIP155_PATTERN.match(network)
        assert match is not None  # uncheckable() let only eip155 rows through
        expected = int(match.group(1))
        actual = await reader.chain_id()
        if actual != expected:
            raise ChainReadError(f"the [rpc] URL serves chain id {actual}, not {expected}")

    async def _facts(self, reader: ChainReader, row: PaymentRecord, block: int, timestamp: int) -> ChainFacts:
        assert row.nonce is not None and row.payer is not None and row.valid_before is not None
        if row.tx_hash and await reader.receipt_uses_authorization(
            row.tx_hash, row.asset, row.payer, row.nonce
        ):
            return ChainFacts(block, timestamp, True, row.tx_hash)  # the named transaction is the one
        used = await reader.authorization_used(row.asset, row.payer, row.nonce, block)
        tx_hash = None
        if used:
            tx_hash = await reader.find_authorization_tx(
                row.asset,
                row.payer,
                row.nonce,
                after=int(row.created_at) - LOG_LOOKBACK_SECONDS,
                before=row.valid_before,
                upto_block=block,
            )
        return ChainFacts(block, timestamp, used, tx_hash)

    async def _apply(self, row: PaymentRecord, verdict: Verdict, report: PassReport) -> None:
        change = chain_state_change(row, verdict)
        if change is None:
            report.in_doubt.append(row.id)
            self._tell_in_doubt(row, verdict.reason)
            return
        chain_state, state = change
        confirmed = chain_state is ChainState.USED and state is row.state and _same_tx(row, verdict)
        reason = (row.reason or "") if confirmed else ledger_reason(row, verdict)
        try:
            record = await self.store.record_chain_verdict(
                row.id, chain_state=chain_state, state=state, reason=reason, tx_hash=verdict.tx_hash
            )
        except StoreError as exc:
            report.errors.append(row.id)
            if exc.kind == "transition":  # recorded meanwhile (a late receipt): that record stands
                log.info("payment #%s was resolved meanwhile: %s", row.id, exc)
            else:
                log.error("payment #%s: cannot record %s: %s", row.id, verdict.outcome, exc)
            return
        self._told_in_doubt.discard(row.id)
        if chain_state is ChainState.UNUSED:
            report.never_moved.append(row.id)
        elif state is PaymentState.SETTLED_UNDELIVERED:
            report.undelivered.append(row.id)
        else:
            report.settled.append(row.id)
        if confirmed:
            log.debug("payment #%s: the chain confirms tx %s", row.id, verdict.tx_hash)
            return
        log.info("payment #%s: %s", row.id, verdict.reason)
        if state is PaymentState.SETTLED_UNDELIVERED and row.state is not PaymentState.SETTLED_UNDELIVERED:
            log_undelivered(record)

    def _tell_in_doubt(self, row: PaymentRecord, reason: str) -> None:
        if row.id not in self._told_in_doubt:  # once per row, not every pass
            self._told_in_doubt.add(row.id)
            log.info("payment #%s stays in doubt: %s", row.id, reason)


def _same_tx(row: PaymentRecord, verdict: Verdict) -> bool:
    return bool(row.tx_hash and verdict.tx_hash and row.tx_hash.lower() == verdict.tx_hash.lower())
