"""Sessions in the same SQLite file as the ledger: one row per session, secrets in a JSON column.

The database file is 0600 in a 0700 home; the credentials column holds what a session replays
(cookies, lease headers, the signed token), so it is never copied into logs or API answers.
Queryable fields (origin, expiry, end) are real columns; everything else is the session's JSON.

``AsyncSessionStore`` is the interface the running proxy uses with either backend: this file's
``ThreadedSessionStore`` (the SQLite store on a thread of its own) or ``PostgresSessionStore``
(proxy/store/postgres_sessions.py, shared by a fleet). ``SessionManager`` also still takes the blocking
``SqliteSessionStore`` itself (written through on the caller's thread, as before).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

from proxy.sessions.model import Session
from proxy.store.base import StoreError
from proxy.store.sqlite import Migration, apply_migrations, describe_sqlite_error, open_database

SESSIONS_COMPONENT = "sessions"
SESSION_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """
            CREATE TABLE sessions (
                id          TEXT PRIMARY KEY,
                origin      TEXT NOT NULL,
                created_at  REAL NOT NULL,
                expires_at  REAL NOT NULL,
                ended_at    REAL,
                data        TEXT NOT NULL
            )
            """,
            "CREATE INDEX sessions_live ON sessions (ended_at, expires_at)",
            "CREATE INDEX sessions_origin ON sessions (origin)",
        ),
    ),
)


P = ParamSpec("P")
T = TypeVar("T")

# Called with the id of a session another process saved (opened, renewed, ended).
SessionChanged = Callable[[str], Awaitable[None]]


class AsyncSessionStore(Protocol):
    async def save(self, sessions: Sequence[Session]) -> None:
        """Insert or replace sessions atomically; other replicas are told (watch). Call counts of a
        session already stored are kept (they only grow through add_calls)."""
        ...

    async def get(self, session_id: str) -> Session | None: ...

    async def load_active(self, now: float) -> list[Session]: ...

    async def list(
        self, *, now: float, state: str | None = None, origin: str | None = None, limit: int = 1000
    ) -> list[Session]: ...

    async def add_calls(self, calls: Mapping[str, tuple[int, float]]) -> None:
        """Add `n` calls to each session and move its last use to `at` if later: {id: (n, at)}. Replicas'
        counts add up instead of overwriting each other."""
        ...

    async def count_active(self, now: float) -> int: ...

    async def prune(self, before: float) -> int: ...

    async def watch(self, changed: SessionChanged) -> None:
        """Run until cancelled, awaiting `changed(id)` for every session another process saves. A store
        only one process uses (SQLite) has nothing to report and just waits."""
        ...

    async def close(self) -> None: ...


class SqliteSessionStore:
    """SessionStore on SQLite; its own connection to the ledger's database file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = open_database(self.path)
        try:
            apply_migrations(self._conn, SESSIONS_COMPONENT, SESSION_MIGRATIONS, self.path)
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
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise describe_sqlite_error(exc, self.path) from None

    def save(self, sessions: Sequence[Session]) -> None:
        """Insert or replace sessions atomically (one transaction for a whole flush)."""
        rows = [
            (s.id, s.scope.origin_str, s.created_at, s.expires_at, s.ended_at, json.dumps(s.to_dict()))
            for s in sessions
        ]
        if not rows:
            return
        with self._use(write=True) as conn:
            conn.executemany(
                "INSERT INTO sessions (id, origin, created_at, expires_at, ended_at, data) "
                "VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at, "
                "ended_at = excluded.ended_at, "
                # Call counts only grow: a save (a renewal, an end) never takes back calls another
                # writer added (add_calls).
                "data = json_set(excluded.data, '$.call_count', max("
                "COALESCE(json_extract(sessions.data, '$.call_count'), 0), "
                "COALESCE(json_extract(excluded.data, '$.call_count'), 0)))",
                rows,
            )

    def get(self, session_id: str) -> Session | None:
        with self._use(write=False) as conn:
            row = conn.execute("SELECT data FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _load(row[0]) if row else None

    def load_active(self, now: float) -> list[Session]:
        with self._use(write=False) as conn:
            rows = conn.execute(
                "SELECT data FROM sessions WHERE ended_at IS NULL AND expires_at > ? ORDER BY created_at",
                (now,),
            ).fetchall()
        return [_load(row[0]) for row in rows]

    def list(
        self, *, now: float, state: str | None = None, origin: str | None = None, limit: int = 1000
    ) -> list[Session]:
        clauses: list[str] = []
        params: list[float | str] = []
        if state == "active":
            clauses.append("ended_at IS NULL AND expires_at > ?")
            params.append(now)
        elif state == "expired":
            clauses.append("ended_at IS NULL AND expires_at <= ?")
            params.append(now)
        elif state == "ended":
            clauses.append("ended_at IS NOT NULL")
        if origin is not None:
            clauses.append("origin = ?")
            params.append(origin)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._use(write=False) as conn:
            rows = conn.execute(
                f"SELECT data FROM sessions {where} ORDER BY created_at DESC LIMIT ?",  # noqa: S608 - fixed clauses
                (*params, limit),
            ).fetchall()
        return [_load(row[0]) for row in rows]

    def add_calls(self, calls: Mapping[str, tuple[int, float]]) -> None:
        if not calls:
            return
        with self._use(write=True) as conn:
            conn.executemany(
                "UPDATE sessions SET data = json_set(data, '$.call_count', "
                "COALESCE(json_extract(data, '$.call_count'), 0) + ?, '$.last_used_at', "
                "max(COALESCE(json_extract(data, '$.last_used_at'), 0), ?)) WHERE id = ?",
                [(n, at, session_id) for session_id, (n, at) in calls.items()],
            )

    def count_active(self, now: float) -> int:
        with self._use(write=False) as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL AND expires_at > ?", (now,)
            ).fetchone()
        return int(row[0])

    def prune(self, before: float) -> int:
        """Forget sessions that ended or expired before `before` (the ledger keeps their payments)."""
        with self._use(write=True) as conn:
            cursor = conn.execute("DELETE FROM sessions WHERE COALESCE(ended_at, expires_at) < ?", (before,))
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class ThreadedSessionStore:
    """AsyncSessionStore over a SqliteSessionStore: its calls run in order on a thread of their own."""

    def __init__(self, sync: SqliteSessionStore) -> None:
        self.sync = sync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessions")

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def save(self, sessions: Sequence[Session]) -> None:
        # Serialised now, on the caller's side: the session may change while the write waits its turn.
        await self._run(self.sync.save, [Session.from_dict(s.to_dict()) for s in sessions])

    async def get(self, session_id: str) -> Session | None:
        return await self._run(self.sync.get, session_id)

    async def load_active(self, now: float) -> list[Session]:
        return await self._run(self.sync.load_active, now)

    async def list(
        self, *, now: float, state: str | None = None, origin: str | None = None, limit: int = 1000
    ) -> list[Session]:
        return await self._run(self.sync.list, now=now, state=state, origin=origin, limit=limit)

    async def add_calls(self, calls: Mapping[str, tuple[int, float]]) -> None:
        await self._run(self.sync.add_calls, dict(calls))

    async def count_active(self, now: float) -> int:
        return await self._run(self.sync.count_active, now)

    async def prune(self, before: float) -> int:
        return await self._run(self.sync.prune, before)

    async def watch(self, changed: SessionChanged) -> None:
        await asyncio.Event().wait()  # one process owns the file: nobody else changes its sessions

    async def close(self) -> None:
        await self._run(self.sync.close)
        self._executor.shutdown(wait=False)


def _load(data: str) -> Session:
    try:
        return Session.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"a stored session is unreadable: {exc}", "corrupt") from None
