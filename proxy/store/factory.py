"""Open the configured ledger: the embedded SQLite file (default) or PostgreSQL (`[store] url`).

`open_ledger` is what the running proxy calls; `schema_status` and `migrate` back `x402-proxy store
check|migrate`. Every failure is a StoreError whose message names the store without its password.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.store.base import StoreError
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
