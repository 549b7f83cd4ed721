"""Open the configured ledger: the embedded SQLite file (default) or PostgreSQL (`[store] url`).

`open_ledger` is what the running proxy calls; `schema_status` and `migrate` back `x402-proxy store
check|migrate`. Every failure is a StoreError whose message names the store without its password.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.store.base import StoreError
from proxy.store.refusal_store import AsyncRefusalStore, SqliteRefusalStore, ThreadedRefusalStore
from proxy.store.session_store import AsyncSessionStore, SqliteSessionStore
from proxy.store.settings import StoreSettings, redact_url
from proxy.store.sqlite import (
    LEDGER_COMPONENT,
    LEDGER_MIGRATIONS,
    SqliteLedgerStore,
    describe_sqlite_error,
)

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.store.base import AsyncLedgerStore

STATE_DB = "state.db"

Closer = Callable[[], Awaitable[None]]


def sqlite_path(home: Path) -> Path:
    return Path(home) / STATE_DB


def describe_store(settings: StoreSettings, home: Path) -> str:
    """How messages name the store: its redacted URL, or the SQLite file."""
    return redact_url(settings.url) if settings.is_postgres else f"sqlite {sqlite_path(home)}"


@dataclass
class Stores:
    """Everything the running proxy keeps: the ledger, the sessions (None when disabled), the refusals."""

    ledger: AsyncLedgerStore
    sessions: SqliteSessionStore | AsyncSessionStore | None
    refusals: AsyncRefusalStore
    shown: str  # how messages name the store (no password)
    close_ledger: Closer

    # Set once a SessionManager took the sessions store: the manager closes it (it flushes first).
    sessions_handed_over: bool = False
    closed: bool = False

    async def close(self) -> None:
        """Sessions (unless handed over), refusals, then the ledger, whose pool the PostgreSQL side tables
        share. Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.sessions is not None and not self.sessions_handed_over:
                result = self.sessions.close()
                if inspect.isawaitable(result):
                    await result
            await self.refusals.close()
        finally:
            await self.close_ledger()


async def open_stores(
    config: Config, home: Path, *, sessions: bool, session_secret: bytes | None = None
) -> Stores:
    """Open the ledger (migrations applied, under an advisory lock on PostgreSQL so replicas starting
    together apply them once), then the session and refusal tables beside it. `session_secret` (the
    wallet's key) seals the session documents in PostgreSQL (proxy/store/session_crypto.py)."""
    ledger, close_ledger = await open_ledger(config, home)
    shown = describe_store(config.store, home)
    try:
        if config.store.is_postgres:
            from proxy.store.postgres import PostgresLedgerStore
            from proxy.store.postgres_refusals import PostgresRefusalStore
            from proxy.store.postgres_sessions import PostgresSessionStore
            from proxy.store.session_crypto import SessionCipher

            assert isinstance(ledger, PostgresLedgerStore)
            cipher = SessionCipher.from_secret(session_secret) if session_secret else None
            session_store: SqliteSessionStore | AsyncSessionStore | None = (
                await PostgresSessionStore.open(ledger, cipher) if sessions else None
            )
            refusals: AsyncRefusalStore = await PostgresRefusalStore.open(ledger)
        else:
            path = sqlite_path(home)
            # The blocking session store, written through as before; the refusals' reads on a thread.
            session_store = SqliteSessionStore(path) if sessions else None
            refusals = ThreadedRefusalStore(SqliteRefusalStore(path))
    except BaseException:
        await close_ledger()
        raise
    return Stores(ledger, session_store, refusals, shown, close_ledger)


async def open_ledger(config: Config, home: Path) -> tuple[AsyncLedgerStore, Closer]:
    """The configured ledger, migrated and ready, and the coroutine function that closes it."""
    if config.store.is_postgres:
        from proxy.store.postgres import PostgresLedgerStore

        store = await PostgresLedgerStore.open(config.store.url)
        return store, store.close
    from proxy.store.threaded import ThreadedLedgerStore

    # Opening checks the file and applies migrations: off the event loop, like every later call.
    sync = await asyncio.to_thread(SqliteLedgerStore, sqlite_path(home))
    threaded = ThreadedLedgerStore(sync)
    return threaded, threaded.close


@dataclass(frozen=True)
class SchemaStatus:
    store: str  # the store as messages name it (no password)
    current: int  # applied version (0: nothing yet)
    program: int  # the version this program applies
    exists: bool = True  # False: a SQLite file not created yet

    @property
    def pending(self) -> bool:
        return self.current < self.program


def _sqlite_version(path: Path) -> int | None:
    """The ledger's applied version in the SQLite file, read-only; None when the file does not exist."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if table is None:
                return 0
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (LEDGER_COMPONENT,)
            ).fetchone()
            return 0 if row is None else int(row[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise describe_sqlite_error(exc, path) from None


async def schema_status(settings: StoreSettings, home: Path) -> SchemaStatus:
    """The ledger schema's applied version, changing nothing (no table, no file is created)."""
    shown = describe_store(settings, home)
    if settings.is_postgres:
        from proxy.store.postgres import ledger_schema_status

        current, program = await ledger_schema_status(settings.url)
        return SchemaStatus(shown, current, program)
    path = sqlite_path(home)
    version = await asyncio.to_thread(_sqlite_version, path)
    newest = LEDGER_MIGRATIONS[-1].version
    if version is not None and version > newest:
        raise StoreError(
            f"ledger {path}: {LEDGER_COMPONENT} schema v{version} is newer than this program (v{newest})",
            "schema",
        )
    return SchemaStatus(shown, version or 0, newest, exists=version is not None)


async def migrate(settings: StoreSettings, home: Path) -> tuple[SchemaStatus, int]:
    """Apply pending migrations (the proxy also does at start); returns the status after and the version
    before."""
    shown = describe_store(settings, home)
    if settings.is_postgres:
        from proxy.store.postgres import migrate_ledger

        before, after = await migrate_ledger(settings.url)
        return SchemaStatus(shown, after, after), before
    path = sqlite_path(home)
    found = await asyncio.to_thread(_sqlite_version, path)
    before_sqlite = found or 0

    def apply() -> None:
        SqliteLedgerStore(path).close()

    await asyncio.to_thread(apply)
    after = LEDGER_MIGRATIONS[-1].version
    return SchemaStatus(shown, after, after), before_sqlite
