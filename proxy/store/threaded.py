"""The ledger off the event loop: an AsyncLedgerStore over a blocking LedgerStore (SQLite).

Every call runs, in order, on one worker thread of its own; the event loop only waits for the answer.
So a ledger that is slow (an fsync per commit) or locked by another process (up to the 5 s busy
timeout) delays the payments waiting for it and nothing else: pass-through traffic and session hits
never touch it. One thread keeps the order of writes the payer relies on (a pending row before its
outcome). A caller that is cancelled while its call runs does not stop the call: the write completes
(a cancelled paid request is still recorded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import ParamSpec, TypeVar, cast

from proxy.store.base import (
    NEED_LOCK_TIMEOUT,
    PAYMENT_LOCK_TIMEOUT,
    AsyncLedgerStore,
    ChainState,
    LedgerStore,
    NewPayment,
    PaymentRecord,
    PaymentState,
    SpendTotals,
    StateTotal,
    is_async_store,
)
from proxy.store.locks import KeyedLocks, locks_for

P = ParamSpec("P")
T = TypeVar("T")


class ThreadedLedgerStore:
    """AsyncLedgerStore around `sync` (kept as an attribute for tests and tools that read it directly)."""

    def __init__(self, sync: LedgerStore) -> None:
        self.sync = sync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        # One process owns a SQLite ledger: its single flights and payment lock are this process's, shared
        # by every store of the process on the same file.
        path = getattr(sync, "path", None)
        self._locks = locks_for(str(Path(path).resolve())) if path is not None else KeyedLocks()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def attach_session(self, payment_id: int, session_id: str) -> None:
        return await self._run(self.sync.attach_session, payment_id, session_id)

    async def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        return await self._run(self.sync.insert_pending, new, now=now)

    async def insert_dry_run(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        return await self._run(self.sync.insert_dry_run, new, now=now)

    async def set_authorization(
        self, payment_id: int, *, nonce: str, valid_before: int, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(
            self.sync.set_authorization, payment_id, nonce=nonce, valid_before=valid_before, now=now
        )

    async def record_refund(
        self, payment_id: int, refunded: int, *, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(self.sync.record_refund, payment_id, refunded, now=now)

    async def mark_settled(
        self,
        payment_id: int,
        *,
        tx_hash: str | None = None,
        payer: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord:
        return await self._run(
            self.sync.mark_settled, payment_id, tx_hash=tx_hash, payer=payer, reason=reason, now=now
        )

    async def mark_rejected(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord:
        return await self._run(self.sync.mark_rejected, payment_id, reason=reason, now=now)

    async def mark_unsettled(
        self, payment_id: int, *, reason: str, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(self.sync.mark_unsettled, payment_id, reason=reason, now=now)

    async def mark_in_doubt(
        self,
        payment_id: int,
        *,
        reason: str,
        tx_hash: str | None = None,
        delivered: bool = False,
        now: float | None = None,
    ) -> PaymentRecord:
        return await self._run(
            self.sync.mark_in_doubt, payment_id, reason=reason, tx_hash=tx_hash, delivered=delivered, now=now
        )

    async def note_in_doubt(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(self.sync.note_in_doubt, payment_id, reason=reason, tx_hash=tx_hash, now=now)

    async def mark_settled_undelivered(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(
            self.sync.mark_settled_undelivered, payment_id, reason=reason, tx_hash=tx_hash, now=now
        )

    async def record_presentation(
        self, payment_id: int, *, header_name: str, header_value: str, now: float | None = None
    ) -> PaymentRecord:
        return await self._run(
            self.sync.record_presentation,
            payment_id,
            header_name=header_name,
            header_value=header_value,
            now=now,
        )

    async def presented_header(self, payment_id: int) -> tuple[str, str] | None:
        return await self._run(self.sync.presented_header, payment_id)

    async def record_chain_verdict(
        self,
        payment_id: int,
        *,
        chain_state: ChainState,
        state: PaymentState,
        reason: str,
        tx_hash: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord:
        return await self._run(
            self.sync.record_chain_verdict,
            payment_id,
            chain_state=chain_state,
            state=state,
            reason=reason,
            tx_hash=tx_hash,
            now=now,
        )

    async def add_evidence(self, payment_id: int, evidence: str) -> None:
        return await self._run(self.sync.add_evidence, payment_id, evidence)

    async def get(self, payment_id: int) -> PaymentRecord | None:
        return await self._run(self.sync.get, payment_id)

    async def list(
        self,
        state: PaymentState | None = None,
        host: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[PaymentRecord]:
        return await self._run(self.sync.list, state, host, since, limit)

    async def spent_since(
        self,
        since: float,
        host: str | None = None,
        *,
        now: float | None = None,
        chain_checked: frozenset[str] = frozenset(),
    ) -> SpendTotals:
        return await self._run(self.sync.spent_since, since, host, now=now, chain_checked=chain_checked)

    async def find_blocking(self, method: str, url: str, need: str | None) -> Sequence[PaymentRecord]:
        return await self._run(self.sync.find_blocking, method, url, need)

    async def hosts_since(self, since: float) -> Sequence[str]:
        return await self._run(self.sync.hosts_since, since)

    async def find_in_doubt(self, method: str, url: str, *, still_valid_at: float) -> PaymentRecord | None:
        return await self._run(self.sync.find_in_doubt, method, url, still_valid_at=still_valid_at)

    async def recover_on_startup(self, *, now: float | None = None) -> Sequence[PaymentRecord]:
        return await self._run(self.sync.recover_on_startup, now=now)

    async def list_in_doubt(self) -> Sequence[PaymentRecord]:
        return await self._run(self.sync.list_in_doubt)

    async def list_unresolved(self, limit: int = 500) -> Sequence[PaymentRecord]:
        return await self._run(self.sync.list_unresolved, limit)

    async def state_totals(self) -> Sequence[StateTotal]:
        return await self._run(self.sync.state_totals)

    async def ping(self) -> None:
        await self._run(self.sync.get, 0)

    def need_lock(
        self, need: str, *, timeout: float = NEED_LOCK_TIMEOUT
    ) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(("need", need), wait=timeout, what=f"single flight for {need!r}")

    def payment_lock(self, *, timeout: float = PAYMENT_LOCK_TIMEOUT) -> AbstractAsyncContextManager[None]:
        return self._locks.hold(("payment",), wait=timeout, what="the payment lock")

    async def close(self) -> None:
        await self._run(self.sync.close)
        self._executor.shutdown(wait=False)


def as_async(store: LedgerStore | AsyncLedgerStore) -> AsyncLedgerStore:
    """An AsyncLedgerStore as it is; a blocking LedgerStore behind its own thread."""
    if is_async_store(store):
        return cast(AsyncLedgerStore, store)
    return ThreadedLedgerStore(cast(LedgerStore, store))
