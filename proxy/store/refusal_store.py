"""Refusals on record: every 402 the payer refused to pay, in the ledger's SQLite file, bounded.

A refusal is bookkeeping, not money: nothing was signed. So the table is written cheaply and never in
the way of the client's answer. Its own connection, with ``synchronous = NORMAL`` (WAL: a commit is not
fsynced on its own; a power cut may lose the last refusals, never the ledger's rows, whose commits
fsync the whole WAL) and a short busy timeout (a database locked by another process costs the answer
at most ``BUSY_TIMEOUT_MS``, then the refusal is dropped with a log line). Its own migration component
(``refusals``) in ``schema_version``: the ledger's schema is not touched.

Retention: the newest ``MAX_ROWS`` rows, none older than ``MAX_AGE_SECONDS``. Enforced on each write, in
the insert's transaction: rows beyond the newest ``MAX_ROWS`` by id (a primary-key range, one row per
write once full), and rows past the age (an indexed range, only when the oldest row kept is that old).
Reads never return a row past the age either.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from proxy.store.sqlite import Migration, apply_migrations, describe_sqlite_error, open_database

REFUSALS_COMPONENT = "refusals"
MAX_ROWS = 10_000
MAX_AGE_SECONDS = 30 * 86400
MAX_LIST_LIMIT = 10_000
BUSY_TIMEOUT_MS = 250
MAX_DETAIL_CHARS = 500
MAX_URL_CHARS = 8192

_COLUMNS = (
    "id, created_at, host, method, url, reason, detail, amount, decimals, asset, network, pay_to, "
    "payment_id, session_id"
)

REFUSAL_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """
            CREATE TABLE refusals (
                id          INTEGER PRIMARY KEY AUTOINCREMENT,
                created_at  REAL    NOT NULL,
                host        TEXT    NOT NULL,
                method      TEXT    NOT NULL,
                url         TEXT    NOT NULL,
                reason      TEXT    NOT NULL,
                detail      TEXT    NOT NULL,
                amount      TEXT,     -- atomic units, decimal string (uint256); NULL: no price known
                decimals    INTEGER,  -- NULL: the asset is unknown to us
                asset       TEXT,
                network     TEXT,
                pay_to      TEXT,
                payment_id  INTEGER,  -- the ledger row behind it (payment_in_doubt, payment_undelivered)
                session_id  TEXT
            )
            """,
            "CREATE INDEX refusals_created ON refusals (created_at)",
        ),
    ),
)


@dataclass(frozen=True)
class NewRefusal:
    host: str
    method: str
    url: str
    reason: str
    detail: str
    amount: int | None = None
    decimals: int | None = None
    asset: str | None = None
    network: str | None = None
    pay_to: str | None = None
    payment_id: int | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class RefusalRecord:
    id: int
    created_at: float
    host: str
    method: str
    url: str
    reason: str
    detail: str
    amount: int | None
    decimals: int | None
    asset: str | None
    network: str | None
    pay_to: str | None
    payment_id: int | None
    session_id: str | None


P = ParamSpec("P")
T = TypeVar("T")


class AsyncRefusalStore(Protocol):
    """The refusals table as the running proxy uses it (SQLite: ThreadedRefusalStore; PostgreSQL:
    proxy/store/postgres_refusals.py). `add` is called on the request path and never waits long: on
    SQLite it writes at once (a 250 ms busy timeout at most, as before), on PostgreSQL it queues the row
    for a writer task (dropped, with a log line, when the database cannot take it)."""

    def add(self, new: NewRefusal, *, now: float | None = None) -> int | None: ...

    async def list(
        self,
        *,
        host: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        limit: int = 100,
        now: float | None = None,
    ) -> list[RefusalRecord]: ...

    async def count_by_host(self, since: float) -> dict[str, int]: ...

    async def close(self) -> None: ...


class SqliteRefusalStore:
    """The `refusals` table; its own connection to the ledger's database file."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = MAX_ROWS,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = open_database(self.path)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            apply_migrations(self._conn, REFUSALS_COMPONENT, REFUSAL_MIGRATIONS, self.path)
            self._oldest = self._read_oldest()
        except sqlite3.Error as exc:
            self._conn.close()
            raise describe_sqlite_error(exc, self.path) from None
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _use(self, write: bool) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                if write:
                    self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    if write:
                        self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        try:
                            self._conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass  # the original error is the one worth reporting
                    raise
            except sqlite3.Error as exc:
                raise describe_sqlite_error(exc, self.path) from None

    def _read_oldest(self) -> float | None:
        row = self._conn.execute("SELECT MIN(created_at) FROM refusals").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def add(self, new: NewRefusal, *, now: float | None = None) -> int:
        """Record one refusal (and drop what the retention bound no longer keeps). Returns its id."""
        at = float(self._clock() if now is None else now)
        cutoff = at - self.max_age
        with self._use(write=True) as conn:
            cursor = conn.execute(
                "INSERT INTO refusals (created_at, host, method, url, reason, detail, amount, decimals, "
                "asset, network, pay_to, payment_id, session_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    at,
                    new.host,
                    new.method.upper(),
                    _clip(new.url, MAX_URL_CHARS),
                    new.reason,
                    _clip(new.detail, MAX_DETAIL_CHARS),
                    None if new.amount is None else str(new.amount),
                    new.decimals,
                    new.asset,
                    new.network,
                    new.pay_to,
                    new.payment_id,
                    new.session_id,
                ),
            )
            row_id = cursor.lastrowid
            assert row_id is not None
            if row_id > self.max_rows:
                conn.execute("DELETE FROM refusals WHERE id <= ?", (row_id - self.max_rows,))
            oldest = at if self._oldest is None else min(self._oldest, at)
            if oldest < cutoff:
                conn.execute("DELETE FROM refusals WHERE created_at < ?", (cutoff,))
                oldest = self._read_oldest() or at
        self._oldest = oldest  # only once committed
        return row_id

    def list(
        self,
        *,
        host: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        limit: int = 100,
        now: float | None = None,
    ) -> list[RefusalRecord]:
        """Newest first, within the retention age."""
        floor = float(self._clock() if now is None else now) - self.max_age
        clauses = ["created_at >= ?"]
        params: list[object] = [max(floor, since) if since is not None else floor]
        if host is not None:
            clauses.append("host = ?")
            params.append(host)
        if reason is not None:
            clauses.append("reason = ?")
            params.append(reason)
        params.append(max(1, min(int(limit), MAX_LIST_LIMIT)))
        with self._use(write=False) as conn:
            # `clauses` are the constant fragments above; every value is a bound parameter.
            query = f"SELECT {_COLUMNS} FROM refusals WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?"  # noqa: S608
            rows = conn.execute(query, params).fetchall()
        return [_record(row) for row in rows]

    def count_by_host(self, since: float) -> dict[str, int]:
        with self._use(write=False) as conn:
            rows = conn.execute(
                "SELECT host, COUNT(*) FROM refusals WHERE created_at >= ? GROUP BY host", (since,)
            ).fetchall()
        return {str(host): int(n) for host, n in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class ThreadedRefusalStore:
    """AsyncRefusalStore over a SqliteRefusalStore: `add` as before (on the caller's thread), reads on a
    thread of their own."""

    def __init__(self, sync: SqliteRefusalStore) -> None:
        self.sync = sync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refusals")

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def add(self, new: NewRefusal, *, now: float | None = None) -> int | None:
        return self.sync.add(new, now=now)

    async def list(
        self,
        *,
        host: str | None = None,
        reason: str | None = None,
        since: float | None = None,
        limit: int = 100,
        now: float | None = None,
    ) -> list[RefusalRecord]:
        return await self._run(self.sync.list, host=host, reason=reason, since=since, limit=limit, now=now)

    async def count_by_host(self, since: float) -> dict[str, int]:
        return await self._run(self.sync.count_by_host, since)

    async def close(self) -> None:
        await self._run(self.sync.close)
        self._executor.shutdown(wait=False)


def _record(row: tuple[Any, ...]) -> RefusalRecord:
    (rid, created, host, method, url, reason, detail, amount, decimals, asset, network, pay_to, pid, sid) = (
        row
    )
    return RefusalRecord(
        id=int(rid),
        created_at=float(created),
        host=str(host),
        method=str(method),
        url=str(url),
        reason=str(reason),
        detail=str(detail),
        amount=None if amount is None else int(str(amount)),
        decimals=None if decimals is None else int(decimals),
        asset=None if asset is None else str(asset),
        network=None if network is None else str(network),
        pay_to=None if pay_to is None else str(pay_to),
        payment_id=None if pid is None else int(pid),
        session_id=None if sid is None else str(sid),
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
