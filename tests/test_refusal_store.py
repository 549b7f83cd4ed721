"""The refusals table (proxy/store/refusal_store.py) and its recorder (proxy/payments/refusals.py), on a
real SQLite file: the retention bound, its own migration component next to the ledger's, the amount
asked, and a write that fails (another process holds the database's write lock) costing the caller a
log line and at most the short busy timeout, never an exception."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.payments.assets import AssetRegistry
from proxy.payments.networks import NetworkRegistry
from proxy.payments.refusals import RECORDED_REASONS, RefusalRecorder, cheapest_offer
from proxy.store.base import StoreError
from proxy.store.refusal_store import (
    BUSY_TIMEOUT_MS,
    MAX_AGE_SECONDS,
    MAX_ROWS,
    REFUSAL_MIGRATIONS,
    REFUSALS_COMPONENT,
    NewRefusal,
    SqliteRefusalStore,
)
from proxy.store.sqlite import LEDGER_COMPONENT, Migration, SqliteLedgerStore, apply_migrations, open_database

NOW = 1_800_000_000.0
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # builtin, Base Sepolia, 6 decimals
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
DAY = 86400.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def refusal(n: int = 0, **overrides: object) -> NewRefusal:
    fields: dict[str, object] = {
        "host": "shop.test",
        "method": "get",
        "url": f"http://shop.test/paid/{n}",
        "reason": "budget_exhausted",
        "detail": "0.001 USDC would exceed daily_budget 1.00",
        "amount": 1000,
        "decimals": 6,
        "asset": USDC,
        "network": "eip155:84532",
        "pay_to": PAY_TO,
    }
    fields.update(overrides)
    return NewRefusal(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "state.db"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Path, clock: Clock) -> Iterator[SqliteRefusalStore]:
    refusals = SqliteRefusalStore(db, clock=clock)
    yield refusals
    refusals.close()


def count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM refusals").fetchone()[0])


def test_a_row_keeps_every_field(store: SqliteRefusalStore) -> None:
    big = 2**256 - 1  # a uint256 price does not fit SQLite's INTEGER: kept as text, read back exact
    first = store.add(refusal(1, amount=big, session_id="s-1", payment_id=7))
    second = store.add(refusal(2, reason="host_not_allowed", amount=None, decimals=None, asset=None))
    rows = store.list()
    assert [r.id for r in rows] == [second, first]  # newest first
    kept = rows[1]
    assert (kept.created_at, kept.host, kept.method, kept.url) == (NOW, "shop.test", "GET", "http://shop.test/paid/1")
    assert (kept.reason, kept.detail) == ("budget_exhausted", "0.001 USDC would exceed daily_budget 1.00")
    assert (kept.amount, kept.decimals, kept.asset, kept.network, kept.pay_to) == (
        big, 6, USDC, "eip155:84532", PAY_TO
    )
    assert (kept.payment_id, kept.session_id) == (7, "s-1")
    assert rows[0].amount is None and rows[0].decimals is None and rows[0].asset is None
    assert [r.id for r in store.list(reason="host_not_allowed")] == [second]
    assert [r.id for r in store.list(host="other.test")] == []
    assert [r.id for r in store.list(limit=1)] == [second]
    assert store.count_by_host(NOW - DAY) == {"shop.test": 2}


def test_detail_and_url_are_clipped(store: SqliteRefusalStore) -> None:
    store.add(refusal(detail="d" * 5000, url="http://shop.test/" + "u" * 20000))
    (row,) = store.list()
    assert len(row.detail) == 500 and row.detail.endswith("…")
    assert len(row.url) == 8192


def test_retention_keeps_the_newest_10000_rows(store: SqliteRefusalStore, db: Path) -> None:
    """The bound in force in the proxy: MAX_ROWS, enforced on every write."""
    assert MAX_ROWS == 10_000
    started = time.perf_counter()
    ids = [store.add(refusal(n)) for n in range(MAX_ROWS + 50)]
    per_write = (time.perf_counter() - started) / len(ids)
    assert count(db) == MAX_ROWS
    rows = store.list(limit=10_000)
    assert [r.id for r in rows] == ids[-MAX_ROWS:][::-1]  # exactly the newest, newest first
    assert rows[-1].url == "http://shop.test/paid/50"
    assert per_write < 0.005, f"a refusal write took {per_write * 1000:.2f} ms on average"


def test_retention_drops_rows_older_than_30_days(store: SqliteRefusalStore, db: Path, clock: Clock) -> None:
    assert MAX_AGE_SECONDS == 30 * DAY
    old = store.add(refusal(1))
    clock.now = NOW + 10 * DAY
    recent = store.add(refusal(2))
    clock.now = NOW + 30 * DAY + 1
    # Not yet deleted (no write since), but never shown once past the age.
    assert [r.id for r in store.list()] == [recent]
    assert count(db) == 2
    newest = store.add(refusal(3))
    assert count(db) == 2, "the write drops what is past the age"
    assert [r.id for r in store.list()] == [newest, recent]
    assert old not in [r.id for r in store.list(since=0)]
    clock.now = NOW + 61 * DAY
    assert store.list() == []
    assert store.count_by_host(clock.now - DAY) == {}


def test_retention_holds_across_a_restart(db: Path, clock: Clock) -> None:
    small = SqliteRefusalStore(db, max_rows=3, clock=clock)
    for n in range(5):
        small.add(refusal(n))
    small.close()
    clock.now = NOW + 31 * DAY
    reopened = SqliteRefusalStore(db, max_rows=3, clock=clock)
    try:
        reopened.add(refusal(9))
        assert [r.url for r in reopened.list()] == ["http://shop.test/paid/9"]
        assert count(db) == 1
    finally:
        reopened.close()


def test_its_own_migration_component_next_to_the_ledger(db: Path) -> None:
    ledger = SqliteLedgerStore(db)
    refusals = SqliteRefusalStore(db)
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            versions = dict(conn.execute("SELECT component, version FROM schema_version"))
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert versions[REFUSALS_COMPONENT] == REFUSAL_MIGRATIONS[-1].version == 1
        assert LEDGER_COMPONENT in versions
        assert {"payments", "refusals"} <= tables
    finally:
        refusals.close()
        ledger.close()
    SqliteRefusalStore(db).close()  # reopening migrates nothing twice
    conn = open_database(db)
    try:  # a file written by a newer program is refused, not downgraded
        apply_migrations(conn, REFUSALS_COMPONENT, (*REFUSAL_MIGRATIONS, Migration(2, ("SELECT 1",))), db)
    finally:
        conn.close()
    with pytest.raises(StoreError) as refused:
        SqliteRefusalStore(db)
    assert refused.value.kind == "schema"


# -- the recorder -------------------------------------------------------------------------------------

ASSETS = AssetRegistry(NetworkRegistry())


def challenge_headers(*accepts: dict[str, object]) -> dict[str, str]:
    document = {"x402Version": 2, "resource": {"url": "http://shop.test/paid"}, "accepts": list(accepts)}
    return {"PAYMENT-REQUIRED": base64.b64encode(json.dumps(document).encode()).decode()}


def accept(amount: str, asset: str = USDC, network: str = "eip155:84532") -> dict[str, object]:
    return {
        "scheme": "exact",
        "network": network,
        "asset": asset,
        "amount": amount,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }


def test_the_amount_asked_is_the_cheapest_offer_in_a_known_asset() -> None:
    unknown = "0x" + "7" * 40
    headers = challenge_headers(accept("5000"), accept("1", asset=unknown), accept("2000"))
    offer = cheapest_offer(headers, b"", ASSETS)
    assert offer is not None
    assert (offer.amount, offer.decimals, offer.asset, offer.network, offer.pay_to) == (
        2000, 6, USDC, "eip155:84532", PAY_TO
    )
    assert cheapest_offer(challenge_headers(accept("1", asset=unknown)), b"", ASSETS) is None
    assert cheapest_offer({"PAYMENT-REQUIRED": "not base64 json"}, b"", ASSETS) is None
    assert cheapest_offer({}, b"<html>paywall</html>", ASSETS) is None


def test_the_recorder_keeps_a_refusal_with_the_price_asked(store: SqliteRefusalStore, clock: Clock) -> None:
    recorder = RefusalRecorder(store, ASSETS, clock)
    recorder.record(
        reason="host_not_allowed",
        detail="host 127.0.0.3 is not allowed by policy",
        method="GET",
        url="http://127.0.0.3:9/paid/a",
        host="127.0.0.3",
        headers=challenge_headers(accept("1000")),
        body=b"{}",
        session_id="s-9",
    )
    (row,) = store.list()
    assert (row.host, row.reason, row.amount, row.decimals, row.network, row.session_id) == (
        "127.0.0.3", "host_not_allowed", 1000, 6, "eip155:84532", "s-9"
    )
    assert recorder.counts["host_not_allowed"] == 1
    assert set(recorder.counts) == set(RECORDED_REASONS) and "dry_run" not in RECORDED_REASONS


def test_dry_run_is_not_a_refusal_here(store: SqliteRefusalStore, clock: Clock) -> None:
    recorder = RefusalRecorder(store, ASSETS, clock)
    recorder.record(reason="dry_run", detail="dry run: would pay", method="GET", url="http://shop.test/x",
                    host="shop.test", headers={}, body=b"", payment_id=3)
    assert store.list() == [] and "dry_run" not in recorder.counts


HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@pytest.fixture
def locked(db: Path, store: SqliteRefusalStore) -> Iterator[None]:
    """Another process holds the database's write lock (what a second proxy on the same home would)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    yield
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.close()
    holder.wait(10)


