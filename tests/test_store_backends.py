"""One ledger suite, two backends: the same async tests against ThreadedLedgerStore(SqliteLedgerStore) and
PostgresLedgerStore on a throwaway PostgreSQL server (tests/support/postgres.py). Then what only a shared
database has: two stores racing one transition, replicas migrating at once, recovery that leaves a live
replica's rows alone, the server stopped under a store. SQLite specifics stay in tests/test_store_sqlite.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest

from proxy.config import Config, ConfigError, load_config, redacted
from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session, SessionCredentials
from proxy.sessions.scope import Scope
from proxy.store.base import (
    ALLOWED_TRANSITIONS,
    CHAIN_TRANSITIONS,
    RECONCILED_USED,
    AsyncLedgerStore,
    ChainState,
    NewPayment,
    PaymentRecord,
    PaymentState,
    StoreError,
)
from proxy.store.factory import open_ledger, schema_status
from proxy.store.postgres import (
    POSTGRES_LEDGER_MIGRATIONS,
    PostgresLedgerStore,
    ledger_schema_status,
    migrate_ledger,
)
from proxy.store.postgres_sessions import PostgresSessionStore
from proxy.store.session_crypto import SessionCipher
from proxy.store.session_store import AsyncSessionStore, SqliteSessionStore, ThreadedSessionStore
from proxy.store.settings import StoreSettings, redact_url
from proxy.store.sqlite import LEDGER_MIGRATIONS, SqliteLedgerStore
from proxy.store.threaded import ThreadedLedgerStore
from tests.support.postgres import PostgresMissing, PostgresServer, find_bin_dir, free_port

NOW = 1_800_000_000.0
REPO = Path(__file__).resolve().parents[1]
TX = "0x" + "cd" * 32
ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
KEY = ("eip155:84532", ASSET.lower(), 6)


def new_payment(**overrides: object) -> NewPayment:
    base = NewPayment(
        amount=10_000,
        decimals=6,
        asset=ASSET,
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


@dataclass
class Backend:
    name: str
    location: str  # the SQLite file, or the PostgreSQL URL (with its password)

    async def open(self) -> AsyncLedgerStore:
        if self.name == "sqlite":
            return ThreadedLedgerStore(SqliteLedgerStore(Path(self.location)))
        return await PostgresLedgerStore.open(self.location)

    async def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            conn = sqlite3.connect(self.location)
            conn.execute("UPDATE schema_version SET version = ? WHERE component = 'ledger'", (version,))
            conn.commit()
            conn.close()
            return
        conn = await asyncpg.connect(self.location)
        await conn.execute("UPDATE schema_version SET version = $1 WHERE component = 'ledger'", version)
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "home" / "state.db"))
    # Only the PostgreSQL half needs (and starts) the server.
    return Backend("postgres", request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[AsyncLedgerStore]:
    ledger = await backend.open()
    yield ledger
    await ledger.close()


async def row_in(store: AsyncLedgerStore, state: PaymentState, **overrides: object) -> PaymentRecord:
    """A fresh row brought to `state` by the path the payer takes."""
    if state is PaymentState.DRY_RUN:
        return await store.insert_dry_run(new_payment(**overrides), now=NOW)
    record = await store.insert_pending(new_payment(**overrides), now=NOW)
    if state is PaymentState.PENDING:
        return record
    return await mark(store, state, record.id, now=NOW + 1)


async def mark(
    store: AsyncLedgerStore, target: PaymentState, payment_id: int, now: float = NOW + 2
) -> PaymentRecord:
    if target is PaymentState.SETTLED:
        return await store.mark_settled(payment_id, tx_hash=TX, payer="0xpayer", reason="paid", now=now)
    if target is PaymentState.REJECTED:
        return await store.mark_rejected(payment_id, reason="402 again", now=now)
    if target is PaymentState.UNSETTLED:
        return await store.mark_unsettled(payment_id, reason="HTTP 500", now=now)
    if target is PaymentState.IN_DOUBT:
        return await store.mark_in_doubt(payment_id, reason="timeout", now=now)
    if target is PaymentState.SETTLED_UNDELIVERED:
        return await store.mark_settled_undelivered(payment_id, reason="answer lost", tx_hash=TX, now=now)
    raise AssertionError(target)


# -- the common suite -------------------------------------------------------------------------------


async def test_insert_and_read_back_every_field(store: AsyncLedgerStore) -> None:
    huge = 2**256 - 1  # a uint256: TEXT in SQLite, NUMERIC(78,0) in PostgreSQL, an int here
    new = new_payment(
        amount=huge,
        session_id="s-1",
        need="scope prefix http://shop.test/",
        approved_by="cli",
        approved_at=NOW - 5,
        reason="asked",
    )
    record = await store.insert_pending(new, now=NOW)
    assert await store.get(record.id) == record
    assert record.amount == huge and isinstance(record.amount, int)
    assert record.method == "GET" and record.state is PaymentState.PENDING
    assert record.created_at == record.updated_at == NOW
    assert (record.need, record.approved_by, record.approved_at) == (
        "scope prefix http://shop.test/",
        "cli",
        NOW - 5,
    )
    assert (record.session_id, record.reason, record.payment_id) == ("s-1", "asked", "pay_0123456789abcdef")
    assert record.nonce == "0x" + "ab" * 32 and record.valid_before == int(NOW) + 360
    assert record.delivered is False and record.chain_state is None and record.presentations == 0
    assert record.evidence is None and record.tx_hash is None and record.last_presented_at is None
    # the need defaults to the request
    plain = await store.insert_pending(new_payment(method="post", url="http://shop.test/x"), now=NOW)
    assert plain.need == "request POST http://shop.test/x"
    dry = await store.insert_dry_run(new_payment(), now=NOW)
    assert dry.state is PaymentState.DRY_RUN and dry.id > plain.id > record.id
    assert await store.get(999_999) is None


async def test_every_transition_allowed_and_every_one_refused(store: AsyncLedgerStore) -> None:
    for target, sources in ALLOWED_TRANSITIONS.items():
        for source in PaymentState:
            row = await row_in(store, source)
            if source in sources:
                done = await mark(store, target, row.id)
                assert done.state is target and done.updated_at == NOW + 2, (source, target)
            else:
                with pytest.raises(StoreError) as info:
                    await mark(store, target, row.id)
                assert info.value.kind == "transition", (source, target)
                assert f"is {source}" in str(info.value) and f"cannot mark it {target}" in str(info.value)
                assert (await store.get(row.id)) == row  # untouched
    with pytest.raises(StoreError) as info:
        await store.mark_settled(999_999)
    assert info.value.kind == "transition" and "does not exist" in str(info.value)


async def test_what_a_transition_keeps(store: AsyncLedgerStore) -> None:
    # reason, tx hash and payer are kept when not given; `delivered` follows the outcome
    row = await row_in(store, PaymentState.PENDING)
    doubt = await store.mark_in_doubt(
        row.id, reason="served without receipt", delivered=True, tx_hash=TX, now=NOW
    )
    assert doubt.delivered and doubt.tx_hash == TX
    settled = await store.mark_settled(doubt.id, now=NOW + 1)
    assert settled.delivered and settled.tx_hash == TX and settled.reason == "served without receipt"
    other = await row_in(store, PaymentState.PENDING)
    assert (await store.mark_settled(other.id, payer="0xp")).delivered is True
    lost = await row_in(store, PaymentState.IN_DOUBT)
    assert lost.delivered is False
    undelivered = await store.mark_settled_undelivered(lost.id, reason="chain: used")
    assert undelivered.delivered is False and undelivered.reason == "chain: used"


async def test_set_authorization_note_in_doubt_and_presentations_need_their_states(
    store: AsyncLedgerStore,
) -> None:
    row = await store.insert_pending(new_payment(nonce=None, valid_before=None), now=NOW)
    auth = await store.set_authorization(row.id, nonce="12345", valid_before=int(NOW) + 400, now=NOW + 1)
    assert (auth.nonce, auth.valid_before, auth.updated_at) == ("12345", int(NOW) + 400, NOW + 1)
    assert await store.presented_header(row.id) is None
    first = await store.record_presentation(
        row.id, header_name="PAYMENT-SIGNATURE", header_value="eyJ", now=NOW + 2
    )
    assert first.presentations == 1 and first.last_presented_at == NOW + 2
    await store.mark_in_doubt(row.id, reason="cut")
    again = await store.record_presentation(
        row.id, header_name="PAYMENT-SIGNATURE", header_value="eyJ2", now=NOW + 9
    )
    assert again.presentations == 2 and again.last_presented_at == NOW + 9
    assert await store.presented_header(row.id) == ("PAYMENT-SIGNATURE", "eyJ2")
    noted = await store.note_in_doubt(row.id, reason="402 to the re-presentation", tx_hash=TX, now=NOW + 10)
    assert noted.state is PaymentState.IN_DOUBT and noted.reason == "402 to the re-presentation"
    assert noted.tx_hash == TX
    kept = await store.note_in_doubt(row.id, reason="still nothing")
    assert kept.tx_hash == TX
    with pytest.raises(StoreError) as info:
        await store.set_authorization(row.id, nonce="1", valid_before=1)
    assert info.value.kind == "transition" and "not pending" in str(info.value)
    await store.mark_settled(row.id, tx_hash=TX)
    for refused in (
        store.note_in_doubt(row.id, reason="x"),
        store.record_presentation(row.id, header_name="X-PAYMENT", header_value="v"),
    ):
        with pytest.raises(StoreError) as info:
            await refused
        assert info.value.kind == "transition"
    assert await store.presented_header(999_999) is None


async def test_evidence_and_session_link(store: AsyncLedgerStore) -> None:
    row = await row_in(store, PaymentState.SETTLED)
    await store.add_evidence(row.id, json.dumps({"offer-receipt": {"sig": "0x1"}}))
    await store.attach_session(row.id, "sess-9")
    got = await store.get(row.id)
    assert got is not None and got.session_id == "sess-9"
    assert json.loads(got.evidence or "") == {"offer-receipt": {"sig": "0x1"}}
    await store.add_evidence(999_999, "{}")  # nothing to attach to: no error, as before
    await store.attach_session(999_999, "s")


async def test_chain_verdicts_follow_chain_transitions_and_are_final(store: AsyncLedgerStore) -> None:
    for source in PaymentState:
        for said in ChainState:
            for target in PaymentState:
                row = await row_in(store, source)
                allowed = target in CHAIN_TRANSITIONS.get((source, said), frozenset())
                if not allowed:
                    with pytest.raises(StoreError) as info:
                        await store.record_chain_verdict(
                            row.id, chain_state=said, state=target, reason="chain", now=NOW + 3
                        )
                    assert info.value.kind == "transition", (source, said, target)
                    assert f"the chain's {said} cannot make it {target}" in str(info.value)
                    continue
                verdict = await store.record_chain_verdict(
                    row.id,
                    chain_state=said,
                    state=target,
                    reason=f"chain said {said}",
                    tx_hash=None,
                    now=NOW + 3,
                )
                assert (verdict.state, verdict.chain_state, verdict.updated_at) == (target, said, NOW + 3)
                assert verdict.tx_hash == row.tx_hash  # kept when the chain names none
                with pytest.raises(StoreError) as info:  # the chain's word is final
                    await store.record_chain_verdict(row.id, chain_state=said, state=target, reason="again")
                assert info.value.kind == "transition" and f"(chain: {said})" in str(info.value)
    row = await row_in(store, PaymentState.IN_DOUBT)
    named = await store.record_chain_verdict(
        row.id, chain_state=ChainState.USED, state=PaymentState.SETTLED_UNDELIVERED, reason="used", tx_hash=TX
    )
    assert named.tx_hash == TX


async def test_spent_since_counts_money_that_may_move(store: AsyncLedgerStore) -> None:
    await row_in(store, PaymentState.PENDING, amount=1)
    await row_in(store, PaymentState.SETTLED, amount=10)
    await row_in(store, PaymentState.IN_DOUBT, amount=100)
    await row_in(store, PaymentState.REJECTED, amount=1_000)  # valid_before NOW + 360
    await row_in(store, PaymentState.REJECTED, amount=100_000_000, valid_before=None, reason="not signed")
    await row_in(store, PaymentState.UNSETTLED, amount=10_000, valid_before=int(NOW) + 100)
    await row_in(store, PaymentState.DRY_RUN, amount=100_000)
    await row_in(store, PaymentState.PENDING, amount=1_000_000, host="other.test")
    await store.insert_pending(new_payment(amount=10_000_000), now=NOW - 90_000)  # outside the window
    since = NOW - 86_400
    totals = await store.spent_since(since, "shop.test", now=NOW)
    assert totals.by_asset == {KEY: 1 + 10 + 100 + 1_000 + 10_000} and totals.count == 5
    assert (await store.spent_since(since, "shop.test", now=NOW + 200)).by_asset == {KEY: 1_111}
    assert (await store.spent_since(since, "shop.test", now=NOW + 400)).by_asset == {KEY: 111}
    everything = await store.spent_since(since, now=NOW)
    assert everything.by_asset == {KEY: 1_011_111} and everything.count == 6
    assert (await store.spent_since(NOW + 1, now=NOW)).count == 0


async def test_a_refund_is_counted_back_never_lowered_and_only_where_money_moved(store: AsyncLedgerStore) -> None:
    """A channel's refunded deposit (record_refund): budgets count amount - refunded."""
    huge = 2**256 - 1
    deposit = await row_in(store, PaymentState.SETTLED, amount=huge, scheme="batch-settlement")
    assert deposit.refunded == 0 and await store.get(deposit.id) == deposit
    since = NOW - 86_400
    assert (await store.spent_since(since, now=NOW)).by_asset == {KEY: huge}
    refunded = await store.record_refund(deposit.id, huge - 3_000, now=NOW + 5)
    assert refunded.refunded == huge - 3_000 and refunded.updated_at == NOW + 5
    assert refunded.state is PaymentState.SETTLED and refunded.amount == huge  # the row itself stays
    assert await store.get(deposit.id) == refunded
    assert (await store.spent_since(since, now=NOW)).by_asset == {KEY: 3_000}
    assert (await store.spent_since(since, "shop.test", now=NOW)).by_asset == {KEY: 3_000}
    # Never lowered (a second, smaller reading changes nothing); never above the amount.
    assert (await store.record_refund(deposit.id, 1, now=NOW + 6)).refunded == huge - 3_000
    with pytest.raises(StoreError, match="not within its amount") as above:
        await store.record_refund(deposit.id, huge + 1, now=NOW + 6)
    assert above.value.kind == "transition"
    with pytest.raises(StoreError, match="not within its amount"):
        await store.record_refund(deposit.id, -1, now=NOW + 6)
    # Only on rows whose money moved or may have.
    for state in (PaymentState.IN_DOUBT, PaymentState.SETTLED_UNDELIVERED):
        row = await row_in(store, state, amount=10)
        assert (await store.record_refund(row.id, 4, now=NOW + 7)).refunded == 4
    for state in (PaymentState.PENDING, PaymentState.REJECTED, PaymentState.UNSETTLED, PaymentState.DRY_RUN):
        row = await row_in(store, state, amount=10)
        with pytest.raises(StoreError, match="nothing can come back"):
            await store.record_refund(row.id, 1, now=NOW + 7)
        assert (await store.get(row.id)) == row
    with pytest.raises(StoreError, match="does not exist"):
        await store.record_refund(999_999, 1)


