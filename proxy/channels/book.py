"""The proxy's record of its channels: one row per channel, written before anything leaves.

`ChannelBook` is a table of ours in `<home>/channels.db` (SQLite, WAL; what is durable when, below).
A row holds what the proxy itself knows: the channel id and salt, the URL and requirements it was
opened for, the deposit (and its ledger row), the highest cumulative voucher *signed* (persisted before
that voucher is sent), the cumulative amount the seller *charged* (from its answers), what a refund
*claimed* and *refunded*, and the state:

    opening   deposit signed (or about to be); its answer not seen yet
    open      deposit confirmed; vouchers ride on it
    closing   to be refunded (session over, channel exhausted, or recovered without a session)
    refunded  refund confirmed; nothing left in the channel for us
    void      nothing was deposited (the deposit never settled)

`BookStorage(book)` is the SDK's `ClientChannelStorage` over the same table (the SDK's own context
kept as JSON in the row), so the SDK's view and ours live in one place and survive a restart.

Durability: the deposit, its ledger link and every state change are committed with synchronous=FULL
(on disk when the call returns). A voucher's `signed` amount is committed before the voucher leaves,
with synchronous=NORMAL (WAL: it survives the process being killed at any point, and costs no fsync per
request); the SDK's context and `charged` after an answer are committed with synchronous=NORMAL too,
before the answer goes back to the client. Both are the holder's per-request writes, awaited on the
event loop and committed on it, one transaction per pass of the loop (`GroupCommit`: `signed`,
`answered` + `write_answer`); the answer's context is processed on the loop and kept in memory until
committed.
A process killed between a voucher and its answer restarts with the context one answer behind: the
next voucher is below the seller's view and the corrective 402 resyncs it within what `signed` says.
A power loss (or an OS crash) may also roll back the last few `signed` amounts: the seller's view is
then above what our table says we signed, the corrective 402 is refused and the channel is retired and
refunded; the refund's claim is the seller's highest voucher, which we did sign, within the deposit (so
nothing moves that the policy did not allow, and the chain's claim and refund are what the row records).
The contexts are kept in memory (this process is the table's only writer), so a voucher reads no row.

PostgreSQL (a fleet's shared store) is not implemented: `[channels]` refuses to start with a
`[store] url` (a channel must be held by one process: its vouchers are serialized by a local lock).
"""

# ruff: noqa: S608  (column lists and placeholders are ours; every value is a bound parameter)

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x402.mechanisms.evm.batch_settlement.client import BatchSettlementClientContext

log = logging.getLogger("x402_proxy.channels")

SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id   TEXT PRIMARY KEY,
    session_id   TEXT,
    salt         TEXT NOT NULL,
    url          TEXT NOT NULL,
    requirements TEXT NOT NULL,
    resource     TEXT,
    network      TEXT NOT NULL,
    asset        TEXT NOT NULL,
    decimals     INTEGER NOT NULL,
    price        INTEGER NOT NULL,
    deposit      INTEGER NOT NULL,
    ledger_id    INTEGER,
    signed       INTEGER NOT NULL DEFAULT 0,
    charged      INTEGER NOT NULL DEFAULT 0,
    claimed      INTEGER,
    refunded     INTEGER,
    refund_tx    TEXT,
    state        TEXT NOT NULL,
    detail       TEXT,
    context      TEXT,
    opened_at    REAL NOT NULL,
    ended_at     REAL
);
CREATE INDEX IF NOT EXISTS channels_session ON channels(session_id);
CREATE INDEX IF NOT EXISTS channels_state ON channels(state);
"""

STATES = ("opening", "open", "closing", "refunded", "void")


@dataclass
class Channel:
    channel_id: str
    session_id: str | None
    salt: str
    url: str
    requirements: dict[str, Any]
    resource: Any
    network: str
    asset: str
    decimals: int
    price: int
    deposit: int
    ledger_id: int | None
    signed: int
    charged: int
    claimed: int | None
    refunded: int | None
    refund_tx: str | None
    state: str
    detail: str | None
    opened_at: float
    ended_at: float | None

    @property
    def net_spend(self) -> int | None:
        """What the channel cost the wallet: deposit - refunded, once refunded (None before)."""
        return None if self.refunded is None else self.deposit - self.refunded

    def describe(self) -> dict[str, Any]:
        """The channel for the admin API (amounts as atomic-unit strings, like the ledger)."""
        return {
            "channel_id": self.channel_id,
            "state": self.state,
            "network": self.network,
            "asset": self.asset,
            "decimals": self.decimals,
            "price": str(self.price),
            "deposit": str(self.deposit),
            "signed": str(self.signed),
            "charged": str(self.charged),
            "claimed": None if self.claimed is None else str(self.claimed),
            "refunded": None if self.refunded is None else str(self.refunded),
            "net_spend": None if self.net_spend is None else str(self.net_spend),
            "refund_tx": self.refund_tx,
            "deposit_payment_id": self.ledger_id,
            "detail": self.detail,
        }


_COLUMNS = (
    "channel_id, session_id, salt, url, requirements, resource, network, asset, decimals, price, deposit, "
    "ledger_id, signed, charged, claimed, refunded, refund_tx, state, detail, opened_at, ended_at"
)


def _row(row: sqlite3.Row) -> Channel:
    data = dict(row)
    data["requirements"] = json.loads(data["requirements"])
    data["resource"] = json.loads(data["resource"]) if data["resource"] else None
    return Channel(**data)


# A write: its statements on the loop's connection (inside the batch's transaction); what it returns,
# if anything, runs once that transaction is committed.
_Write = Callable[[sqlite3.Connection], Callable[[], None] | None]
_Job = tuple[_Write, "asyncio.Future[None]"]


class GroupCommit:
    """The per-request writes of open channels (a voucher's `signed`, an answer's context), committed on
    the event loop itself: every write submitted during one pass of the loop is committed in one
    transaction by a callback at the end of that pass. WAL with synchronous=NORMAL: a commit is a
    write() into the WAL, no fsync (~11 us alone, ~2 us a write in a batch of 16, on this project's
    machines); handing the writes to a thread cost the loop more than the commits (the thread's own
    CPU, a wake-up per batch each way: docs/benchmarks.md, channels). Checkpoints fsync: this
    connection's auto-checkpoint is off, and every CHECKPOINT_EVERY commits a passive checkpoint runs on
    a thread of its own (it waits for no writer and no writer waits for it), then the loop copies the
    few frames written meanwhile (`_checkpoint_off_loop` says why). The one wait left:
    another connection's write transaction (a channel's state change, FULL, on a thread) holds the
    loop's BEGIN for that commit's fsync; those are per channel, not per request.
    A batch that fails is retried write by write, so one bad write fails only its own request."""

    CHECKPOINT_EVERY = 1000

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._pending: list[_Job] = []
        self._closed = False
        self._commits = 0
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="channel-book-checkpoint")
        self._checkpointing: Future[None] | None = None

    def submit(self, write: _Write) -> asyncio.Future[None]:
        """Queue `write` for the end of this pass of the loop; the future is done once it is committed
        (or carries its error)."""
        if self._closed:
            raise RuntimeError("the channel book is closed")
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)
        done = loop.create_future()
        self._pending.append((write, done))
        return done

    def close(self) -> None:
        """Commit what is queued, then close (on the loop's thread, or once no loop runs)."""
        self._closed = True
        if self._pending:
            self._flush()
        self._checkpointer.shutdown(wait=True)
        if self._db is not None:
            self._db.close()
            self._db = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # they fsync: _checkpoint_off_loop
            self._db = db
        return self._db

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        errors = self._commit(self._connection(), [write for write, _ in batch])
        for (_, done), error in zip(batch, errors, strict=True):
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
        self._commits += 1
        checkpointing = self._checkpointing
        if checkpointing is not None and checkpointing.done():
            self._checkpointing = None
            self._checkpoint(self._connection())
        elif checkpointing is None and self._commits >= self.CHECKPOINT_EVERY:
            self._commits = 0
            self._checkpointing = self._checkpointer.submit(self._checkpoint_off_loop)

    def _checkpoint_off_loop(self) -> None:
        """On the checkpoint thread: move the WAL's frames into the database file (PASSIVE), fsyncs
        included. Writes go on meanwhile, so the WAL is never all copied when this ends and would never
        restart (it would grow without bound under steady load): `_flush` then checkpoints the few
        frames written since on the loop (~0.2 ms against ~1-3 ms for the lot), and the next write
        starts the WAL from its beginning."""
        db = sqlite3.connect(str(self._path), isolation_level=None)
        try:
            self._checkpoint(db)
        finally:
            db.close()

    @staticmethod
    def _checkpoint(db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("channel book: checkpoint failed (retried after the next commits): %s", exc)

    @staticmethod
    def _commit(db: sqlite3.Connection, writes: list[_Write]) -> list[BaseException | None]:
        def one_transaction(group: list[_Write]) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                after = [write(db) for write in group]
                db.execute("COMMIT")
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled it back itself
                raise
            for committed in after:
                if committed is not None:
                    committed()

        try:
            one_transaction(writes)
            return [None] * len(writes)
        except Exception as exc:
            if len(writes) == 1:
                return [exc]
        errors: list[BaseException | None] = []
        for write in writes:
            try:
                one_transaction([write])
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors


class ChannelBook:
    """Blocking, thread-safe; every write committed before it returns, but an answer's context
    (`answered`), which is committed with the next voucher or by `flush`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # The after-answer writes (see the module docstring): same file, no fsync per commit.
        self._soft = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._soft.execute("PRAGMA synchronous=NORMAL")
        self._contexts: dict[str, BatchSettlementClientContext | None] = {}  # lower-case id -> context
        # Contexts of answers not committed yet (lower-case id -> context): written with the next voucher.
        self._unwritten: dict[str, BatchSettlementClientContext] = {}
        self._cache_lock = threading.Lock()  # never held across I/O: a read waits for no fsync
        self._known: set[str] = set()  # channel ids with a row
        self._group = GroupCommit(path)
        try:
            path.chmod(0o600)
        except OSError:
            pass

    def close(self) -> None:
        self._group.close()
        self.flush()
        with self._lock:
            self._soft.close()
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Channel]:
        """Rows as channels, `charged` as of the latest answer (one not committed yet included)."""
        found = [_row(r) for r in self._exec(sql, args)]
        with self._cache_lock:
            for channel in found:
                unwritten = self._unwritten.get(channel.channel_id)
                if unwritten is not None and unwritten.charged_cumulative_amount is not None:
                    channel.charged = int(unwritten.charged_cumulative_amount)
        return found

    def insert(
        self,
        *,
        channel_id: str,
        salt: str,
        url: str,
        requirements: dict[str, Any],
        resource: Any,
        network: str,
        asset: str,
        decimals: int,
        price: int,
        deposit: int,
        ledger_id: int,
        now: float | None = None,
    ) -> Channel:
        self._exec(
            "INSERT INTO channels (channel_id, salt, url, requirements, resource, network, asset, decimals, "
            "price, deposit, ledger_id, state, opened_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,'opening',?)",
            (
                channel_id.lower(),
                salt,
                url,
                json.dumps(requirements),
                json.dumps(resource) if resource is not None else None,
                network,
                asset,
                decimals,
                price,
                deposit,
                ledger_id,
                time.time() if now is None else now,
            ),
        )
        found = self.get(channel_id)
        assert found is not None
        return found

    def has(self, channel_id: str) -> bool:
        """Whether the table has a row for this channel (remembered once seen)."""
        key = channel_id.lower()
        if key in self._known:
            return True
        if self._exec("SELECT 1 FROM channels WHERE channel_id = ?", (key,)):
            self._known.add(key)
            return True
        return False

    def get(self, channel_id: str) -> Channel | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM channels WHERE channel_id = ?", (channel_id.lower(),))
        return rows[0] if rows else None

    def for_session(self, session_id: str) -> list[Channel]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM channels WHERE session_id = ? ORDER BY opened_at", (session_id,)
        )

    def in_state(self, *states: str) -> list[Channel]:
        marks = ",".join("?" * len(states))
        return self._rows(
            f"SELECT {_COLUMNS} FROM channels WHERE state IN ({marks}) ORDER BY opened_at", states
        )

    def all(self, limit: int = 1000) -> list[Channel]:
        return self._rows(f"SELECT {_COLUMNS} FROM channels ORDER BY opened_at DESC LIMIT ?", (limit,))

    def signing(self, channel_id: str, cumulative: int, *, durable: bool = False) -> None:
        """Before a voucher leaves: the highest cumulative amount we ever signed (never lowered), and the
        context of the answer before it if not written yet, in one commit. NORMAL (see the module's
        docstring) unless `durable` (the deposit's first voucher: FULL, like the deposit)."""
        key = channel_id.lower()
        with self._cache_lock:
            unwritten = self._unwritten.pop(key, None)
        with self._lock:
            db = self._db if durable else self._soft
            db.execute("BEGIN IMMEDIATE")
            try:
                if unwritten is not None:
                    self._write_context(db, key, unwritten)
                db.execute(
                    "UPDATE channels SET signed = MAX(signed, ?) WHERE channel_id = ?", (cumulative, key)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                if unwritten is not None:
                    with self._cache_lock:
                        self._unwritten.setdefault(key, unwritten)
                raise

    def _context_write(self, db: sqlite3.Connection, key: str) -> Callable[[], None] | None:
        """Write the context `answered` kept for `key`, if any; forget it once committed (if no newer
        answer replaced it meanwhile)."""
        with self._cache_lock:
            unwritten = self._unwritten.get(key)
        if unwritten is None:
            return None
        self._write_context(db, key, unwritten)

        def committed() -> None:
            with self._cache_lock:
                if self._unwritten.get(key) is unwritten:
                    del self._unwritten[key]

        return committed

    async def signed(self, channel_id: str, cumulative: int) -> None:
        """`signing` (NORMAL) from the event loop, committed with this pass's writes (`GroupCommit`)."""
        key = channel_id.lower()

        def write(db: sqlite3.Connection) -> Callable[[], None] | None:
            committed = self._context_write(db, key)
            db.execute("UPDATE channels SET signed = MAX(signed, ?) WHERE channel_id = ?", (cumulative, key))
            return committed

        await self._group.submit(write)

    async def write_answer(self, channel_id: str) -> None:
        """Commit the context `answered` kept for this channel (NORMAL) with this pass's writes; nothing
        to do if none is kept. A failed commit keeps it in memory for the next voucher's commit."""
        key = channel_id.lower()
        with self._cache_lock:
            if key not in self._unwritten:
                return
        await self._group.submit(lambda db: self._context_write(db, key))

    def cached_context(self, channel_id: str) -> tuple[bool, BatchSettlementClientContext | None]:
        """(known, a copy of the context) from memory only; known=False: `context` would read the row."""
        key = channel_id.lower()
        with self._cache_lock:
            if key not in self._contexts:
                return False, None
            cached = self._contexts[key]
        return True, None if cached is None else cached.copy()

    def update(self, channel_id: str, **fields: Any) -> None:
        allowed = {"session_id", "charged", "claimed", "refunded", "refund_tx", "state", "detail", "ended_at"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._exec(f"UPDATE channels SET {sets} WHERE channel_id = ?", (*fields.values(), channel_id.lower()))

    # -- the SDK's context (ClientChannelStorage) ---------------------------------------------------

    def context(self, channel_id: str) -> BatchSettlementClientContext | None:
        """The SDK's context for a channel of ours (a copy: the caller may change it), from memory once
        read."""
        key = channel_id.lower()
        with self._cache_lock:
            if key in self._contexts:
                cached = self._contexts[key]
                return None if cached is None else cached.copy()
        rows = self._exec("SELECT context FROM channels WHERE channel_id = ?", (key,))
        if not rows:
            return None  # not ours (nothing remembered: a row may be inserted later)
        text = rows[0]["context"]
        found = BatchSettlementClientContext.from_dict(json.loads(text)) if text else None
        with self._cache_lock:
            self._contexts.setdefault(key, found)
            cached = self._contexts[key]
        return None if cached is None else cached.copy()

    def set_context(self, channel_id: str, context: BatchSettlementClientContext | None) -> None:
        """The SDK's context (its deposit, a corrective 402's resync, a refund), and `charged` with it:
        one NORMAL commit."""
        key = channel_id.lower()
        with self._cache_lock:
            self._contexts[key] = None if context is None else context.copy()
            self._unwritten.pop(key, None)  # this one is newer
        with self._lock:
            self._write_context(self._soft, key, context)

    def answered(self, channel_id: str, context: BatchSettlementClientContext) -> None:
        """The SDK's context after a voucher's answer: in memory now, committed with the next voucher
        (`signing`) or by `flush`. No I/O: called on the event loop."""
        key = channel_id.lower()
        with self._cache_lock:
            self._contexts[key] = context.copy()
            self._unwritten[key] = context.copy()

    def flush(self) -> None:
        """Commit the contexts of answers not written yet (NORMAL)."""
        with self._cache_lock:
            unwritten, self._unwritten = self._unwritten, {}
        if not unwritten:
            return
        with self._lock:
            for key, context in unwritten.items():
                self._write_context(self._soft, key, context)

    @staticmethod
    def _write_context(
        db: sqlite3.Connection, key: str, context: BatchSettlementClientContext | None
    ) -> None:
        text = None if context is None else json.dumps(context.to_dict())
        charged = None if context is None else context.charged_cumulative_amount
        if charged is not None:
            db.execute(
                "UPDATE channels SET context = ?, charged = ? WHERE channel_id = ?", (text, int(charged), key)
            )
        else:
            db.execute("UPDATE channels SET context = ? WHERE channel_id = ?", (text, key))


class BookStorage:
    """The SDK's `ClientChannelStorage` over our table. Keys are lower-case channel ids; a context for
    a channel we have no row for (the SDK's recovery probing a salt we never used) is kept in memory.
    `answers=True`: the storage a voucher's answer is processed with, on the event loop: its context is
    kept in memory and committed with the next voucher (`ChannelBook.answered`)."""

    def __init__(self, book: ChannelBook, *, answers: bool = False) -> None:
        self._book = book
        self._answers = answers
        self._loose: dict[str, BatchSettlementClientContext] = {}

    def get(self, key: str) -> BatchSettlementClientContext | None:
        found = self._book.context(key)
        return found if found is not None else self._loose.get(key.lower())

    def set(self, key: str, context: BatchSettlementClientContext) -> None:
        if self._answers:
            self._book.answered(key, context)
            return
        if not self._book.has(key):
            self._loose[key.lower()] = context.copy()
            return
        self._book.set_context(key, context)

    def delete(self, key: str) -> None:
        self._loose.pop(key.lower(), None)
        if self._book.has(key):
            self._book.set_context(key, None)