def test_a_write_that_fails_raises_store_error_quickly(store: SqliteRefusalStore, locked: None) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError) as failed:
        store.add(refusal())
    waited = time.monotonic() - started
    assert failed.value.kind == "locked"
    assert BUSY_TIMEOUT_MS / 1000 * 0.8 <= waited < 2.0, waited  # the short timeout, not the ledger's 5 s
    assert store.list() == []  # reading still works while another process writes


def test_the_recorder_logs_a_failed_write_and_goes_on(
    store: SqliteRefusalStore, clock: Clock, locked: None, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = RefusalRecorder(store, ASSETS, clock)
    with caplog.at_level(logging.ERROR, logger="x402_proxy.payments"):
        recorder.record(reason="budget_exhausted", detail="over", method="GET", url="http://shop.test/x",
                        host="shop.test", headers={}, body=b"")
    assert "refusal budget_exhausted for GET http://shop.test/x not recorded" in caplog.text
    assert "is locked by another process" in caplog.text
    assert recorder.counts["budget_exhausted"] == 1  # the metric still counts it


def test_a_closed_store_costs_a_log_line_not_an_exception(
    db: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    closed = SqliteRefusalStore(db, clock=clock)
    closed.close()
    recorder = RefusalRecorder(closed, ASSETS, clock)
    with caplog.at_level(logging.ERROR, logger="x402_proxy.payments"):
        recorder.record(reason="no_wallet", detail="no wallet", method="GET", url="http://shop.test/x",
                        host="shop.test", headers={}, body=b"")
    assert "not recorded" in caplog.text
