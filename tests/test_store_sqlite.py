import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.store.base import NewPayment, PaymentState, StoreError
from proxy.store.sqlite import (
    LEDGER_COMPONENT,
    LEDGER_MIGRATIONS,
    Migration,
    SqliteLedgerStore,
    apply_migrations,
    open_database,
)

NOW = 1_800_000_000.0
REPO = Path(__file__).resolve().parents[1]


def new_payment(**overrides: object) -> NewPayment:
    base = NewPayment(
        amount=10_000,
        decimals=6,
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        network="eip155:84532",
        pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        host="shop.test",
        method="get",
        url="http://shop.test/paid",
        x402_version=2,
        scheme="exact",
        resource="http://shop.test/paid",
        nonce="0x" + "ab" * 32,
        valid_before=int(NOW) + 360,
        payment_id="pay_0123456789abcdef",
        payer="0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> SqliteLedgerStore:
    ledger = SqliteLedgerStore(tmp_path / "home" / "state.db")
    yield ledger  # type: ignore[misc]
    ledger.close()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_files_are_private_and_wal_durable(store: SqliteLedgerStore) -> None:
    store.insert_pending(new_payment(), now=NOW)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        sidecar = store.path.with_name(store.path.name + suffix)
        assert sidecar.exists()
        assert stat.S_IMODE(sidecar.stat().st_mode) & 0o077 == 0, suffix
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_existing_world_readable_db_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    os.chmod(path, 0o644)
    SqliteLedgerStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_insert_pending_is_visible_to_a_second_connection_immediately(store: SqliteLedgerStore) -> None:
    record = store.insert_pending(new_payment(), now=NOW)
    other = sqlite3.connect(store.path)
    state, amount = other.execute("SELECT state, amount FROM payments WHERE id = ?", (record.id,)).fetchone()
    other.close()
    assert (state, amount) == ("pending", "10000")


def test_pending_row_survives_a_killed_process_and_recovers_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    # The child inserts, prints the id, then dies without closing anything (no atexit, no flush).
    result = run_python(
        f"""
        import os, sys
        from proxy.store.sqlite import SqliteLedgerStore
        from proxy.store.base import NewPayment
        store = SqliteLedgerStore({str(path)!r})
        record = store.insert_pending(NewPayment(
            amount=10000, decimals=6, asset="0xa", network="eip155:84532", pay_to="0xb", host="h",
            method="GET", url="http://h/x", x402_version=2, scheme="exact", valid_before=2000000000))
        sys.stdout.write(str(record.id)); sys.stdout.flush()
        os._exit(9)
        """
    )
    assert result.returncode == 9, result.stderr
    row_id = int(result.stdout)
    store = SqliteLedgerStore(path)
    try:
        record = store.get(row_id)
        assert record is not None and record.state is PaymentState.PENDING
        recovered = store.recover_on_startup(now=NOW)
        assert [r.id for r in recovered] == [row_id]
        after = store.get(row_id)
        assert after is not None and after.state is PaymentState.IN_DOUBT
        assert after.reason and "stopped" in after.reason
        assert store.recover_on_startup(now=NOW) == []
    finally:
        store.close()


def test_record_fields_roundtrip(store: SqliteLedgerStore) -> None:
    huge = 2**256 - 1  # uint256 does not fit SQLite INTEGER; stored as text
    record = store.insert_pending(new_payment(amount=huge, session_id="s-1"), now=NOW)
    got = store.get(record.id)
    assert got == record
    assert got.amount == huge and got.method == "GET" and got.session_id == "s-1"
    assert got.created_at == got.updated_at == NOW
    assert store.get(999_999) is None


def test_state_transitions(store: SqliteLedgerStore) -> None:
    a = store.insert_pending(new_payment(), now=NOW)
    settled = store.mark_settled(a.id, tx_hash="0x" + "cd" * 32, payer="0xpayer", now=NOW + 1)
    assert settled.state is PaymentState.SETTLED and settled.tx_hash == "0x" + "cd" * 32
    assert settled.updated_at == NOW + 1 and settled.payer == "0xpayer"
    with pytest.raises(StoreError) as info:
        store.mark_rejected(a.id, reason="late")
    assert info.value.kind == "transition"

    b = store.insert_pending(new_payment(), now=NOW)
    assert store.mark_in_doubt(b.id, reason="timeout").state is PaymentState.IN_DOUBT
    with pytest.raises(StoreError):
        store.mark_in_doubt(b.id, reason="again")
    # an unknown payment can be resolved as settled later (receipt, on-chain check)
    assert store.mark_settled(b.id, reason="found on chain").state is PaymentState.SETTLED

    c = store.insert_pending(new_payment(), now=NOW)
    assert store.mark_rejected(c.id, reason="invalid signature").reason == "invalid signature"
    d = store.insert_pending(new_payment(), now=NOW)
    assert store.mark_unsettled(d.id, reason="HTTP 500").state is PaymentState.UNSETTLED
    with pytest.raises(StoreError):
        store.mark_settled(999_999)


def test_set_authorization_only_on_pending(store: SqliteLedgerStore) -> None:
    record = store.insert_pending(new_payment(nonce=None, valid_before=None), now=NOW)
    updated = store.set_authorization(record.id, nonce="12345", valid_before=int(NOW) + 400)
    assert updated.nonce == "12345" and updated.valid_before == int(NOW) + 400
    store.mark_rejected(record.id, reason="x")
    with pytest.raises(StoreError):
        store.set_authorization(record.id, nonce="1", valid_before=1)


def test_spent_since_counts_money_that_may_move(store: SqliteLedgerStore) -> None:
    pending = store.insert_pending(new_payment(amount=1), now=NOW)
    settled = store.insert_pending(new_payment(amount=10), now=NOW)
    store.mark_settled(settled.id)
    unknown = store.insert_pending(new_payment(amount=100), now=NOW)
    store.mark_in_doubt(unknown.id, reason="timeout")
    rejected = store.insert_pending(new_payment(amount=1_000), now=NOW)  # valid_before NOW + 360
    store.mark_rejected(rejected.id, reason="402")
    never_signed = store.insert_pending(new_payment(amount=100_000_000, valid_before=None), now=NOW)
    store.mark_rejected(never_signed.id, reason="not signed: permit2")
    live_unsettled = store.insert_pending(new_payment(amount=10_000, valid_before=int(NOW) + 100), now=NOW)
    store.mark_unsettled(live_unsettled.id, reason="500")
    store.insert_dry_run(new_payment(amount=100_000), now=NOW)
    store.insert_pending(new_payment(amount=1_000_000, host="other.test"), now=NOW)
    store.insert_pending(new_payment(amount=10_000_000), now=NOW - 90_000)  # outside the window
    assert pending.id

    key = ("eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e", 6)
    since = NOW - 86_400
    totals = store.spent_since(since, "shop.test", now=NOW)
    # a rejected (402) payment counts while its signed authorization could still be settled
    assert totals.by_asset == {key: 1 + 10 + 100 + 1_000 + 10_000} and totals.count == 5
    # once the unsettled authorization has expired it can no longer move money
    assert store.spent_since(since, "shop.test", now=NOW + 200).by_asset == {key: 1_111}
    # nor can the rejected one
    assert store.spent_since(since, "shop.test", now=NOW + 400).by_asset == {key: 111}
    assert store.spent_since(since, now=NOW).by_asset == {key: 1_011_111}


def test_spent_since_keeps_assets_apart(store: SqliteLedgerStore) -> None:
    store.insert_pending(new_payment(amount=5), now=NOW)
    store.insert_pending(new_payment(amount=7, asset="0xAAAA", decimals=18), now=NOW)
    # the same asset spelled in another case
    store.insert_pending(new_payment(amount=9, asset="0xaaaa", decimals=18), now=NOW)
    totals = store.spent_since(NOW - 1, now=NOW)
    assert totals.by_asset[("eip155:84532", "0xaaaa", 18)] == 16
    assert len(totals.by_asset) == 2


def test_find_in_doubt(store: SqliteLedgerStore) -> None:
    record = store.insert_pending(new_payment(valid_before=int(NOW) + 100), now=NOW)
    assert store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW) is None  # pending is not
    store.mark_in_doubt(record.id, reason="timeout")
    found = store.find_in_doubt("get", "http://shop.test/paid", still_valid_at=NOW)
    assert found is not None and found.id == record.id
    assert store.find_in_doubt("POST", "http://shop.test/paid", still_valid_at=NOW) is None
    assert store.find_in_doubt("GET", "http://shop.test/other", still_valid_at=NOW) is None
    assert store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW + 100) is None  # expired


