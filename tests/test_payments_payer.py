"""Payer: the orchestration, with a real SQLite ledger, real keys and a controllable clock."""

import asyncio
import base64
import json
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from proxy.payments.assets import AssetRegistry
from proxy.payments.networks import NetworkRegistry
from proxy.payments.payer import (
    PassThrough,
    Payer,
    PaymentPlan,
    PaymentRequestInfo,
    Refused,
)
from proxy.payments.policy import PolicyConfig, ReasonCode
from proxy.payments.signer import CLOCK_SKEW_ALLOWANCE
from proxy.payments.wallet import Wallet
from proxy.store.base import NewPayment, PaymentRecord, PaymentState, StoreError
from proxy.store.sqlite import SqliteLedgerStore
from tests.test_payments_fixtures import (
    BASE_SEPOLIA_USDC,
    OTHER_PAY_TO,
    FakeClock,
    b64json,
    decode_header,
    v1_response,
    v2_requirement,
    v2_response,
)

ASSETS = AssetRegistry(NetworkRegistry())
TX = "0x" + "ab" * 32


def request(url: str = "http://shop.test/paid", method: str = "GET", **headers: str) -> PaymentRequestInfo:
    host = url.split("/")[2]
    return PaymentRequestInfo(method, url, host, headers)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteLedgerStore]:
    ledger = SqliteLedgerStore(tmp_path / "state.db")
    yield ledger
    ledger.close()


@pytest.fixture
def wallet() -> Wallet:
    return Wallet(Account.create())


def make_payer(store: SqliteLedgerStore, wallet: Wallet | None, clock: FakeClock, **policy: Any) -> Payer:
    return Payer(PolicyConfig(**policy), ASSETS, wallet, store, clock)


async def pay(payer: Payer, response: tuple[int, dict[str, str], bytes] | None = None, **kw: Any) -> Any:
    status, headers, body = response or v2_response()
    return await payer.on_402(kw.pop("req", request()), status, headers, body, kw.pop("replayable", True))


def receipt(**fields: Any) -> str:
    document = {"success": True, "transaction": TX, "network": "eip155:84532", "payer": "0x" + "12" * 20}
    document.update(fields)
    return b64json(document)


# --- pass through and early refusals -----------------------------------------------------------


@pytest.mark.parametrize("header", ["PAYMENT-SIGNATURE", "x-payment", "Sign-In-With-X"])
async def test_requests_already_carrying_a_credential_pass_through(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock, header: str
) -> None:
    payer = make_payer(store, wallet, clock)
    outcome = await pay(payer, req=request(**{header: "abc"}))
    assert isinstance(outcome, PassThrough)
    assert store.list() == []