async def test_spent_since_chain_checked_rule(store: AsyncLedgerStore) -> None:
    # Expired refusals: on a network whose chain can be asked, a refusal of an authorization that was sent
    # counts until the chain has answered; elsewhere it stops counting at validBefore.
    expired = int(NOW) - 10
    later = NOW + 100

    async def refused(amount: int, *, network: str = "eip155:84532", sent: bool = True) -> PaymentRecord:
        row = await store.insert_pending(
            new_payment(amount=amount, network=network, valid_before=expired, host="chain.test"), now=NOW
        )
        if sent:
            await store.record_presentation(row.id, header_name="PAYMENT-SIGNATURE", header_value="v")
        return await store.mark_rejected(row.id, reason="402")

    await refused(1)  # sent, chain not asked yet: counts where the chain can be asked
    await refused(10, sent=False)  # never sent: cannot move money
    proved = await refused(100)
    await store.record_chain_verdict(
        proved.id, chain_state=ChainState.UNUSED, state=PaymentState.REJECTED, reason="unused"
    )
    await refused(1_000, network="eip155:1")  # no RPC for that network: expired is enough
    moved = await refused(10_000)
    await store.record_chain_verdict(
        moved.id, chain_state=ChainState.USED, state=PaymentState.SETTLED_UNDELIVERED, reason="used"
    )
    open_ended = await store.insert_pending(
        new_payment(amount=100_000, valid_before=None, host="chain.test"), now=NOW
    )
    await store.mark_unsettled(open_ended.id, reason="500")  # an unsettled row without validBefore counts
    checked = frozenset({"eip155:84532"})
    with_chain = await store.spent_since(NOW - 1, "chain.test", now=later, chain_checked=checked)
    assert with_chain.by_asset == {KEY: 1 + 10_000 + 100_000} and with_chain.count == 3
    without = await store.spent_since(NOW - 1, "chain.test", now=later)
    assert without.by_asset == {KEY: 10_000 + 100_000} and without.count == 2