def test_list_filters_newest_first(store: SqliteLedgerStore) -> None:
    first = store.insert_pending(new_payment(), now=NOW)
    second = store.insert_pending(new_payment(host="other.test"), now=NOW + 10)
    store.mark_settled(second.id)
    assert [r.id for r in store.list()] == [second.id, first.id]
    assert [r.id for r in store.list(state=PaymentState.SETTLED)] == [second.id]
    assert [r.id for r in store.list(host="shop.test")] == [first.id]
    assert [r.id for r in store.list(since=NOW + 5)] == [second.id]
    assert len(store.list(limit=1)) == 1


def test_schema_version_is_per_component_and_migrations_extend(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteLedgerStore(path).close()
    conn = open_database(path)
    sessions = (
        Migration(1, ("CREATE TABLE sessions (id TEXT PRIMARY KEY)",)),
        Migration(2, ("ALTER TABLE sessions ADD COLUMN label TEXT",)),
    )
    assert apply_migrations(conn, "sessions", sessions[:1], path) == 1
    assert apply_migrations(conn, "sessions", sessions, path) == 2
    assert apply_migrations(conn, "sessions", sessions, path) == 2  # idempotent
    versions = dict(conn.execute("SELECT component, version FROM schema_version"))
    assert versions == {LEDGER_COMPONENT: LEDGER_MIGRATIONS[-1].version, "sessions": 2}
    with pytest.raises(StoreError) as info:
        apply_migrations(conn, "sessions", sessions[:1], path)  # an older program on a newer file
    assert info.value.kind == "schema"
    conn.close()
    SqliteLedgerStore(path).close()  # the ledger still opens next to other components


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    conn = open_database(path)
    broken = (Migration(1, ("CREATE TABLE t (x INTEGER)", "THIS IS NOT SQL")),)
    with pytest.raises(StoreError):
        apply_migrations(conn, "broken", broken, path)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "t" not in tables
    conn.close()


def test_corrupt_database_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a sqlite database, it is just text" * 100)
    os.chmod(path, 0o600)
    with pytest.raises(StoreError) as info:
        SqliteLedgerStore(path)
    assert info.value.kind == "corrupt" and str(path) in str(info.value)


def test_locked_database_is_a_named_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.store.sqlite as sqlite_module

    path = tmp_path / "state.db"
    SqliteLedgerStore(path).close()
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as info:
            store = SqliteLedgerStore(path)
            store.insert_pending(new_payment())
        assert info.value.kind == "locked"
        assert "locked" in str(info.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_disk_full_is_a_named_error(tmp_path: Path) -> None:
    store = SqliteLedgerStore(tmp_path / "state.db")
    try:
        page_size = store._conn.execute("PRAGMA page_size").fetchone()[0]
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # simulate a full disk
        assert page_size
        with pytest.raises(StoreError) as info:
            for _ in range(1000):
                store.insert_pending(new_payment(reason="x" * 4000))
        assert info.value.kind == "full"
        assert "disk full" in str(info.value)
    finally:
        store.close()


def test_concurrent_threads_share_one_store_safely(store: SqliteLedgerStore) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                record = store.insert_pending(new_payment())
                store.mark_settled(record.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(store.list(state=PaymentState.SETTLED, limit=1000)) == 100
