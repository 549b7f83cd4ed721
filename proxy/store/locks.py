"""Process-local keyed locks: single flight per key inside one process, with a wait limit.

The SQLite store's need_lock and payment_lock (one process owns the file), and the first step of the
PostgreSQL store's (waiters of one process queue here, so only one of them holds a database connection
for the advisory lock). A lock lives while someone holds or waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable

from proxy.store.base import StoreError


class KeyedLocks:
    def __init__(self) -> None:
        # key -> (lock, number of tasks holding or waiting for it)
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, *, wait: float | None = None, what: str = "") -> AsyncIterator[None]:
        """Hold `key`'s lock; with `wait`, StoreError "locked" after that many seconds (None: no limit)."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            try:
                if wait is None:
                    await lock.acquire()
                else:
                    await asyncio.wait_for(lock.acquire(), wait)
            except TimeoutError:
                raise StoreError(f"{what}: still held elsewhere after {wait:g} s", "locked") from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            # A released lock with waiters still looks unlocked: count users, or a second holder could start.
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


_BY_DATABASE: dict[str, KeyedLocks] = {}


def locks_for(database: str) -> KeyedLocks:
    """The locks every store of this process on `database` (a resolved path) shares."""
    found = _BY_DATABASE.get(database)
    if found is None:
        found = _BY_DATABASE[database] = KeyedLocks()
    return found