async def test_spent_since_keeps_assets_apart_and_sums_uint256(store: AsyncLedgerStore) -> None:
    await store.insert_pending(new_payment(amount=5), now=NOW)
    await store.insert_pending(new_payment(amount=7, asset="0xAAAA", decimals=18), now=NOW)
    await store.insert_pending(new_payment(amount=9, asset="0xaaaa", decimals=18), now=NOW)  # other case
    await store.insert_pending(new_payment(amount=2**255, asset="0xBIG"), now=NOW)
    await store.insert_pending(new_payment(amount=2**255, asset="0xbig"), now=NOW)
    totals = await store.spent_since(NOW - 1, now=NOW)
    assert totals.by_asset[("eip155:84532", "0xaaaa", 18)] == 16
    assert totals.by_asset[("eip155:84532", "0xbig", 6)] == 2**256
    assert len(totals.by_asset) == 3 and totals.count == 5


async def test_find_in_doubt(store: AsyncLedgerStore) -> None:
    record = await store.insert_pending(new_payment(valid_before=int(NOW) + 100), now=NOW)
    assert await store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW) is None
    await store.mark_in_doubt(record.id, reason="timeout")
    found = await store.find_in_doubt("get", "http://shop.test/paid", still_valid_at=NOW)
    assert found is not None and found.id == record.id
    assert await store.find_in_doubt("POST", "http://shop.test/paid", still_valid_at=NOW) is None
    assert await store.find_in_doubt("GET", "http://shop.test/other", still_valid_at=NOW) is None
    assert await store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW + 100) is None
    assert await store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW + 99.5) is not None
    # a delivered in-doubt row does not block; one settled by reconciliation does, newest first
    delivered = await store.insert_pending(new_payment(url="http://shop.test/d"), now=NOW)
    await store.mark_in_doubt(delivered.id, reason="served", delivered=True)
    assert await store.find_in_doubt("GET", "http://shop.test/d", still_valid_at=NOW) is None
    reconciled = await store.insert_pending(new_payment(), now=NOW)
    await store.mark_settled(reconciled.id, reason=f"{RECONCILED_USED} in tx {TX}")
    newest = await store.find_in_doubt("GET", "http://shop.test/paid", still_valid_at=NOW)
    assert newest is not None and newest.id == reconciled.id


