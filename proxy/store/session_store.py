"""Sessions in the same SQLite file as the ledger: one row per session, secrets in a JSON column.

The database file is 0600 in a 0700 home; the credentials column holds what a session replays
(cookies, lease headers, the signed token), so it is never copied into logs or API answers.
Queryable fields (origin, expiry, end) are real columns; everything else is the session's JSON.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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
                "ended_at = excluded.ended_at, data = excluded.data",
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

    def prune(self, before: float) -> int:
        """Forget sessions that ended or expired before `before` (the ledger keeps their payments)."""
        with self._use(write=True) as conn:
            cursor = conn.execute("DELETE FROM sessions WHERE COALESCE(ended_at, expires_at) < ?", (before,))
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _load(data: str) -> Session:
    try:
        return Session.from_dict(json.loads(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"a stored session is unreadable: {exc}", "corrupt") from None
