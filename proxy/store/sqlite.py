"""SQLite ledger: WAL + synchronous=FULL, so a committed row survives a crash or power loss.

One connection per store, used under a lock: safe to call from any thread. The running proxy calls
it through ``proxy/store/threaded.py`` (``AsyncLedgerStore``), on a thread of its own, so an fsync
(~1 ms) or a lock held by another process (up to the 5 s busy timeout) never stalls the event loop.
Other components (sessions) can keep their tables in the same file: ``schema_version`` is keyed by
component, and ``open_database`` / ``apply_migrations`` are reusable.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.store.base import (
    ALLOWED_TRANSITIONS,
    CHAIN_TRANSITIONS,
    RECONCILED_USED,
    ChainState,
    NewPayment,
    PaymentRecord,
    PaymentState,
    SpendTotals,
    StateTotal,
    StoreError,
    record_from_row,
    refund_problem,
    safe_text,
)

BUSY_TIMEOUT_MS = 5000
MAX_LIST_LIMIT = 10_000
LEDGER_COMPONENT = "ledger"
# Extended result codes of a failed write, truncate or sync of the database, its WAL or shared memory.
WRITE_ERRORS = (
    "SQLITE_IOERR_WRITE",
    "SQLITE_IOERR_FSYNC",
    "SQLITE_IOERR_DIR_FSYNC",
    "SQLITE_IOERR_TRUNCATE",
    "SQLITE_IOERR_SHMSIZE",
    "SQLITE_IOERR_SHMMAP",
)


@dataclass(frozen=True)
class Migration:
    version: int
    statements: tuple[str, ...]


LEDGER_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """
            CREATE TABLE payments (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                created_at    REAL    NOT NULL,
                updated_at    REAL    NOT NULL,
                state         TEXT    NOT NULL CHECK (state IN
                                ('pending','settled','rejected','unsettled','unknown','dry_run')),
                amount        TEXT    NOT NULL,  -- decimal string: uint256 does not fit SQLite INTEGER
                decimals      INTEGER NOT NULL,
                asset         TEXT    NOT NULL,
                network       TEXT    NOT NULL,
                pay_to        TEXT    NOT NULL,
                host          TEXT    NOT NULL,
                method        TEXT    NOT NULL,
                url           TEXT    NOT NULL,
                x402_version  INTEGER NOT NULL,
                scheme        TEXT    NOT NULL,
                resource      TEXT,
                nonce         TEXT,
                valid_before  INTEGER,
                payment_id    TEXT,
                payer         TEXT,
                tx_hash       TEXT,
                reason        TEXT,
                session_id    TEXT
            )
            """,
            "CREATE INDEX payments_created ON payments (created_at)",
            "CREATE INDEX payments_host_created ON payments (host, created_at)",
            "CREATE INDEX payments_state ON payments (state)",
            "CREATE INDEX payments_request ON payments (url, method, state)",
        ),
    ),
    # Money truth (docs/payments.md): `unknown` becomes `in_doubt`, a new `settled_undelivered` state, and
    # what the chain said, what was presented and what the payment was for. SQLite cannot alter a CHECK
    # constraint, so the table is rebuilt (ids kept).
    Migration(
        2,
        (
            """
            CREATE TABLE payments_v2 (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                created_at    REAL    NOT NULL,
                updated_at    REAL    NOT NULL,
                state         TEXT    NOT NULL CHECK (state IN ('pending','settled','rejected','unsettled',
                                'in_doubt','settled_undelivered','dry_run')),
                amount        TEXT    NOT NULL,
                decimals      INTEGER NOT NULL,
                asset         TEXT    NOT NULL,
                network       TEXT    NOT NULL,
                pay_to        TEXT    NOT NULL,
                host          TEXT    NOT NULL,
                method        TEXT    NOT NULL,
                url           TEXT    NOT NULL,
                x402_version  INTEGER NOT NULL,
                scheme        TEXT    NOT NULL,
                resource      TEXT,
                nonce         TEXT,
                valid_before  INTEGER,
                payment_id    TEXT,
                payer         TEXT,
                tx_hash       TEXT,
                reason        TEXT,
                session_id    TEXT,
                need          TEXT,
                delivered     INTEGER NOT NULL DEFAULT 0,
                chain_state   TEXT CHECK (chain_state IS NULL OR chain_state IN ('used','unused')),
                presentations INTEGER NOT NULL DEFAULT 0,
                last_presented_at REAL,
                presented     TEXT,
                evidence      TEXT
            )
            """,
            """
            INSERT INTO payments_v2 (id, created_at, updated_at, state, amount, decimals, asset, network,
                pay_to, host, method, url, x402_version, scheme, resource, nonce, valid_before, payment_id,
                payer, tx_hash, reason, session_id, need, delivered, chain_state, presentations)
            SELECT id, created_at, updated_at,
                CASE
                    WHEN state = 'unknown' THEN 'in_doubt'
                    WHEN state = 'settled' AND substr(COALESCE(reason, ''), 1, 41)
                        = 'reconciled from chain: authorization used' THEN 'settled_undelivered'
                    ELSE state
                END,
                amount, decimals, asset, network, pay_to, host, method, url, x402_version, scheme, resource,
                nonce, valid_before, payment_id, payer, tx_hash, reason, session_id,
                'request ' || method || ' ' || url,
                CASE WHEN state = 'settled' AND substr(COALESCE(reason, ''), 1, 41)
                    != 'reconciled from chain: authorization used' THEN 1 ELSE 0 END,
                CASE
                    WHEN substr(COALESCE(reason, ''), 1, 41) = 'reconciled from chain: authorization used'
                        THEN 'used'
                    WHEN substr(COALESCE(reason, ''), 1, 34) = 'reconciled from chain: never moved'
                        THEN 'unused'
                END,
                CASE WHEN state = 'dry_run' OR substr(COALESCE(reason, ''), 1, 11) = 'not signed:' THEN 0
                    ELSE 1 END
            FROM payments
            """,
            "DROP TABLE payments",
            "ALTER TABLE payments_v2 RENAME TO payments",
            "CREATE INDEX payments_created ON payments (created_at)",
            "CREATE INDEX payments_host_created ON payments (host, created_at)",
            "CREATE INDEX payments_state ON payments (state)",
            "CREATE INDEX payments_request ON payments (url, method, state)",
            "CREATE INDEX payments_need ON payments (need, state)",
        ),
    ),
    # Approvals (proxy/payments/approvals.py): who said yes to a payment above [policy] ask_above, and when.
    Migration(
        3,
        (
            "ALTER TABLE payments ADD COLUMN approved_by TEXT",
            "ALTER TABLE payments ADD COLUMN approved_at REAL",
        ),
    ),
    # What came back to the payer, proved on chain (a channel's refunded deposit): budgets count
    # `amount - refunded`. TEXT, as `amount` (uint256).
    Migration(4, ("ALTER TABLE payments ADD COLUMN refunded TEXT NOT NULL DEFAULT '0'",)),
)

# Rows that may forbid a new authorization for their need (find_blocking).
_BLOCKING = (
    "((state = 'in_doubt' AND delivered = 0) OR state = 'settled_undelivered' "
    "OR (state = 'settled' AND substr(COALESCE(reason, ''), 1, "
    f"{len(RECONCILED_USED)}) = '{RECONCILED_USED}'))"
)


def describe_sqlite_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """Map SQLite's error codes to a named, actionable StoreError."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreError(
            f"ledger {path} is locked by another process (waited {BUSY_TIMEOUT_MS // 1000} s); "
            "is another x402-proxy running with the same home?",
            "locked",
        )
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreError(f"disk full: cannot write ledger {path}", "full")
    if (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or "not a database" in text
        or "malformed" in text
    ):
        return StoreError(
            f"ledger {path} is corrupt or not a SQLite database; move it aside to start fresh", "corrupt"
        )
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreError(f"ledger {path} is read-only", "readonly")
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StoreError(f"cannot open ledger {path}", "io")
    if name.startswith(WRITE_ERRORS):
        # SQLite reports ENOSPC as SQLITE_FULL, but other failed writes (EFBIG from a file size limit,
        # EDQUOT, EIO) only as an I/O error; the errno itself is not exposed.
        return StoreError(
            f"cannot write ledger {path} ({name}): disk full, over a size limit or quota, or an I/O error",
            "io",
        )
    return StoreError(f"ledger {path}: {type(exc).__name__}: {exc}", "io")


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating 0600) the state database with the durability settings the ledger needs."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Never open() and close() an existing database file here: closing any descriptor of a file drops
        # every POSIX lock this process holds on it, including the SHARED lock of a SQLite connection
        # already open (the ledger's, when the session store opens the same file). Another process could
        # then take the file as unused, checkpoint and delete the WAL, and our later commits would go to
        # an unlinked WAL, invisible to others and lost on a crash. (Found by tests/test_store_faults.py.)
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)  # the ledger reveals spending habits: private to the user
    except OSError as exc:
        raise StoreError(f"cannot create ledger {path}: {exc.strerror}", "io") from None
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise describe_sqlite_error(exc, path) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        journal = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(journal).lower() != "wal":
            raise StoreError(f"ledger {path}: cannot enable WAL (got {journal})", "io")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        conn.close()
        raise describe_sqlite_error(exc, path) from None
    except StoreError:
        conn.close()
        raise
    return conn


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a damaged file at startup instead of failing on whichever page a payment reads first.

    `quick_check` reads every page (linear in the file size: milliseconds for a typical ledger) but
    skips the index-content cross-checks of `integrity_check`.
    """
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as exc:
        raise describe_sqlite_error(exc, path) from None
    if problems != ["ok"]:
        raise StoreError(
            f"ledger {path} is corrupt ({'; '.join(problems)[:300]}); move it aside to start fresh",
            "corrupt",
        )


def apply_migrations(
    conn: sqlite3.Connection, component: str, migrations: Sequence[Migration], path: Path
) -> int:
    """Bring `component`'s tables to the newest version, atomically. Returns that version."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise ValueError("migration versions must be unique and increasing")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (component,)
            ).fetchone()
            current = int(row[0]) if row else 0
            newest = versions[-1] if versions else 0
            if current > newest:
                raise StoreError(
                    f"ledger {path}: {component} schema v{current} is newer than this program (v{newest})",
                    "schema",
                )
            for migration in migrations:
                if migration.version > current:
                    for statement in migration.statements:
                        conn.execute(statement)
                    current = migration.version
            conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (?, ?) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (component, current),
            )
            conn.execute("COMMIT")
        except BaseException:
            _rollback_quietly(conn)
            raise
    except sqlite3.Error as exc:
        raise describe_sqlite_error(exc, path) from None
    return current


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open; SQLite may already have (e.g. on SQLITE_FULL)."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one worth reporting