async def test_find_blocking(store: AsyncLedgerStore) -> None:
    need = "scope prefix http://shop.test/api/"
    doubt = await row_in(store, PaymentState.IN_DOUBT, url="http://shop.test/api/a", need=need)
    served = await store.insert_pending(new_payment(url="http://shop.test/api/b", need=need), now=NOW)
    await store.mark_in_doubt(served.id, reason="served", delivered=True)
    await row_in(store, PaymentState.SETTLED, url="http://shop.test/api/c", need=need)
    await row_in(store, PaymentState.REJECTED, url="http://shop.test/api/d", need=need)
    lost = await row_in(store, PaymentState.SETTLED_UNDELIVERED, url="http://shop.test/api/e", need=need)
    reconciled = await store.insert_pending(new_payment(url="http://shop.test/api/f", need=need), now=NOW)
    await store.mark_settled(reconciled.id, reason=f"{RECONCILED_USED} in tx {TX}")

    by_need = await store.find_blocking("GET", "http://elsewhere.test/", need)
    assert [r.id for r in by_need] == [reconciled.id, lost.id, doubt.id]
    by_request = await store.find_blocking("get", "http://shop.test/api/a", None)
    assert [r.id for r in by_request] == [doubt.id]
    assert await store.find_blocking("POST", "http://shop.test/api/a", None) == []
    assert await store.find_blocking("GET", "http://shop.test/api/b", "other need") == []
    for _ in range(22):
        await row_in(store, PaymentState.IN_DOUBT, url="http://shop.test/many", need="many")
    assert len(await store.find_blocking("GET", "http://x.test/", "many")) == 20


async def test_list_hosts_and_in_doubt(store: AsyncLedgerStore) -> None:
    first = await store.insert_pending(new_payment(), now=NOW)
    second = await store.insert_pending(new_payment(host="other.test"), now=NOW + 10)
    await store.mark_settled(second.id)
    assert [r.id for r in await store.list()] == [second.id, first.id]
    assert [r.id for r in await store.list(state=PaymentState.SETTLED)] == [second.id]
    assert [r.id for r in await store.list(host="shop.test")] == [first.id]
    assert [r.id for r in await store.list(since=NOW + 5)] == [second.id]
    assert [r.id for r in await store.list(state=PaymentState.SETTLED, host="shop.test")] == []
    assert len(await store.list(limit=1)) == 1 and len(await store.list(limit=0)) == 1
    for host in ("b.test", "B.test", "_x.test", "a.test", "b.test"):
        await store.insert_pending(new_payment(host=host), now=NOW + 20)
    await store.insert_pending(new_payment(host="old.test"), now=NOW - 1000)
    # byte order, whatever the database's locale
    assert list(await store.hosts_since(NOW + 20)) == ["B.test", "_x.test", "a.test", "b.test"]
    assert "old.test" not in await store.hosts_since(NOW) and "other.test" in await store.hosts_since(NOW)
    a = await row_in(store, PaymentState.IN_DOUBT)
    b = await row_in(store, PaymentState.IN_DOUBT)
    assert [r.id for r in await store.list_in_doubt()] == [a.id, b.id]  # oldest first


async def test_list_unresolved(store: AsyncLedgerStore) -> None:
    doubt = await row_in(store, PaymentState.IN_DOUBT)  # never presented, still in doubt
    sent = await store.insert_pending(new_payment(), now=NOW)
    await store.record_presentation(sent.id, header_name="PAYMENT-SIGNATURE", header_value="v")
    await store.mark_settled(sent.id, tx_hash=TX)
    await row_in(store, PaymentState.SETTLED)  # never presented: nothing left
    await row_in(store, PaymentState.REJECTED, nonce=None)  # never signed
    await row_in(store, PaymentState.PENDING)
    await row_in(store, PaymentState.DRY_RUN)
    answered = await row_in(store, PaymentState.IN_DOUBT)
    await store.record_chain_verdict(
        answered.id, chain_state=ChainState.UNUSED, state=PaymentState.REJECTED, reason="unused"
    )
    assert [r.id for r in await store.list_unresolved()] == [sent.id, doubt.id]
    assert [r.id for r in await store.list_unresolved(limit=1)] == [sent.id]
    assert [r.id for r in await store.list_unresolved(limit=0)] == [sent.id]


async def test_recover_on_startup(store: AsyncLedgerStore) -> None:
    first = await row_in(store, PaymentState.PENDING)
    settled = await row_in(store, PaymentState.SETTLED)
    second = await row_in(store, PaymentState.PENDING)
    recovered = await store.recover_on_startup(now=NOW + 5)
    assert [r.id for r in recovered] == [first.id, second.id]
    for record in recovered:
        assert record.state is PaymentState.IN_DOUBT and record.updated_at == NOW + 5
        assert record.reason == "the proxy stopped before the outcome was recorded"
    assert await store.get(settled.id) == settled
    assert await store.recover_on_startup() == []


async def test_a_cancelled_write_is_still_recorded(store: AsyncLedgerStore) -> None:
    # As on the SQLite thread: a paid request cancelled while its row is written still leaves the row.
    task = asyncio.create_task(store.insert_pending(new_payment(host="cancelled.test"), now=NOW))
    await asyncio.sleep(0)  # the write has started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows: list[PaymentRecord] = []
    for _ in range(200):
        rows = list(await store.list(host="cancelled.test"))
        if rows:
            break
        await asyncio.sleep(0.01)
    assert len(rows) == 1 and rows[0].state is PaymentState.PENDING


async def test_text_a_server_chose_is_stored(store: AsyncLedgerStore) -> None:
    # A hostile server's errorReason may hold a NUL, which PostgreSQL text cannot: the write must not fail.
    row = await row_in(store, PaymentState.PENDING)
    rejected = await store.mark_rejected(row.id, reason="bad\x00reason ünïcode")
    assert rejected.state is PaymentState.REJECTED
    assert (
        rejected.reason is not None
        and rejected.reason.startswith("bad")
        and rejected.reason.endswith("ünïcode")
    )


async def test_schema_newer_than_the_program_is_refused(backend: Backend) -> None:
    ledger = await backend.open()
    await ledger.close()
    await backend.set_schema_version(99)
    with pytest.raises(StoreError) as info:
        await backend.open()
    assert info.value.kind == "schema" and "v99 is newer than this program" in str(info.value)
    settings = StoreSettings(url=backend.location if backend.name == "postgres" else "")
    with pytest.raises(StoreError) as status:
        await schema_status(settings, Path(backend.location).parent)
    assert status.value.kind == "schema"
    if backend.name == "postgres":
        secret = backend.location.split(":")[2].split("@")[0]
        assert secret not in str(info.value) and secret not in str(status.value)
        assert redact_url(backend.location) in str(info.value)