async def test_plain_402_passes_through(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    outcome = await make_payer(store, wallet, clock).on_402(request(), 402, {}, b"pay me", True)
    assert isinstance(outcome, PassThrough)


async def test_malformed_challenge_is_refused(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    outcome = await make_payer(store, wallet, clock).on_402(
        request(), 402, {"PAYMENT-REQUIRED": "%%%"}, b"", True
    )
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.MALFORMED_CHALLENGE
    assert store.list() == []


async def test_unreplayable_body_and_missing_wallet(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    outcome = await pay(make_payer(store, wallet, clock), replayable=False)
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.BODY_TOO_LARGE_TO_REPLAY
    outcome = await pay(make_payer(store, None, clock))
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.NO_WALLET
    assert store.list() == []


async def test_policy_refusals_write_no_row(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    outcome = await pay(make_payer(store, wallet, clock, max_per_payment="0.001"))
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.OVER_MAX_PER_PAYMENT
    assert store.list() == []


# --- paying ------------------------------------------------------------------------------------


class OrderedStore(SqliteLedgerStore):
    """Records when the pending row became durable, relative to the key being used to sign."""

    events: list[str]

    def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
        record = super().insert_pending(new, now=now)
        other = sqlite3.connect(self.path)  # a second connection proves it is committed
        (state,) = other.execute("SELECT state FROM payments WHERE id = ?", (record.id,)).fetchone()
        other.close()
        self.events.append(f"row {state}")
        return record


class WatchedWallet(Wallet):
    __slots__ = ("events",)

    def __init__(self, account: LocalAccount, events: list[str]) -> None:
        super().__init__(account)
        self.events = events

    @property
    def account(self) -> LocalAccount:
        self.events.append("key used")
        return super().account


async def test_pending_row_is_durable_before_anything_is_signed(tmp_path: Path, clock: FakeClock) -> None:
    events: list[str] = []
    store = OrderedStore(tmp_path / "state.db")
    store.events = events
    try:
        payer = Payer(PolicyConfig(), ASSETS, WatchedWallet(Account.create(), events), store, clock)
        outcome = await pay(payer)
        assert isinstance(outcome, PaymentPlan)
        assert events[0] == "row pending" and "key used" in events[1:]
    finally:
        store.close()


async def test_v2_plan_and_ledger_row(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    extensions = {"payment-identifier": {"info": {"required": False}}}
    plan = await pay(make_payer(store, wallet, clock), v2_response(extensions=extensions))
    assert isinstance(plan, PaymentPlan)
    assert plan.header_name == "PAYMENT-SIGNATURE"
    document = decode_header(plan.header_value)
    record = store.get(plan.ledger_id)
    assert record is not None and record == plan.record
    assert record.state is PaymentState.PENDING
    assert record.amount == 10_000 and record.decimals == 6 and record.asset == BASE_SEPOLIA_USDC
    assert record.network == "eip155:84532" and record.host == "shop.test" and record.method == "GET"
    assert record.nonce == document["payload"]["authorization"]["nonce"]
    assert (
        record.valid_before == int(document["payload"]["authorization"]["validBefore"]) == plan.valid_before
    )
    assert record.payment_id == document["extensions"]["payment-identifier"]["info"]["id"]
    assert record.payer == wallet.address and record.resource == "http://shop.test/paid"


async def test_v1_plan_uses_x_payment(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    plan = await pay(make_payer(store, wallet, clock), v1_response())
    assert isinstance(plan, PaymentPlan) and plan.header_name == "X-PAYMENT"
    assert plan.record.x402_version == 1 and plan.record.payment_id is None


async def test_permit2_nonce_is_recorded_before_the_plan_is_returned(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    clock.now = time.time()  # the SDK's Permit2 builder reads the real clock
    requirement = v2_requirement(extra={"assetTransferMethod": "permit2"})
    plan = await pay(make_payer(store, wallet, clock), v2_response(requirement))
    assert isinstance(plan, PaymentPlan)
    auth = decode_header(plan.header_value)["payload"]["permit2Authorization"]
    stored = store.get(plan.ledger_id)
    assert (
        stored is not None and stored.nonce == auth["nonce"] and stored.valid_before == int(auth["deadline"])
    )


async def test_signing_failure_marks_the_row_and_refuses(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    broken = v2_requirement(scheme="upto", extra={"facilitatorAddress": "0x1234"})  # not an address
    outcome = await pay(make_payer(store, wallet, clock, enable_upto=True), v2_response(broken))
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.SCHEME_NOT_SUPPORTED
    (row,) = store.list()
    assert row.state is PaymentState.REJECTED and row.reason and row.reason.startswith("not signed")
    assert store.spent_since(0, now=clock()).count == 0


async def test_store_failure_means_nothing_is_signed(
    tmp_path: Path, wallet: Wallet, clock: FakeClock
) -> None:
    class FailingStore(SqliteLedgerStore):
        def insert_pending(self, new: NewPayment, *, now: float | None = None) -> PaymentRecord:
            raise StoreError("disk full: cannot write ledger", "full")

    store = FailingStore(tmp_path / "state.db")
    try:
        with pytest.raises(StoreError):
            await pay(Payer(PolicyConfig(), ASSETS, wallet, store, clock))
    finally:
        store.close()


# --- outcomes ----------------------------------------------------------------------------------


async def test_settlement_receipt_marks_settled(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    record = await payer.record_response(plan, 200, {"payment-response": receipt(extraField={"x": 1})})
    assert record.state is PaymentState.SETTLED and record.tx_hash == TX and record.payer == "0x" + "12" * 20
    # a second report does not corrupt the row
    assert (await payer.record_response(plan, 500, {})).state is PaymentState.SETTLED


async def test_v1_receipt_header_and_lenient_parsing(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer, v1_response())
    raw = json.dumps({"success": "true", "transaction": TX, "network": "base-sepolia"}).encode()
    value = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    record = await payer.record_response(plan, 200, {"X-PAYMENT-RESPONSE": value})
    assert record.state is PaymentState.SETTLED and record.tx_hash == TX


async def test_second_402_marks_rejected_with_the_server_reason(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    status, headers, _ = v2_response(error="invalid_exact_evm_payload_signature")
    record = await payer.record_response(plan, status, headers)
    assert record.state is PaymentState.REJECTED and record.reason == "invalid_exact_evm_payload_signature"

    plan = await pay(payer, v1_response())
    body = json.dumps({"x402Version": 1, "error": "insufficient_funds", "accepts": []}).encode()
    record = await payer.record_response(plan, 402, {}, body)
    assert record.state is PaymentState.REJECTED and record.reason == "insufficient_funds"

    plan = await pay(payer)
    failed = receipt(success=False, errorReason="transaction_failed", transaction="")
    record = await payer.record_response(plan, 402, {"PAYMENT-RESPONSE": failed})
    assert record.state is PaymentState.REJECTED and record.reason == "transaction_failed"


async def test_error_without_receipt_is_unsettled_and_success_without_receipt_in_doubt_delivered(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    record = await payer.record_response(plan, 500, {"PAYMENT-RESPONSE": "garbage!!"})
    assert record.state is PaymentState.UNSETTLED and "500" in (record.reason or "")
    plan = await pay(payer)
    record = await payer.record_response(plan, 200, {})
    # Served without a receipt: the need was met, whether money moved only the chain can say.
    assert (
        record.state is PaymentState.IN_DOUBT and record.tx_hash is None and "without" in (record.reason or "")
    )
    assert record.delivered  # delivered: it does not block the next purchase of that URL
    assert isinstance(await pay(payer), PaymentPlan)


async def test_transport_failure_is_unknown_and_blocks_repaying_until_it_expires(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    record = await payer.record_transport_failure(plan, TimeoutError("read timed out"))
    assert record.state is PaymentState.IN_DOUBT and "TimeoutError" in (record.reason or "")

    again = await pay(payer)
    assert isinstance(again, Refused) and again.reason_code is ReasonCode.PAYMENT_IN_DOUBT
    assert f"#{plan.ledger_id}" in again.detail
    # another URL, or another method, is another need
    assert isinstance(await pay(payer, req=request("http://shop.test/other")), PaymentPlan)
    assert isinstance(await pay(payer, req=request(method="POST")), PaymentPlan)
    # once the authorization has expired (plus skew margin) it can no longer settle: pay again
    clock.now = plan.valid_before + CLOCK_SKEW_ALLOWANCE + 1
    assert isinstance(await pay(payer), PaymentPlan)


async def test_recover_turns_pending_into_unknown(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    # process restarts: a new Payer over the same ledger
    recovered = await make_payer(store, wallet, clock).recover()
    assert [r.id for r in recovered] == [plan.ledger_id]
    refused = await pay(payer)
    assert isinstance(refused, Refused) and refused.reason_code is ReasonCode.PAYMENT_IN_DOUBT


# --- budgets -----------------------------------------------------------------------------------


async def test_budget_counts_pending_settled_and_unknown(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock, daily_budget="0.03", per_host_daily_budget="1")
    first = await pay(payer, req=request("http://a.test/1"))  # stays pending
    second = await pay(payer, req=request("http://b.test/2"))
    await payer.record_response(second, 200, {"PAYMENT-RESPONSE": receipt()})
    third = await pay(payer, req=request("http://c.test/3"))
    await payer.record_transport_failure(third, "reset")
    assert all(isinstance(p, PaymentPlan) for p in (first, second, third))
    refused = await pay(payer, req=request("http://d.test/4"))
    assert isinstance(refused, Refused) and refused.reason_code is ReasonCode.BUDGET_EXHAUSTED
    # a rejected payment frees its share of the budget once its authorization can no longer settle
    fresh = await make_payer(store, wallet, clock, daily_budget="0.04", per_host_daily_budget="1").on_402(
        request("http://e.test/5"), *v2_response(), True
    )
    assert isinstance(fresh, PaymentPlan)
    await payer.record_response(fresh, 402, {})
    payer4 = make_payer(store, wallet, clock, daily_budget="0.04", per_host_daily_budget="1")
    refused = await pay(payer4, req=request("http://f.test/6"))
    assert isinstance(refused, Refused) and refused.reason_code is ReasonCode.BUDGET_EXHAUSTED
    clock.advance(fresh.valid_before - clock() + 1)
    assert isinstance(await pay(payer4, req=request("http://f.test/6")), PaymentPlan)
    # the window is rolling: a day later everything is available again
    clock.advance(24 * 3600 + 1)
    assert isinstance(await pay(payer, req=request("http://g.test/7")), PaymentPlan)


async def test_per_host_budget(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    payer = make_payer(store, wallet, clock, per_host_daily_budget="0.02")
    for path in ("1", "2"):
        assert isinstance(await pay(payer, req=request(f"http://shop.test/{path}")), PaymentPlan)
    refused = await pay(payer, req=request("http://SHOP.test:443/3"))  # same host, other spelling
    assert isinstance(refused, Refused) and refused.reason_code is ReasonCode.BUDGET_EXHAUSTED
    assert isinstance(await pay(payer, req=request("http://other.test/1")), PaymentPlan)


async def test_concurrent_402s_cannot_both_fit_a_budget_for_one(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    started = 0

    async def slow_balance(network: str, asset: str) -> int:
        # Both calls are inside on_402 at the same time before either reaches the ledger.
        nonlocal started
        started += 1
        while started < 2:
            await asyncio.sleep(0.001)
        return 10**12

    payer = Payer(
        PolicyConfig(daily_budget="0.015"), ASSETS, wallet, store, clock, balance_lookup=slow_balance
    )
    outcomes = await asyncio.gather(
        pay(payer, req=request("http://shop.test/a")), pay(payer, req=request("http://shop.test/b"))
    )
    plans = [o for o in outcomes if isinstance(o, PaymentPlan)]
    refusals = [o for o in outcomes if isinstance(o, Refused)]
    assert len(plans) == 1 and len(refusals) == 1
    assert refusals[0].reason_code is ReasonCode.BUDGET_EXHAUSTED
    assert len(store.list(state=PaymentState.PENDING)) == 1


async def test_many_concurrent_requests_never_exceed_the_budget(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    payer = make_payer(store, wallet, clock, daily_budget="0.10", per_host_daily_budget="1")
    outcomes = await asyncio.gather(*(pay(payer, req=request(f"http://shop.test/{i}")) for i in range(30)))
    assert sum(isinstance(o, PaymentPlan) for o in outcomes) == 10
    assert store.spent_since(0, now=clock()).by_asset == {
        ("eip155:84532", BASE_SEPOLIA_USDC.lower(), 6): 100_000
    }


# --- balance and dry run -----------------------------------------------------------------------


async def test_balance_lookup(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    asked: list[tuple[str, str]] = []

    async def low(network: str, asset: str) -> int:
        asked.append((network, asset))
        return 9_999

    payer = Payer(PolicyConfig(), ASSETS, wallet, store, clock, balance_lookup=low)
    outcome = await pay(payer)
    assert isinstance(outcome, Refused) and outcome.reason_code is ReasonCode.INSUFFICIENT_BALANCE
    assert asked == [("eip155:84532", BASE_SEPOLIA_USDC.lower())]

    async def broken(network: str, asset: str) -> int:
        raise ConnectionError("rpc down")

    async def hanging(network: str, asset: str) -> int:
        await asyncio.sleep(10)
        return 0

    for lookup in (broken, hanging):
        payer = Payer(
            PolicyConfig(), ASSETS, wallet, store, clock, balance_lookup=lookup, balance_timeout=0.05
        )
        assert isinstance(await pay(payer, req=request(f"http://shop.test/{lookup.__name__}")), PaymentPlan)


async def test_dry_run_records_and_refuses_without_a_wallet(
    store: SqliteLedgerStore, clock: FakeClock
) -> None:
    payer = make_payer(store, None, clock, dry_run=True, daily_budget="0.02", per_host_daily_budget="1")
    first = await pay(payer)
    assert isinstance(first, Refused) and first.reason_code is ReasonCode.DRY_RUN
    assert "would pay 0.01 USDC" in first.detail
    row = store.get(first.ledger_id or 0)
    assert row is not None and row.state is PaymentState.DRY_RUN and row.nonce is None
    await pay(payer, req=request("http://other.test/x"))
    # the simulation counts its own spending, so it shows when the budget would run out
    third = await pay(payer, req=request("http://third.test/x"))
    assert isinstance(third, Refused) and third.reason_code is ReasonCode.BUDGET_EXHAUSTED
    # ...but simulated spending never counts against a real budget
    assert store.spent_since(0, now=clock()).count == 0


# --- speed -------------------------------------------------------------------------------------


async def test_on_402_latency(store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock) -> None:
    payer = make_payer(store, wallet, clock, daily_budget="1000", per_host_daily_budget="1000")
    status, headers, body = v2_response(v2_requirement(payTo=OTHER_PAY_TO))
    timings = []
    for i in range(200):
        started = time.perf_counter()
        plan = await payer.on_402(request(f"http://shop.test/{i}"), status, headers, body, True)
        timings.append(time.perf_counter() - started)
        assert isinstance(plan, PaymentPlan)
    median_ms = statistics.median(timings) * 1000
    print(f"on_402 median {median_ms:.2f} ms over 200 calls")
    assert median_ms < 100


async def test_a_lone_surrogate_in_the_servers_text_is_recorded_not_raised(
    store: SqliteLedgerStore, wallet: Wallet, clock: FakeClock
) -> None:
    # JSON may carry "\ud800", which no UTF-8 database can store: the outcome must still be written.
    payer = make_payer(store, wallet, clock)
    plan = await pay(payer)
    failed = receipt(success=False, errorReason="bad \ud800 reason", transaction="")
    record = await payer.record_response(plan, 402, {"PAYMENT-RESPONSE": failed})
    assert record.state is PaymentState.REJECTED and record.reason == "bad ? reason"
    plan = await pay(payer)
    record = await payer.record_transport_failure(plan, "reset \udfff")
    assert record.state is PaymentState.IN_DOUBT and "reset ?" in (record.reason or "")
