"""Sessions shared by a fleet: the `sessions` table in the ledger's PostgreSQL database.

One row per session, as in SQLite, on the ledger store's pool. What a fleet adds:

- **Every save is announced.** In the transaction that writes it, `pg_notify('x402_sessions', '<writer>
  <id>')`; PostgreSQL delivers it to every listening replica when the transaction commits. ``watch``
  listens on a connection of its own and hands other writers' ids to its callback (the SessionManager
  then reads the row and applies it: an end removes the session from the replica's index).
- **A poll backs the notifications up.** Each write also takes the next value of a sequence
  (`change_seq`). While the listening connection is down (database restarted, connection cut) ``watch``
  polls `change_seq` every `poll_interval` (0.5 s) through the pool and tries to listen again; while it
  is up, a slow poll (every 5 s) catches anything a notification missed. A poll re-reads a window behind
  the newest value it saw, because sequence values are taken before their transactions commit, in any
  order.
- **Call counts add up.** They live in a column of their own that only `add_calls` changes
  (`call_count = call_count + n`); a save never overwrites it. Replicas flush their own increments.
- **Sealed at rest.** The session document (credentials included) is AES-256-GCM sealed with a key
  derived from the wallet's key (proxy/store/session_crypto.py) when the store has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from proxy.sessions.model import Session
from proxy.store.base import StoreError
from proxy.store.postgres import (
    _DRIVER_ERRORS,
    ACQUIRE_TIMEOUT,
    CONNECT_TIMEOUT,
    SERVER_SETTINGS,
    PostgresLedgerStore,
    apply_migrations,
    describe_postgres_error,
)
from proxy.store.session_crypto import SessionCipher, open_document
from proxy.store.session_store import SessionChanged
from proxy.store.sqlite import Migration

log = logging.getLogger("x402_proxy.sessions")

SESSIONS_COMPONENT = "sessions"
CHANNEL = "x402_sessions"
POLL_INTERVAL = 0.5  # seconds between polls while the listener is down
SLOW_POLL_INTERVAL = 5.0  # seconds between polls while it is up (a missed notification)
HEARTBEAT_INTERVAL = 1.0  # how often the listening connection is checked
POLL_WINDOW = 1000  # sequence values re-read behind the newest seen (commits land out of order)
LISTENER_SETTINGS = {**SERVER_SETTINGS, "application_name": "x402-proxy sessions listener"}

PG_SESSION_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            "CREATE SEQUENCE sessions_change_seq",
            """
            CREATE TABLE sessions (
                id           TEXT PRIMARY KEY,
                origin       TEXT NOT NULL,
                created_at   DOUBLE PRECISION NOT NULL,
                expires_at   DOUBLE PRECISION NOT NULL,
                ended_at     DOUBLE PRECISION,
                data         TEXT NOT NULL,
                call_count   BIGINT NOT NULL DEFAULT 0,
                last_used_at DOUBLE PRECISION,
                change_seq   BIGINT NOT NULL,
                changed_by   TEXT NOT NULL
            )
            """,
            "CREATE INDEX sessions_live ON sessions (ended_at, expires_at)",
            "CREATE INDEX sessions_origin ON sessions (origin)",
            "CREATE INDEX sessions_change ON sessions (change_seq)",
        ),
    ),
)

_COLUMNS = "id, data, call_count, last_used_at"


class PostgresSessionStore:
    """AsyncSessionStore on the ledger's PostgreSQL database. Open with ``await ...open(ledger)``."""

    def __init__(
        self,
        ledger: PostgresLedgerStore,
        cipher: SessionCipher | None,
        *,
        poll_interval: float = POLL_INTERVAL,
        slow_poll_interval: float = SLOW_POLL_INTERVAL,
    ) -> None:
        self._ledger = ledger
        self.url = ledger.url
        self.owner = ledger.owner
        self._cipher = cipher
        self.poll_interval = poll_interval
        self.slow_poll_interval = slow_poll_interval
        self.listening = False  # the LISTEN connection is up (tests and /readyz may look)

    @classmethod
    async def open(
        cls, ledger: PostgresLedgerStore, cipher: SessionCipher | None, **kwargs: float
    ) -> PostgresSessionStore:
        store = cls(ledger, cipher, **kwargs)
        await store._run(lambda c: apply_migrations(c, store.url, SESSIONS_COMPONENT, PG_SESSION_MIGRATIONS))
        return store

    async def _run(self, fn: Any) -> Any:
        try:
            async with self._ledger.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                return await fn(conn)
        except _DRIVER_ERRORS as exc:
            raise describe_postgres_error(exc, self.url) from None

    def _document(self, session: Session) -> str:
        text = json.dumps(session.to_dict())
        return text if self._cipher is None else self._cipher.seal(session.id, text)

    def _session(self, row: Any) -> Session:
        text = open_document(self._cipher, str(row["id"]), str(row["data"]))
        try:
            session = Session.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"a stored session is unreadable: {exc}", "corrupt") from None
        session.call_count = int(row["call_count"])
        if row["last_used_at"] is not None:
            session.last_used_at = float(row["last_used_at"])
        return session

    # -- writes -----------------------------------------------------------------------------------

    async def save(self, sessions: Sequence[Session]) -> None:
        rows = [
            (
                s.id,
                s.scope.origin_str,
                float(s.created_at),
                float(s.expires_at),
                None if s.ended_at is None else float(s.ended_at),
                self._document(s),
                int(s.call_count),
                None if s.last_used_at is None else float(s.last_used_at),
                self.owner,
            )
            for s in sessions
        ]
        if not rows:
            return

        async def write(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO sessions (id, origin, created_at, expires_at, ended_at, data, call_count, "
                    "last_used_at, change_seq, changed_by) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, nextval('sessions_change_seq'), $9) "
                    "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at, "
                    "ended_at = COALESCE(sessions.ended_at, excluded.ended_at), data = excluded.data, "
                    "last_used_at = GREATEST(sessions.last_used_at, excluded.last_used_at), "
                    "change_seq = excluded.change_seq, changed_by = excluded.changed_by",
                    rows,
                )
                for row in rows:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{self.owner} {row[0]}")

        await self._run(write)

    async def add_calls(self, calls: Mapping[str, tuple[int, float]]) -> None:
        if not calls:
            return
        await self._run(
            lambda conn: conn.executemany(
                "UPDATE sessions SET call_count = call_count + $2, "
                "last_used_at = GREATEST(COALESCE(last_used_at, 0), $3) WHERE id = $1",
                [(sid, int(n), float(at)) for sid, (n, at) in calls.items()],
            )
        )

    async def prune(self, before: float) -> int:
        result = await self._run(
            lambda conn: conn.execute(
                "DELETE FROM sessions WHERE COALESCE(ended_at, expires_at) < $1", float(before)
            )
        )
        return int(str(result).rsplit(" ", 1)[-1])

    # -- reads ------------------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session | None:
        row = await self._run(
            lambda conn: conn.fetchrow(f"SELECT {_COLUMNS} FROM sessions WHERE id = $1", session_id)  # noqa: S608
        )
        return None if row is None else self._session(row)

    async def load_active(self, now: float) -> list[Session]:
        rows = await self._run(
            lambda conn: conn.fetch(
                f"SELECT {_COLUMNS} FROM sessions WHERE ended_at IS NULL AND expires_at > $1 "  # noqa: S608
                "ORDER BY created_at",
                float(now),
            )
        )
        return self._readable(rows)

    def _readable(self, rows: Sequence[Any]) -> list[Session]:
        """Sessions of a listing; a row this replica cannot open (another wallet's key) is logged, skipped."""
        out: list[Session] = []
        for row in rows:
            try:
                out.append(self._session(row))
            except StoreError as exc:
                log.error("session %s skipped: %s", row["id"], exc)
        return out

    async def list(
        self, *, now: float, state: str | None = None, origin: str | None = None, limit: int = 1000
    ) -> list[Session]:
        clauses: list[str] = []
        params: list[Any] = []
        if state == "active":
            params.append(float(now))
            clauses.append(f"ended_at IS NULL AND expires_at > ${len(params)}")
        elif state == "expired":
            params.append(float(now))
            clauses.append(f"ended_at IS NULL AND expires_at <= ${len(params)}")
        elif state == "ended":
            clauses.append("ended_at IS NOT NULL")
        if origin is not None:
            params.append(origin)
            clauses.append(f"origin = ${len(params)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(int(limit))
        query = f"SELECT {_COLUMNS} FROM sessions {where} ORDER BY created_at DESC LIMIT ${len(params)}"  # noqa: S608
        rows = await self._run(lambda conn: conn.fetch(query, *params))
        return self._readable(rows)

    async def count_active(self, now: float) -> int:
        value = await self._run(
            lambda conn: conn.fetchval(
                "SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL AND expires_at > $1", float(now)
            )
        )
        return int(value)

    # -- other replicas' changes ---------------------------------------------------------------------

    async def watch(self, changed: SessionChanged) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        seen: dict[str, int] = {}  # session id -> newest change_seq handed over
        newest = int(await self._poll_start())

        def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            writer, _, session_id = str(payload).partition(" ")
            if writer != self.owner and session_id:
                queue.put_nowait(session_id)

        async def poll() -> None:
            nonlocal newest
            rows = await self._run(
                lambda conn: conn.fetch(
                    "SELECT id, change_seq FROM sessions WHERE change_seq > $1 AND changed_by <> $2 "
                    "ORDER BY change_seq",
                    newest - POLL_WINDOW,
                    self.owner,
                )
            )
            for row in rows:
                session_id, seq = str(row["id"]), int(row["change_seq"])
                if seen.get(session_id, -1) < seq:
                    seen[session_id] = seq
                    queue.put_nowait(session_id)
            top = await self._run(lambda conn: conn.fetchval("SELECT last_value FROM sessions_change_seq"))
            newest = max(newest, int(top or 0))
            for session_id, seq in list(seen.items()):
                if seq < newest - POLL_WINDOW:
                    del seen[session_id]

        async def deliver() -> None:
            while True:
                session_id = await queue.get()
                try:
                    await changed(session_id)
                except Exception:
                    log.exception("applying session %s changed by another replica failed", session_id)

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                conn: asyncpg.Connection | None = None
                try:
                    conn = await asyncpg.connect(
                        self.url, timeout=CONNECT_TIMEOUT, server_settings=LISTENER_SETTINGS
                    )
                    await conn.add_listener(CHANNEL, on_notify)
                    self.listening = True
                    await poll()  # what changed while nobody listened
                    last_poll = time.monotonic()
                    while not conn.is_closed():
                        await asyncio.sleep(HEARTBEAT_INTERVAL)
                        await conn.fetchval("SELECT 1", timeout=2.0)
                        if time.monotonic() - last_poll >= self.slow_poll_interval:
                            await poll()
                            last_poll = time.monotonic()
                except (StoreError, TimeoutError, ValueError, *_DRIVER_ERRORS) as exc:
                    if self.listening:
                        log.warning("session changes: listening stopped (%s); polling until it is back", exc)
                finally:
                    self.listening = False
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.terminate()
                with contextlib.suppress(StoreError):
                    await poll()
                await asyncio.sleep(self.poll_interval)
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await delivering

    async def _poll_start(self) -> int:
        try:
            value = await self._run(lambda conn: conn.fetchval("SELECT last_value FROM sessions_change_seq"))
            return int(value or 0)
        except StoreError:
            return 0

    async def close(self) -> None:
        """The pool is the ledger's: closed with it."""