async def test_open_ledger_picks_the_configured_backend(backend: Backend, tmp_path: Path) -> None:
    config = Config(store=StoreSettings(url=backend.location if backend.name == "postgres" else ""))
    home = Path(backend.location).parent if backend.name == "sqlite" else tmp_path / "home"
    ledger, close = await open_ledger(config, home)
    try:
        expected = ThreadedLedgerStore if backend.name == "sqlite" else PostgresLedgerStore
        assert isinstance(ledger, expected)
        row = await ledger.insert_pending(new_payment(), now=NOW)
        assert (await ledger.get(row.id)) == row
    finally:
        await close()
    if backend.name == "postgres":
        assert not (home / "state.db").exists()  # nothing written to the home directory


# -- the CLI: x402-proxy store check|migrate -------------------------------------------------------


def store_cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    if url:
        env["X402_PROXY_STORE__URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--home", str(home), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


async def test_store_check_and_migrate(backend: Backend, tmp_path: Path) -> None:
    url = backend.location if backend.name == "postgres" else ""
    home = Path(backend.location).parent if backend.name == "sqlite" else tmp_path / "home"
    newest = (LEDGER_MIGRATIONS if backend.name == "sqlite" else POSTGRES_LEDGER_MIGRATIONS)[-1].version
    shown = redact_url(url) if url else f"sqlite {home / 'state.db'}"

    before = store_cli(home, url, "store", "check")
    assert before.returncode == 0, before.stderr
    expected = "no ledger yet" if backend.name == "sqlite" else "ledger schema v0"
    assert before.stdout.startswith(f"{shown}: {expected}") and f"v{newest}" in before.stdout
    if backend.name == "sqlite":
        assert not (home / "state.db").exists()  # check changes nothing
    migrated = store_cli(home, url, "store", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == f"{shown}: ledger schema v{newest}, migrated from v0"
    after = store_cli(home, url, "store", "check")
    assert after.returncode == 0 and after.stdout.strip() == f"{shown}: ledger schema v{newest}, up to date"
    again = store_cli(home, url, "store", "migrate")
    assert again.stdout.strip() == f"{shown}: ledger schema v{newest}, up to date"
    ledger = await backend.open()  # what `migrate` made is what the store uses
    await ledger.close()
    await backend.set_schema_version(newest + 1)
    newer = store_cli(home, url, "store", "check")
    assert newer.returncode == 2 and f"v{newest + 1} is newer than this program" in newer.stderr
    assert "Traceback" not in newer.stderr


def test_store_cli_names_an_unreachable_or_refusing_database(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    secret = "hunter2-not-shown"
    nothing_there = free_port()
    cases = {
        f"postgresql://x402:{secret}@127.0.0.1:{nothing_there}/ledger": (
            f"x402-proxy: store postgresql://x402@127.0.0.1:{nothing_there}/ledger unreachable: "
        ),
        postgres_server.url("ledger", password=secret): (
            f"x402-proxy: store postgresql://x402@127.0.0.1:{postgres_server.port}/ledger refused the connection: "
            'password authentication failed for user "x402"'
        ),
        postgres_server.url("no_such_db"): (
            f"x402-proxy: store postgresql://x402@127.0.0.1:{postgres_server.port}/no_such_db refused the "
            'connection: database "no_such_db" does not exist'
        ),
    }
    for index, (url, message) in enumerate(cases.items()):
        for command in ("check", "migrate") if index == 0 else ("check",):
            result = store_cli(tmp_path / "home", url, "store", command)
            assert result.returncode == 2, (url, result.stdout, result.stderr)
            assert result.stderr.startswith(message), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
            assert secret not in result.stderr + result.stdout
            assert postgres_server.password not in result.stderr + result.stdout


async def test_a_store_that_cannot_open_says_which_database(postgres_server: PostgresServer) -> None:
    secret = "hunter2-not-shown"
    port = free_port()
    for url, words in (
        (f"postgresql://x402:{secret}@127.0.0.1:{port}/ledger", "unreachable"),
        (postgres_server.url("ledger", password=secret), "refused the connection"),
    ):
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            await PostgresLedgerStore.open(url)
        assert info.value.kind == "io" and str(info.value).startswith(f"store {redact_url(url)} {words}: ")
        assert secret not in str(info.value) and time.monotonic() - started < 7


# -- only a shared database: PostgreSQL -------------------------------------------------------------


async def test_two_stores_racing_one_transition_exactly_one_wins(postgres_url: str) -> None:
    first = await PostgresLedgerStore.open(postgres_url)
    second = await PostgresLedgerStore.open(postgres_url)
    try:
        rows = [await first.insert_pending(new_payment(), now=NOW) for _ in range(40)]
        for row in rows:
            # from pending both are allowed, and neither is allowed from the other: one outcome stands
            outcomes = await asyncio.gather(
                first.mark_rejected(row.id, reason="402"),
                second.mark_unsettled(row.id, reason="500"),
                second.mark_rejected(row.id, reason="402"),
                first.mark_unsettled(row.id, reason="500"),
                return_exceptions=True,
            )
            won = [o for o in outcomes if isinstance(o, PaymentRecord)]
            lost = [o for o in outcomes if isinstance(o, StoreError)]
            assert len(won) == 1 and len(lost) == 3 and all(e.kind == "transition" for e in lost), outcomes
            final = await second.get(row.id)
            assert final is not None and final.state is won[0].state
        for row in [await first.insert_pending(new_payment(), now=NOW) for _ in range(20)]:
            # the same receipt recorded by two replicas: only one settles the row
            both = await asyncio.gather(
                first.mark_settled(row.id, tx_hash=TX),
                second.mark_settled(row.id, tx_hash=TX),
                return_exceptions=True,
            )
            assert sum(isinstance(o, PaymentRecord) for o in both) == 1, both
        # the chain's word, raced by two reconcilers: one verdict stands
        doubt = await first.insert_pending(new_payment(), now=NOW)
        await first.mark_in_doubt(doubt.id, reason="cut")
        verdicts = await asyncio.gather(
            first.record_chain_verdict(
                doubt.id, chain_state=ChainState.USED, state=PaymentState.SETTLED_UNDELIVERED, reason="a"
            ),
            second.record_chain_verdict(
                doubt.id, chain_state=ChainState.UNUSED, state=PaymentState.REJECTED, reason="b"
            ),
            return_exceptions=True,
        )
        assert sum(isinstance(v, PaymentRecord) for v in verdicts) == 1
    finally:
        await first.close()
        await second.close()


async def test_concurrent_transitions_from_many_connections_one_winner(postgres_url: str) -> None:
    stores = [await PostgresLedgerStore.open(postgres_url, pool_size=4) for _ in range(3)]
    try:
        row = await stores[0].insert_pending(new_payment(), now=NOW)
        outcomes = await asyncio.gather(
            *(s.mark_settled(row.id, tx_hash=f"0x{i:064x}") for i, s in enumerate(stores * 4)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, PaymentRecord)]
        assert len(winners) == 1
        assert all(
            isinstance(o, StoreError) and o.kind == "transition" for o in outcomes if o is not winners[0]
        )
        final = await stores[2].get(row.id)
        assert final is not None and final.tx_hash == winners[0].tx_hash
    finally:
        for s in stores:
            await s.close()


async def test_migrations_applied_concurrently_by_three_replicas(postgres_url: str) -> None:
    stores = await asyncio.gather(*(PostgresLedgerStore.open(postgres_url) for _ in range(3)))
    try:
        conn = await asyncpg.connect(postgres_url)
        try:
            versions = await conn.fetch("SELECT component, version FROM schema_version")
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'payments'")
        finally:
            await conn.close()
        assert [tuple(v) for v in versions] == [("ledger", POSTGRES_LEDGER_MIGRATIONS[-1].version)]
        assert tables == 1
        row = await stores[0].insert_pending(new_payment(), now=NOW)
        assert await stores[2].get(row.id) == row  # one ledger for all
        latest = POSTGRES_LEDGER_MIGRATIONS[-1].version  # (the schema's version, the program's)
        assert await migrate_ledger(postgres_url) == (latest, latest)
        assert await ledger_schema_status(postgres_url) == (latest, latest)
    finally:
        for s in stores:
            await s.close()


async def test_migrations_applied_concurrently_by_three_processes(postgres_url: str) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from proxy.store.postgres import PostgresLedgerStore
        async def main():
            store = await PostgresLedgerStore.open({postgres_url!r})
            await store.close()
            print("ok")
        asyncio.run(main())
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    latest = POSTGRES_LEDGER_MIGRATIONS[-1].version
    assert await ledger_schema_status(postgres_url) == (latest, latest)


async def test_recovery_leaves_a_live_replicas_pending_rows_alone(postgres_url: str) -> None:
    # Replica A is paying (its row pending); replica B starts and recovers: A's row must stay pending.
    # Once A is SIGKILLed, PostgreSQL drops its connection and owner lock, and B's recovery takes the row.
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from proxy.store.postgres import PostgresLedgerStore
        from tests.test_store_backends import new_payment
        async def main():
            store = await PostgresLedgerStore.open({postgres_url!r})
            row = await store.insert_pending(new_payment(host="replica-a.test"))
            print(row.id, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
        """
    )
    replica_a = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    replica_b = await PostgresLedgerStore.open(postgres_url)
    try:
        assert replica_a.stdout is not None
        line = await asyncio.to_thread(replica_a.stdout.readline)
        assert line.strip().isdigit(), replica_a.stderr.read() if replica_a.stderr else line
        a_row = int(line)
        own = await replica_b.insert_pending(new_payment(host="replica-b.test"), now=NOW)
        recovered = await replica_b.recover_on_startup()
        assert [r.id for r in recovered] == [own.id]  # its own, never the live replica's
        a_record = await replica_b.get(a_row)
        assert a_record is not None and a_record.state is PaymentState.PENDING
        replica_a.send_signal(signal.SIGKILL)
        replica_a.wait(10)
        deadline = time.monotonic() + 10
        taken: list[int] = []
        while time.monotonic() < deadline and not taken:
            taken = [r.id for r in await replica_b.recover_on_startup()]
            await asyncio.sleep(0.05)
        assert taken == [a_row]
        after = await replica_b.get(a_row)
        assert after is not None and after.state is PaymentState.IN_DOUBT
    finally:
        if replica_a.poll() is None:
            replica_a.kill()
            replica_a.wait(10)
        await replica_b.close()


async def test_database_stopped_under_a_store_then_back(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    store = await PostgresLedgerStore.open(postgres_url)
    shown = redact_url(postgres_url)
    try:
        row = await store.insert_pending(new_payment(), now=NOW)
        for mode in ("fast", "immediate"):  # a clean shutdown, then a crash
            postgres_server.stop(mode)
            try:
                calls = {
                    "get": lambda: store.get(row.id),
                    "insert_pending": lambda: store.insert_pending(new_payment(), now=NOW),
                    "mark_in_doubt": lambda: store.mark_in_doubt(row.id, reason="cut"),
                    "spent_since": lambda: store.spent_since(NOW - 1, now=NOW),
                    "find_blocking": lambda: store.find_blocking("GET", "http://shop.test/paid", None),
                }
                for name, call in calls.items():
                    started = time.monotonic()
                    with pytest.raises(StoreError) as info:
                        await call()
                    message = str(info.value)
                    assert info.value.kind == "io", (name, message)
                    assert message.startswith(f"store {shown} unreachable: "), (name, message)
                    assert postgres_server.password not in message
                    assert time.monotonic() - started < 7, name  # refused promptly, not hung
                # the CLI says the same and exits 2
                result = store_cli(Path("/nonexistent-home"), postgres_url, "store", "check")
                assert result.returncode == 2 and result.stderr.startswith(
                    f"x402-proxy: store {shown} unreachable: "
                )
                assert postgres_server.password not in result.stderr and "Traceback" not in result.stderr
            finally:
                postgres_server.start()
            # back: the same store works again by itself, its owner lock taken again for new pending rows
            again = await store.get(row.id)
            assert again is not None and again.state is PaymentState.PENDING
            fresh = await store.insert_pending(new_payment(host="after.test"), now=NOW)
            assert (await store.mark_settled(fresh.id, tx_hash=TX)).state is PaymentState.SETTLED
        other = await PostgresLedgerStore.open(postgres_url)
        try:
            live = await store.insert_pending(new_payment(host="live.test"), now=NOW)
            assert live.id not in [r.id for r in await other.recover_on_startup()]
        finally:
            await other.close()
    finally:
        if not postgres_server.is_running():
            postgres_server.start()
        await store.close()


# -- URLs, config, the throwaway server --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:s3cret@db.internal:5432/x402", "postgresql://user@db.internal:5432/x402"),
        ("postgres://u:p@ss@h1:5432,h2:5433/db", "postgres://u@h1:5432,h2:5433/db"),
        ("postgresql://u:pa/ss@h/db", "postgresql://<redacted>@h/db"),
        ("postgresql://u:pa?ss@h/db", "postgresql://<redacted>@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("postgresql://user@h", "postgresql://user@h"),
        ("postgresql://:only-pw@h/db", "postgresql://h/db"),
        ("postgresql://u:x%40y@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        (
            "postgresql:///db?host=/run/pg&password=qq&sslpassword=zz&pass%77ord=w",
            "postgresql:///db?host=/run/pg&password=<redacted>&sslpassword=<redacted>&pass%77ord=<redacted>",
        ),
        ("u:secret@h", "u@h"),
        ("postgresql://u:pw@h/db#frag", "postgresql://u@h/db#<redacted>"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for secret in ("s3cret", "p@ss", "pa/ss", "pa?ss", "only-pw", "x%40y", "qq", "zz", "secret"):
        assert secret not in redact_url(url)


def test_store_url_from_the_environment_and_shown_redacted(tmp_path: Path) -> None:
    url = "postgresql://fleet:pw-in-env@127.0.0.1:5432/x402"
    config = load_config(None, env={"X402_PROXY_STORE__URL": url})
    assert config.store.url == url and config.store.is_postgres
    assert redacted(config)["store"]["url"] == "postgresql://fleet@127.0.0.1:5432/x402"
    assert load_config(None, env={}).store.url == ""  # default: the SQLite file, as before
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    printed = subprocess.run(
        [sys.executable, "-m", "proxy", "--home", str(tmp_path), "config", "check"],
        env={**env, "X402_PROXY_STORE__URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert "pw-in-env" not in printed.stdout and "postgresql://fleet@127.0.0.1:5432/x402" in printed.stdout
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"X402_PROXY_STORE__URL": "mysql://root:hunter2@db/x"})
    assert info.value.key == "store.url" and "hunter2" not in str(info.value)


def test_a_machine_without_postgresql_fails_naming_the_package(tmp_path: Path) -> None:
    with pytest.raises(PostgresMissing) as info:
        find_bin_dir([str(tmp_path)])
    assert "`postgresql` package" in str(info.value)


# -- fleet primitives: single flight per need, the payment lock (both backends) ----------------------


async def test_state_totals_count_and_sum_by_state_and_asset(store: AsyncLedgerStore) -> None:
    assert list(await store.state_totals()) == []
    await row_in(store, PaymentState.SETTLED, amount=10**30)
    await row_in(store, PaymentState.SETTLED, amount=5, asset=ASSET.upper().replace("0X", "0x"))
    await row_in(store, PaymentState.IN_DOUBT, amount=7)
    totals = {
        (t.state, t.network, t.asset, t.decimals): (t.count, t.amount) for t in await store.state_totals()
    }
    assert totals == {
        ("settled", "eip155:84532", ASSET.lower(), 6): (2, 10**30 + 5),
        ("in_doubt", "eip155:84532", ASSET.lower(), 6): (1, 7),
    }
    await store.ping()


async def test_need_lock_is_single_flight_across_two_stores(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    try:
        order: list[str] = []
        entered, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with first.need_lock("GET http://shop.test/paid"):
                order.append("first in")
                entered.set()
                await release.wait()
                order.append("first out")

        async def waiter() -> None:
            await entered.wait()
            async with second.need_lock("GET http://shop.test/paid"):
                order.append("second in")

        tasks = [asyncio.create_task(holder()), asyncio.create_task(waiter())]
        await entered.wait()
        await asyncio.sleep(0.5)
        assert order == ["first in"]  # the second store waits
        async with asyncio.timeout(3):  # another need is not held up
            async with second.need_lock("GET http://shop.test/other"):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["first in", "first out", "second in"]
        # waiting has a limit: StoreError "locked", and the holder is undisturbed
        async with first.need_lock("need C"):
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                async with second.need_lock("need C", timeout=0.5):
                    raise AssertionError("entered a held need")
            assert info.value.kind == "locked" and time.monotonic() - started < 3
        async with asyncio.timeout(3):  # released after all that
            async with second.need_lock("need C"):
                pass
    finally:
        await first.close()
        await second.close()


async def test_a_cancelled_waiter_leaves_no_lock_behind(backend: Backend) -> None:
    first, second = await backend.open(), await backend.open()
    try:
        async with first.need_lock("need D"):
            waiting = asyncio.create_task(second.need_lock("need D").__aenter__())
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        for store in (second, first):
            async with asyncio.timeout(3):
                async with store.need_lock("need D"):
                    pass
    finally:
        await first.close()
        await second.close()


async def test_payment_lock_makes_decide_then_insert_atomic_across_stores(backend: Backend) -> None:
    """Ten payments of 0.01 race from two stores into a budget of 0.03: exactly three rows. Without the lock
    (the control run) every racer sees the budget free and more than three fit."""
    first, second = await backend.open(), await backend.open()
    budget, amount = 30_000, 10_000

    async def attempt(store: AsyncLedgerStore, host: str, locked: bool) -> bool:
        async def decide_and_insert() -> bool:
            spent = await store.spent_since(NOW - 10, host, now=NOW)
            if sum(spent.by_asset.values()) + amount > budget:
                return False
            await asyncio.sleep(0.05)  # a decision takes time: policy, balance, approval
            await store.insert_pending(new_payment(host=host, amount=amount), now=NOW)
            return True

        if not locked:
            return await decide_and_insert()
        async with store.payment_lock():
            return await decide_and_insert()

    try:
        paid = await asyncio.gather(
            *(attempt((first, second)[i % 2], "locked.test", True) for i in range(10))
        )
        assert sum(paid) == 3
        spent = await second.spent_since(NOW - 10, "locked.test", now=NOW)
        assert sum(spent.by_asset.values()) == budget
        control = await asyncio.gather(
            *(attempt((first, second)[i % 2], "free.test", False) for i in range(10))
        )
        assert sum(control) > 3  # the race the lock prevents is real
    finally:
        await first.close()
        await second.close()


async def test_killing_the_lock_holders_connection_releases_its_need(postgres_url: str) -> None:
    first = await PostgresLedgerStore.open(postgres_url)
    second = await PostgresLedgerStore.open(postgres_url)
    admin = await asyncpg.connect(postgres_url)
    try:
        entered, got = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with first.need_lock("need E"):
                entered.set()
                await asyncio.sleep(30)

        async def waiter() -> None:
            async with second.need_lock("need E"):
                got.set()

        held = asyncio.create_task(holder())
        await entered.wait()
        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.5)
        assert not got.is_set()
        # The holder's replica dies (as a SIGKILL would leave it): the server drops its connection.
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.application_name = 'x402-proxy locks' AND l.locktype = 'advisory' AND l.granted"
        )
        assert killed == 1
        async with asyncio.timeout(5):
            await got.wait()
        await waiting
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        async with asyncio.timeout(3):  # the first store takes locks again on a fresh connection
            async with first.need_lock("need E"):
                pass
    finally:
        await admin.close()
        await first.close()
        await second.close()


# -- sessions shared by replicas (both backends; what needs two processes on one database: PostgreSQL) ---


async def open_sessions(
    backend: Backend, ledger: AsyncLedgerStore, secret: bytes = b"k" * 32
) -> AsyncSessionStore:
    if backend.name == "sqlite":
        return ThreadedSessionStore(SqliteSessionStore(Path(backend.location)))
    assert isinstance(ledger, PostgresLedgerStore)
    return await PostgresSessionStore.open(ledger, SessionCipher.from_secret(secret))


def fresh_session(url: str = "https://api.shop.test/v1", ttl: int = 600) -> Session:
    session = Session.create(Scope.from_url(url, "prefix"), now=time.time(), ttl_seconds=ttl)
    session.credentials = SessionCredentials(token_headers={"x-x402-lease": "secret-lease"})
    return session


async def until(condition: Callable[[], bool], within: float) -> float:
    """Seconds until `condition` held; fails after `within`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@dataclass
class Replica:
    ledger: AsyncLedgerStore
    manager: SessionManager
    watcher: asyncio.Task[None]

    async def close(self) -> None:
        self.watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.watcher
        await self.manager.close()
        await self.ledger.close()


async def replica(backend: Backend, **overrides: object) -> Replica:
    ledger = await backend.open()
    store = await open_sessions(backend, ledger)
    for name, value in overrides.items():
        setattr(store, name, value)
    manager = SessionManager(store)
    await manager.restore()
    return Replica(ledger, manager, asyncio.create_task(manager.run_watcher()))


async def test_sessions_are_shared_restored_and_their_calls_add_up(backend: Backend) -> None:
    a, b = await replica(backend), await replica(backend)
    try:
        session = fresh_session()
        a.manager.add(session)
        await a.manager.written()
        stored = await b.manager.fetch(session.id)
        assert stored is not None and stored.credentials == session.credentials
        # calls on both replicas add up (flushed as increments, never overwritten by a save)
        theirs = await b.manager.fetch(session.id)
        assert theirs is not None
        for _ in range(3):
            a.manager.touch(session, time.time())
        for _ in range(2):
            b.manager.touch(theirs, time.time())
        await a.manager.flush_async()
        await b.manager.flush_async()
        a.manager.save(session)  # a later save (a renewal) keeps the counts
        await a.manager.written()
        counted = await b.manager.list_stored()
        assert [s.call_count for s in counted if s.id == session.id] == [5]
        # a restarted replica rebuilds its index from the database
        c = await replica(backend)
        try:
            found = c.manager.match("https://api.shop.test/v1/items")
            assert found is not None and found.id == session.id and found.call_count == 5
        finally:
            await c.close()
        assert await a.manager.count_active() == 1
    finally:
        await a.close()
        await b.close()


async def test_an_end_on_one_replica_reaches_the_others_within_a_second(postgres_url: str) -> None:
    backend = Backend("postgres", postgres_url)
    replicas = [await replica(backend) for _ in range(3)]
    a, others = replicas[0], replicas[1:]
    try:
        session = fresh_session()
        a.manager.add(session)
        await a.manager.written()
        url = "https://api.shop.test/v1/items"
        for other in others:  # opened on one replica: used by all
            await until(lambda o=other: o.manager.match(url) is not None, 1.0)
        held = [o.manager.match(url) for o in others]  # what a request routed just now holds
        await a.manager.end_session(session.id, "ended by admin")
        for other in others:
            took = await until(lambda o=other: o.manager.match(url) is None, 1.0)
            assert took < 1.0
        assert all(
            h is not None and not h.is_active(time.time()) and h.credentials.kinds() == [] for h in held
        )
        # renewed elsewhere: the new credentials replace the old ones
        renewed = fresh_session("https://api.shop.test/v2")
        others[0].manager.add(renewed)
        await others[0].manager.written()
        await until(lambda: a.manager.match("https://api.shop.test/v2/x") is not None, 1.0)
        renewed.credentials = SessionCredentials(token_headers={"x-x402-lease": "second-lease"})
        others[0].manager.renewed(renewed)
        await others[0].manager.written()

        def second_lease() -> bool:
            found = a.manager.match("https://api.shop.test/v2/x")
            return found is not None and found.credentials.token_headers == {"x-x402-lease": "second-lease"}

        await until(second_lease, 1.0)
    finally:
        for r in replicas:
            await r.close()


async def test_without_the_listener_a_poll_still_delivers_the_end(postgres_url: str) -> None:
    backend = Backend("postgres", postgres_url)
    a = await replica(backend)
    # b can never LISTEN (its listener connects to a closed port): only the poll through its pool is left.
    dead = f"postgresql://x402@127.0.0.1:{free_port()}/none"
    b = await replica(backend, url=dead)
    admin = await asyncpg.connect(postgres_url)
    try:
        session = fresh_session()
        a.manager.add(session)
        await a.manager.written()
        url = "https://api.shop.test/v1/items"
        await until(lambda: b.manager.match(url) is not None, 1.0)
        await a.manager.end_session(session.id, "ended by admin")
        assert await until(lambda: b.manager.match(url) is None, 1.0) < 1.0
        # a's listener connection cut: a reconnects (or polls meanwhile) and still sees b's changes
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'x402-proxy sessions listener'"
        )
        other = fresh_session("https://api.shop.test/v3")
        b.manager.add(other)
        await b.manager.written()
        await until(lambda: a.manager.match("https://api.shop.test/v3/x") is not None, 1.5)
    finally:
        await admin.close()
        await a.close()
        await b.close()


async def test_session_documents_are_sealed_at_rest(postgres_url: str) -> None:
    ledger = await PostgresLedgerStore.open(postgres_url)
    try:
        store = await PostgresSessionStore.open(ledger, SessionCipher.from_secret(b"wallet key " * 3))
        session = fresh_session()
        await store.save([session])
        raw = await asyncpg.connect(postgres_url)
        try:
            data = await raw.fetchval("SELECT data FROM sessions WHERE id = $1", session.id)
            # a sealed document copied onto another row does not open
            twin = fresh_session()
            await store.save([twin])
            await raw.execute("UPDATE sessions SET data = $1 WHERE id = $2", data, twin.id)
        finally:
            await raw.close()
        assert (
            data.startswith("x402-sealed-v1:") and "secret-lease" not in data and "api.shop.test" not in data
        )
        assert (await store.get(session.id)).credentials == session.credentials  # type: ignore[union-attr]
        with pytest.raises(StoreError) as info:
            await store.get(twin.id)
        assert info.value.kind == "corrupt"
        other = await PostgresSessionStore.open(ledger, SessionCipher.from_secret(b"another wallet" * 3))
        with pytest.raises(StoreError) as info:
            await other.get(session.id)
        assert info.value.kind == "corrupt" and "secret-lease" not in str(info.value)
    finally:
        await ledger.close()
