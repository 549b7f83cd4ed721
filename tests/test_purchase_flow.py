"""The purchase flow in its order, without sockets: a real payer, SQLite ledger, keys and session
manager; the carrier is a scripted in-process one (the flow's only view of a transport is the Carrier
interface, so this is the transport, not a stand-in for a system we could run)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from proxy.engine.upstream import UpstreamError
from proxy.payments.assets import AssetRegistry
from proxy.payments.challenge import parse_challenge
from proxy.payments.networks import NetworkRegistry
from proxy.payments.payer import (
    Payer,
    PaymentPlan,
    PaymentRequestInfo,
    Refused,
    Verdict,
)
from proxy.payments.policy import PolicyConfig, ReasonCode
from proxy.payments.refusals import RefusalRecorder
from proxy.payments.wallet import Wallet
from proxy.purchase.flow import PurchaseFlow
from proxy.purchase.order import ChallengeRead, Order, Presented
from proxy.sessions.keeper import SessionKeeper
from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session
from proxy.sessions.scope import Scope, normalize_url
from proxy.sessions.settings import SessionSettings
from proxy.store.base import PaymentState, StoreError
from proxy.store.session_store import SqliteSessionStore
from proxy.store.sqlite import SqliteLedgerStore
from tests.test_payments_fixtures import FakeClock, v2_response

ASSETS = AssetRegistry(NetworkRegistry())
TX = "0x" + "cd" * 32
URL = "http://shop.test/api/item"


@dataclass
class Script:
    """A carrier that answers as told and notes what the flow asked of it."""

    verdict: Verdict = field(default_factory=lambda: Verdict(PaymentState.SETTLED, TX, delivered=True))
    fail: BaseException | None = None
    session_answers: bool = True
    calls: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None
    seen_state_at_present: list[PaymentState] = field(default_factory=list)
    ledger: SqliteLedgerStore | None = None

    async def challenge(self) -> ChallengeRead:
        self.calls.append("challenge")
        status, headers, body = v2_response()
        challenge = parse_challenge(status, headers, body, ASSETS.networks)
        assert challenge is not None
        return challenge

    def evidence(self) -> tuple[Mapping[str, str], bytes]:
        _status, headers, body = v2_response()
        return headers, body

    async def with_session(self, session: Session) -> bool:
        self.calls.append(f"with_session {session.id}")
        return self.session_answers

    async def present(self, plan: PaymentPlan) -> Presented[str]:
        self.calls.append(f"present #{plan.ledger_id}")
        if self.ledger is not None:
            row = self.ledger.get(plan.ledger_id)
            assert row is not None
            self.seen_state_at_present.append(row.state)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Presented("paid answer", self.verdict, [("x-x402-lease", "lease-1")], success=True)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedgerStore]:
    store = SqliteLedgerStore(tmp_path / "state.db")
    yield store
    store.close()


def build(
    tmp_path: Path, ledger: SqliteLedgerStore, *, wallet: bool = True, sessions: bool = True
) -> tuple[PurchaseFlow, SessionManager | None]:
    clock = FakeClock()
    payer = Payer(PolicyConfig(), ASSETS, Wallet(Account.create()) if wallet else None, ledger, clock)
    recorder = RefusalRecorder(None, ASSETS, clock)
    if not sessions:
        return PurchaseFlow(payer, recorder), None
    manager = SessionManager(SqliteSessionStore(tmp_path / "state.db"), clock=clock)
    keeper = SessionKeeper(manager, SessionSettings(), payer.wallet, payer.store, clock)
    return PurchaseFlow(payer, recorder, keeper), manager


def session_order() -> Order:
    url = normalize_url(URL)
    scope = Scope.from_url(url, "prefix")
    info = PaymentRequestInfo("GET", URL, "shop.test", {}, need=f"scope {scope.key}")
    return Order(info, scope=scope, url=url)


async def test_a_paid_order_signs_once_saves_its_session_then_finalises_the_row(
    tmp_path: Path, ledger: SqliteLedgerStore
) -> None:
    flow, manager = build(tmp_path, ledger)
    assert manager is not None
    states_when_saved: list[PaymentState] = []
    add = manager.add

    def noting_add(session: Session) -> None:
        states_when_saved.append(ledger.list()[0].state)
        add(session)

    manager.add = noting_add  # type: ignore[method-assign]
    carrier = Script(ledger=ledger)
    purchase = await flow.buy(session_order(), carrier)

    assert carrier.calls == ["challenge", f"present #{purchase.record.id if purchase.record else 0}"]
    assert carrier.seen_state_at_present == [PaymentState.PENDING]  # durable before it left
    assert states_when_saved == [PaymentState.PENDING]  # the session comes before the final row
    assert purchase.answer == "paid answer" and purchase.refusal is None
    assert purchase.record is not None and purchase.record.state is PaymentState.SETTLED
    assert purchase.session is not None and purchase.session.payment_ids == [purchase.record.id]
    assert purchase.session.credentials.token_headers == {"x-x402-lease": "lease-1"}
    assert ledger.get(purchase.record.id).session_id == purchase.session.id  # type: ignore[union-attr]


async def test_concurrent_orders_for_one_need_pay_once_and_the_second_uses_the_session(
    tmp_path: Path, ledger: SqliteLedgerStore
) -> None:
    flow, _ = build(tmp_path, ledger)
    gate = asyncio.Event()
    first, second = Script(gate=gate), Script()
    one = asyncio.create_task(flow.buy(session_order(), first))
    await asyncio.sleep(0.05)
    two = asyncio.create_task(flow.buy(session_order(), second))
    await asyncio.sleep(0.05)
    assert second.calls == []  # waiting its turn: the single flight per need
    gate.set()
    bought, reused = await one, await two
    assert len(ledger.list()) == 1
    assert bought.session is not None and reused.reused and reused.session is bought.session
    assert second.calls == [f"with_session {bought.session.id}"]  # no challenge read, nothing signed


async def test_a_reused_session_that_is_refused_is_renewed_by_this_order(
    tmp_path: Path, ledger: SqliteLedgerStore
) -> None:
    flow, _ = build(tmp_path, ledger)
    bought = await flow.buy(session_order(), Script())
    refused_credentials = Script(session_answers=False)
    renewed = await flow.buy(session_order(), refused_credentials)
    assert bought.session is not None and renewed.session is bought.session
    assert refused_credentials.calls[0] == f"with_session {bought.session.id}"
    assert len(bought.session.payment_ids) == 2 and bought.session.renewals == 1


async def test_a_transport_failure_after_sending_is_in_doubt_and_raises(
    tmp_path: Path, ledger: SqliteLedgerStore
) -> None:
    flow, manager = build(tmp_path, ledger)
    assert manager is not None
    failure = UpstreamError(502, "upstream_disconnected", "gone")
    with pytest.raises(UpstreamError):
        await flow.buy(session_order(), Script(fail=failure))
    (row,) = ledger.list()
    assert row.state is PaymentState.IN_DOUBT and "upstream_disconnected: gone" in (row.reason or "")
    assert manager.active() == []  # nothing delivered, no session


async def test_a_refusal_is_put_on_record_and_nothing_is_presented(
    tmp_path: Path, ledger: SqliteLedgerStore
) -> None:
    flow, _ = build(tmp_path, ledger, wallet=False)
    carrier = Script()
    purchase = await flow.buy(session_order(), carrier)
    assert isinstance(purchase.refusal, Refused) and purchase.refusal.reason_code is ReasonCode.NO_WALLET
    assert {k: v for k, v in flow.refusals.counts.items() if v} == {"no_wallet": 1}
    assert carrier.calls == ["challenge"] and ledger.list() == []


async def test_an_outcome_the_ledger_cannot_write_is_handed_over_unrecorded(
    tmp_path: Path, ledger: SqliteLedgerStore, monkeypatch: Any
) -> None:
    flow, _ = build(tmp_path, ledger, sessions=False)

    async def broken(*_args: Any, **_kw: Any) -> Any:
        raise StoreError("disk full")

    monkeypatch.setattr(flow.payer.store, "mark_settled", broken)  # a fault we cannot provoke on demand
    info = PaymentRequestInfo("GET", URL, "shop.test", {})
    purchase = await flow.buy(Order(info), Script())
    assert purchase.unrecorded and purchase.answer == "paid answer" and purchase.record is None
    (row,) = ledger.list()
    assert row.state is PaymentState.PENDING  # at the next start: in doubt, never paid again meanwhile
    again = await flow.buy(Order(info), Script())
    assert isinstance(again.refusal, Refused) and again.refusal.reason_code is ReasonCode.PAYMENT_IN_DOUBT