class SqliteLedgerStore:
    """LedgerStore on SQLite. See the module docstring for durability and threading."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = open_database(self.path)
        self._conn.row_factory = sqlite3.Row
        try:
            check_integrity(self._conn, self.path)
            apply_migrations(self._conn, LEDGER_COMPONENT, LEDGER_MIGRATIONS, self.path)
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")  # synchronous=FULL: durable when this returns
                except BaseException:
                    _rollback_quietly(self._conn)
                    raise
            except sqlite3.Error as exc:
                raise describe_sqlite_error(exc, self.path) from None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise describe_sqlite_error(exc, self.path) from None

    def _now(self, now: float | None) -> float:
        return float(self._clock() if now is None else now)

    # -- writes -----------------------------------------------------------------------------------

    def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        return self._insert(new, PaymentState.PENDING, self._now(now))

    def insert_dry_run(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        return self._insert(new, PaymentState.DRY_RUN, self._now(now))

    def _insert(self, new: NewPayment, state: PaymentState, now: float) -> PaymentRecord:
        with self._transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO payments (created_at, updated_at, state, amount, decimals, asset, network, "
                "pay_to, host, method, url, x402_version, scheme, resource, nonce, valid_before, payment_id, "
                "payer, reason, session_id, need, approved_by, approved_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    now,
                    state.value,
                    str(new.amount),
                    new.decimals,
                    new.asset,
                    new.network,
                    new.pay_to,
                    new.host,
                    new.method.upper(),
                    new.url,
                    new.x402_version,
                    new.scheme,
                    new.resource,
                    new.nonce,
                    new.valid_before,
                    new.payment_id,
                    new.payer,
                    safe_text(new.reason),
                    new.session_id,
                    new.need or f"request {new.method.upper()} {new.url}",
                    new.approved_by,
                    new.approved_at,
                ),
            )
            row_id = cursor.lastrowid
            assert row_id is not None
            return self._fetch(conn, row_id)

    def set_authorization(
        self, payment_id: int, *, nonce: str, valid_before: int, now: float | None = None
    ) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            if record.state is not PaymentState.PENDING:
                raise StoreError(f"payment #{payment_id} is {record.state}, not pending", "transition")
            conn.execute(
                "UPDATE payments SET nonce = ?, valid_before = ?, updated_at = ? WHERE id = ?",
                (nonce, valid_before, self._now(now), payment_id),
            )
            return self._fetch(conn, payment_id)

    def record_refund(self, payment_id: int, refunded: int, *, now: float | None = None) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            problem = refund_problem(record, refunded)
            if problem is not None:
                raise StoreError(problem, "transition")
            if refunded > record.refunded:  # never lowered
                conn.execute(
                    "UPDATE payments SET refunded = ?, updated_at = ? WHERE id = ?",
                    (str(refunded), self._now(now), payment_id),
                )
            return self._fetch(conn, payment_id)

    def mark_settled(
        self,
        payment_id: int,
        *,
        tx_hash: str | None = None,
        payer: str | None = None,
        reason: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord:
        return self._transition(
            payment_id, PaymentState.SETTLED, now, reason=reason, tx_hash=tx_hash, payer=payer
        )

    def mark_rejected(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord:
        return self._transition(payment_id, PaymentState.REJECTED, now, reason=reason)

    def mark_unsettled(self, payment_id: int, *, reason: str, now: float | None = None) -> PaymentRecord:
        return self._transition(payment_id, PaymentState.UNSETTLED, now, reason=reason)

    def mark_in_doubt(
        self,
        payment_id: int,
        *,
        reason: str,
        tx_hash: str | None = None,
        delivered: bool = False,
        now: float | None = None,
    ) -> PaymentRecord:
        return self._transition(
            payment_id, PaymentState.IN_DOUBT, now, reason=reason, tx_hash=tx_hash, delivered=delivered
        )

    def note_in_doubt(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            if record.state is not PaymentState.IN_DOUBT:
                raise StoreError(f"payment #{payment_id} is {record.state}, not in doubt", "transition")
            conn.execute(
                "UPDATE payments SET reason = ?, tx_hash = COALESCE(?, tx_hash), updated_at = ? WHERE id = ?",
                (safe_text(reason), safe_text(tx_hash), self._now(now), payment_id),
            )
            return self._fetch(conn, payment_id)

    def mark_settled_undelivered(
        self, payment_id: int, *, reason: str, tx_hash: str | None = None, now: float | None = None
    ) -> PaymentRecord:
        return self._transition(
            payment_id, PaymentState.SETTLED_UNDELIVERED, now, reason=reason, tx_hash=tx_hash
        )

    def record_presentation(
        self, payment_id: int, *, header_name: str, header_value: str, now: float | None = None
    ) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            if record.state not in (PaymentState.PENDING, PaymentState.IN_DOUBT):
                raise StoreError(
                    f"payment #{payment_id} is {record.state}; it is not presented", "transition"
                )
            conn.execute(
                "UPDATE payments SET presented = ?, presentations = presentations + 1, "
                "last_presented_at = ?, updated_at = ? WHERE id = ?",
                (f"{header_name}\n{header_value}", self._now(now), self._now(now), payment_id),
            )
            return self._fetch(conn, payment_id)

    def presented_header(self, payment_id: int) -> tuple[str, str] | None:
        with self._reading() as conn:
            row = conn.execute("SELECT presented FROM payments WHERE id = ?", (payment_id,)).fetchone()
        if row is None or not row[0]:
            return None
        name, _, value = str(row[0]).partition("\n")
        return name, value

    def record_chain_verdict(
        self,
        payment_id: int,
        *,
        chain_state: ChainState,
        state: PaymentState,
        reason: str,
        tx_hash: str | None = None,
        now: float | None = None,
    ) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            allowed = CHAIN_TRANSITIONS.get((record.state, chain_state), frozenset())
            if record.chain_state is not None or state not in allowed:
                raise StoreError(
                    f"payment #{payment_id} is {record.state} "
                    f"(chain: {record.chain_state or 'not checked'}); "
                    f"the chain's {chain_state} cannot make it {state}",
                    "transition",
                )
            conn.execute(
                "UPDATE payments SET state = ?, chain_state = ?, reason = ?, tx_hash = COALESCE(?, tx_hash), "
                "updated_at = ? WHERE id = ?",
                (
                    state.value,
                    chain_state.value,
                    safe_text(reason),
                    safe_text(tx_hash),
                    self._now(now),
                    payment_id,
                ),
            )
            return self._fetch(conn, payment_id)

    def add_evidence(self, payment_id: int, evidence: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE payments SET evidence = ? WHERE id = ?", (evidence, payment_id))

    def _transition(
        self,
        payment_id: int,
        target: PaymentState,
        now: float | None,
        *,
        reason: str | None,
        tx_hash: str | None = None,
        payer: str | None = None,
        delivered: bool | None = None,
    ) -> PaymentRecord:
        with self._transaction() as conn:
            record = self._fetch(conn, payment_id)
            if record.state not in ALLOWED_TRANSITIONS[target]:
                raise StoreError(
                    f"payment #{payment_id} is {record.state}; cannot mark it {target}", "transition"
                )
            if delivered is None:
                delivered = target is PaymentState.SETTLED or record.delivered
            conn.execute(
                "UPDATE payments SET state = ?, updated_at = ?, reason = COALESCE(?, reason), "
                "tx_hash = COALESCE(?, tx_hash), payer = COALESCE(?, payer), delivered = ? WHERE id = ?",
                (
                    target.value,
                    self._now(now),
                    safe_text(reason),
                    safe_text(tx_hash),
                    safe_text(payer),
                    int(delivered),
                    payment_id,
                ),
            )
            return self._fetch(conn, payment_id)

    def attach_session(self, payment_id: int, session_id: str) -> None:
        """Link a payment to the session it opened or renewed (the session exists only after payment)."""
        with self._transaction() as conn:
            conn.execute("UPDATE payments SET session_id = ? WHERE id = ?", (session_id, payment_id))

    def recover_on_startup(self, *, now: float | None = None) -> Sequence[PaymentRecord]:
        with self._transaction() as conn:
            ids = [row["id"] for row in conn.execute("SELECT id FROM payments WHERE state = 'pending'")]
            conn.execute(
                "UPDATE payments SET state = 'in_doubt', updated_at = ?, "
                "reason = 'the proxy stopped before the outcome was recorded' WHERE state = 'pending'",
                (self._now(now),),
            )
            return [self._fetch(conn, row_id) for row_id in ids]

    # -- reads ------------------------------------------------------------------------------------

    def get(self, payment_id: int) -> PaymentRecord | None:
        with self._reading() as conn:
            row = conn.execute("SELECT * FROM payments WHERE id = ?", (payment_id,)).fetchone()
            return record_from_row(row) if row else None

    def list(
        self,
        state: PaymentState | None = None,
        host: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> Sequence[PaymentRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(PaymentState(state).value)
        if host is not None:
            clauses.append("host = ?")
            params.append(host)
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(since)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(1, min(int(limit), MAX_LIST_LIMIT)))
        with self._reading() as conn:
            # `where` is built only from the constant fragments above; every value is a bound parameter.
            query = f"SELECT * FROM payments {where} ORDER BY id DESC LIMIT ?"  # noqa: S608
            rows = conn.execute(query, params)
            return [record_from_row(row) for row in rows]

    def spent_since(
        self,
        since: float,
        host: str | None = None,
        *,
        now: float | None = None,
        chain_checked: frozenset[str] = frozenset(),
    ) -> SpendTotals:
        still_valid_at = self._now(now)
        networks = sorted(chain_checked)
        marks = ", ".join("?" for _ in networks) or "NULL"
        # `marks` is a run of "?" placeholders: every value is a bound parameter.
        sql = (
            "SELECT network, asset, decimals, amount, refunded FROM payments WHERE created_at >= ? AND ("  # noqa: S608
            # Money that moved or may have: counted for its whole window, whatever the server answered.
            "state IN ('pending', 'settled', 'in_doubt', 'settled_undelivered') "
            # A refusal is the server's word, not the chain's: a signed authorization sent at least once
            # may still settle (a dishonest server settles it and answers 402 to be paid again). It counts
            # until the chain proved it unused, or, where the chain cannot be asked, until it expires.
            "OR (state IN ('rejected', 'unsettled') AND COALESCE(chain_state, '') != 'unused' AND ("
            "(state = 'unsettled' AND valid_before IS NULL) OR valid_before > ? "
            f"OR (chain_state IS NULL AND presentations > 0 AND network IN ({marks})))))"
        )
        params: list[Any] = [since, still_valid_at, *networks]
        if host is not None:
            sql += " AND host = ?"
            params.append(host)
        totals: dict[tuple[str, str, int], int] = {}
        count = 0
        with self._reading() as conn:
            for row in conn.execute(sql, params):
                key = (row["network"], str(row["asset"]).lower(), int(row["decimals"]))
                totals[key] = totals.get(key, 0) + int(row["amount"]) - int(row["refunded"])
                count += 1
        return SpendTotals(totals, count)

    def hosts_since(self, since: float) -> Sequence[str]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT DISTINCT host FROM payments WHERE created_at >= ? ORDER BY host", (since,)
            )
            return [str(row[0]) for row in rows]

    def find_in_doubt(self, method: str, url: str, *, still_valid_at: float) -> PaymentRecord | None:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT * FROM payments WHERE url = ? AND method = ? "
                "AND ((state = 'in_doubt' AND delivered = 0) "
                "OR (state = 'settled' AND substr(reason, 1, ?) = ?)) "
                "AND valid_before IS NOT NULL AND valid_before > ? ORDER BY id DESC LIMIT 1",
                (url, method.upper(), len(RECONCILED_USED), RECONCILED_USED, still_valid_at),
            ).fetchone()
            return record_from_row(row) if row else None

    def find_blocking(self, method: str, url: str, need: str | None) -> Sequence[PaymentRecord]:
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT * FROM payments WHERE {_BLOCKING} AND ((url = ? AND method = ?) OR need = ?) "  # noqa: S608
                "ORDER BY id DESC LIMIT 20",
                (url, method.upper(), need or ""),
            )
            return [record_from_row(row) for row in rows]

    def list_in_doubt(self) -> Sequence[PaymentRecord]:
        # Not `list()`: that is newest first and capped.
        with self._reading() as conn:
            rows = conn.execute("SELECT * FROM payments WHERE state = 'in_doubt' ORDER BY id")
            return [record_from_row(row) for row in rows]

    def list_unresolved(self, limit: int = 500) -> Sequence[PaymentRecord]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT * FROM payments WHERE chain_state IS NULL AND nonce IS NOT NULL "
                "AND state IN ('settled', 'in_doubt', 'settled_undelivered', 'rejected', 'unsettled') "
                "AND (presentations > 0 OR state = 'in_doubt') ORDER BY id DESC LIMIT ?",
                (max(1, int(limit)),),
            )
            return [record_from_row(row) for row in rows]

    def state_totals(self) -> Sequence[StateTotal]:
        totals: dict[tuple[str, str, str, int], list[int]] = {}
        with self._reading() as conn:
            rows = conn.execute("SELECT state, network, asset, decimals, amount FROM payments")
            for row in rows:
                key = (str(row[0]), str(row[1]), str(row[2]).lower(), int(row[3]))
                entry = totals.setdefault(key, [0, 0])
                entry[0] += 1
                entry[1] += int(row[4])
        return [StateTotal(*key, count, amount) for key, (count, amount) in sorted(totals.items())]

    def _fetch(self, conn: sqlite3.Connection, payment_id: int) -> PaymentRecord:
        row = conn.execute("SELECT * FROM payments WHERE id = ?", (payment_id,)).fetchone()
        if row is None:
            raise StoreError(f"payment #{payment_id} does not exist", "transition")
        return record_from_row(row)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteLedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
