"""Unknown payments reconciled from the chain (proxy/payments/reconcile.py), on the real stack.

- A payment killed after the server settled it is `unknown` at restart, then `settled` by the startup pass
  with the transaction that moved the money (checked against the chain and the server that settled it);
  a retry is still refused while the authorization is valid (paid, but the client never got the answer).
- A payment killed before it was signed becomes `rejected` (never moved) once the chain's time passes its
  validBefore, and a retry pays. For that, [rpc] points at a private anvil (same deployer, so TestUSDC has the same address)
  whose clock the test moves: the session's shared chain keeps wall-clock time for every other test, and the
  local clock still says "valid", so the verdict can only come from the chain's block time.
- A network without an [rpc] URL keeps its rows unknown, and the in-doubt refusal with them.
- Passes on a real ledger against real endpoints: unreachable, another chain, a nonce cancelled on chain
  (used, but no AuthorizationUsed log), a Permit2 nonce.
- The decision function, the store transitions and the config key on their own.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3.logs import DISCARD

from proxy.config import ConfigError, load_config
from proxy.faults import FAULT_PAUSE_ENV
from proxy.payments.reconcile import (
    ChainFacts,
    Outcome,
    Reconciler,
    decide,
    ledger_reason,
    uncheckable,
)
from proxy.store.base import RECONCILED_USED, ChainState, NewPayment, PaymentRecord, PaymentState, StoreError
from proxy.store.sqlite import SqliteLedgerStore
from tests.stack import PAYER, Stack
from tests.stack._proc import free_port
from tests.stack.chain import DEPLOYER, Chain, start_chain
from tests.support.crash import (
    ERROR,
    PAYMENT,
    TIMEOUT,
    assert_ledger_matches_chain,
    get,
    in_background,
    receipt_using_authorization,
    wait_for,
)
from tests.support.paying_proxy import ledger, stack_config
from tests.support.proxy_process import ProxyProcess

# Fixtures from tests/conftest.py: `home` (a fresh proxy home) and `running` (proxies SIGKILLed at teardown).

RECONCILE_EVERY_SECOND = "[reconcile]\ninterval = 1\n"
RECONCILE_LOGGER = "x402_proxy.reconcile"


# -- helpers ----------------------------------------------------------------------------------------


def config_with_rpc(stack: Stack, rpc_url: str | None) -> str:
    """The stack's paying config, passes every second, [rpc] for the stack's network -> `rpc_url` (or none)."""
    text = stack_config(stack, extra=RECONCILE_EVERY_SECOND)
    line = f'"{stack.network_v2}" = "{stack.rpc_url}"\n'
    assert line in text
    text = text.replace(line, "" if rpc_url is None else f'"{stack.network_v2}" = "{rpc_url}"\n')
    assert (stack.rpc_url in text) is (rpc_url == stack.rpc_url)
    return text


def crash_at(proxy: ProxyProcess, fault: str, url: str) -> None:
    """Start the proxy paused at `fault`, send the paid request, SIGKILL the proxy there."""
    proxy.env[FAULT_PAUSE_ENV] = fault
    proxy.start()
    thread, outcome = in_background(proxy, url)
    marker = f"fault point reached: {fault}"
    wait_for(lambda: marker in proxy.log_text(), 30, marker)
    proxy.stop(signal.SIGKILL)
    thread.join(TIMEOUT)
    assert "error" in outcome, f"the client got an answer from a killed proxy: {outcome}"
    proxy.env.pop(FAULT_PAUSE_ENV)


def only_row(proxy: ProxyProcess) -> dict[str, Any]:
    rows = ledger(proxy)
    assert len(rows) == 1, rows
    return rows[0]


def paid_to(stack: Stack, before: int) -> int:
    return stack.balance_of(stack.pay_to) - before


@pytest.fixture
def private_chain(tmp_path: Path) -> Iterator[Chain]:
    """A second anvil with TestUSDC at the shared chain's address; its clock is the test's to move."""
    chain = start_chain(tmp_path / "private-chain")
    yield chain
    chain.stop()


# -- on the real stack, through the real proxy ------------------------------------------------------


def test_answered_payment_is_settled_from_chain_with_its_transaction(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    stack = x402_stack
    before = stack.balance_of(stack.pay_to)
    url = f"{stack.py}/paid/b"
    # The default interval (60 s): only the startup pass can resolve the row within this test.
    proxy = ProxyProcess(home, stack_config(stack), {"X402_PROXY_PRIVATE_KEY": stack.payer_key})
    running.append(proxy)

    crash_at(proxy, "payment.answered", url)  # the server settled and answered; nothing recorded
    wait_for(lambda: paid_to(stack, before) == stack.price, 30, "the settlement on chain", 0.25)
    assert only_row(proxy)["state"] == "pending"

    proxy.start()
    wait_for(lambda: only_row(proxy)["state"] != "in_doubt", 30, "the startup pass to resolve the row", 0.1)
    row = only_row(proxy)
    assert f"payment #{row['id']} was pending at shutdown" in proxy.log_text()  # it was unknown first
    assert row["state"] == "settled_undelivered", row  # the money moved, its answer never arrived
    assert row["chain_state"] == "used"
    assert row["reason"].startswith("reconciled from chain: authorization used in tx ")
    assert row["reason"].endswith("was in_doubt: the proxy stopped before the outcome was recorded")

    # The hash is the transaction that used this authorization and moved this amount to payTo.
    tx = row["tx_hash"]
    receipt = receipt_using_authorization(stack.chain, stack.payer_address, row)
    transfers = stack.chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e["args"]["from"], e["args"]["to"], e["args"]["value"]) for e in transfers] == [
        (stack.payer_address, stack.pay_to, int(row["amount"]))
    ]
    settled_by_server = [str(s["transaction"]).lower() for s in stack.server_stats(stack.py)["settlements"]]
    assert tx.lower() in settled_by_server
    assert f"payment #{row['id']}: reconciled from chain" in proxy.log_text()

    rows = assert_ledger_matches_chain(stack, proxy, before)
    assert paid_to(stack, before) == sum(
        int(r["amount"]) for r in rows if r["state"] in ("settled", "settled_undelivered")
    )
    assert f"payment #{row['id']} settled_undelivered:" in proxy.log_text() and tx in proxy.log_text()

    # Settled, but the answer it bought never reached the client: a retry is refused, as it was while
    # the row was in doubt (never twice for one need; [policy] repay_undelivered is off).
    retry = get(proxy, url)
    assert retry.status_code == 402 and retry.headers[ERROR] == "payment_undelivered", retry.headers
    assert f"payment_undelivered (payment #{row['id']} for this request" in proxy.log_text()
    assert paid_to(stack, before) == stack.price and len(ledger(proxy)) == 1
    assert proxy.stop(signal.SIGTERM) == 0


def test_unsent_payment_never_moved_once_chain_time_passes_valid_before(
    x402_stack: Stack, private_chain: Chain, home: Path, running: list[ProxyProcess]
) -> None:
    stack = x402_stack
    assert private_chain.token_address == stack.token  # same deployer and nonce: same contract address
    before = stack.balance_of(stack.pay_to)
    url = f"{stack.py}/paid/b"
    proxy = ProxyProcess(home, stack_config(stack), {"X402_PROXY_PRIVATE_KEY": stack.payer_key})
    running.append(proxy)
    crash_at(proxy, "payment.pending_written", url)  # row durable, nothing signed or sent

    proxy.config_path.write_text(config_with_rpc(stack, private_chain.rpc_url))
    proxy.start()
    row = only_row(proxy)
    marker = f"payment #{row['id']} stays in doubt: authorization unused at block"
    wait_for(lambda: marker in proxy.log_text(), 30, "the startup pass to find the row still valid")
    assert only_row(proxy)["state"] == "in_doubt"
    refused = get(proxy, url)  # still in doubt: the authorization could still settle
    assert refused.status_code == 402 and refused.headers[ERROR] == "payment_in_doubt"

    # The chain's time reaches validBefore; the local clock does not.
    valid_before = int(row["valid_before"])
    assert time.time() < valid_before and private_chain.latest_timestamp() < valid_before
    private_chain.set_next_block_timestamp(valid_before)
    private_chain.mine()
    assert private_chain.latest_timestamp() == valid_before  # "at or before" the block time: expired
    wait_for(lambda: only_row(proxy)["state"] != "in_doubt", 30, "a periodic pass to resolve the row", 0.1)
    row = only_row(proxy)
    assert row["state"] == "rejected" and row["tx_hash"] is None, row
    assert row["reason"].startswith("reconciled from chain: never moved; authorization unused at block")
    assert f"validBefore {valid_before} <= block time {valid_before}" in row["reason"]
    assert time.time() < valid_before  # decided by the chain's clock alone

    # Nothing moved on the shared chain either.
    assert not stack.chain.authorization_state(stack.payer_address, row["nonce"])
    assert paid_to(stack, before) == 0

    # The refusal follows the new state: with the shared chain's RPC again, the same request pays.
    assert proxy.stop(signal.SIGTERM) == 0
    proxy.config_path.write_text(stack_config(stack))
    proxy.start()
    retry = get(proxy, url)
    assert retry.status_code == 200 and PAYMENT in retry.headers, retry.headers
    assert time.time() < valid_before  # the old row had not expired by the local clock
    rows = assert_ledger_matches_chain(stack, proxy, before)
    assert [r["state"] for r in rows] == ["rejected", "settled"]
    assert paid_to(stack, before) == stack.price == int(rows[1]["amount"])
    assert proxy.stop(signal.SIGTERM) == 0


def test_network_without_rpc_keeps_rows_unknown_and_in_doubt(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    stack = x402_stack
    before = stack.balance_of(stack.pay_to)
    url = f"{stack.py}/paid/b"
    proxy = ProxyProcess(home, config_with_rpc(stack, None), {"X402_PROXY_PRIVATE_KEY": stack.payer_key})
    running.append(proxy)
    crash_at(proxy, "payment.answered", url)  # money moved: with an RPC the row would be settled
    wait_for(lambda: paid_to(stack, before) == stack.price, 30, "the settlement on chain", 0.25)

    proxy.start()
    row = only_row(proxy)
    marker = f"payments #{row['id']} on {stack.network_v2} stay unresolved: no [rpc] URL"
    wait_for(lambda: marker in proxy.log_text(), 30, "the startup pass to skip the row")
    time.sleep(2.5)  # two or three more passes (interval 1 s)
    assert proxy.log_text().count("no [rpc] URL") == 1  # said once, not every pass
    row = only_row(proxy)
    assert row["state"] == "in_doubt" and row["tx_hash"] is None, row
    assert stack.chain.authorization_state(stack.payer_address, row["nonce"])  # the chain would have said

    refused = get(proxy, url)
    assert refused.status_code == 402 and refused.headers[ERROR] == "payment_in_doubt"
    assert paid_to(stack, before) == stack.price
    assert_ledger_matches_chain(stack, proxy, before)
    assert proxy.stop(signal.SIGTERM) == 0


# -- passes on a real ledger against real endpoints ---------------------------------------------------


def unknown_row(store: SqliteLedgerStore, stack: Stack, **overrides: Any) -> PaymentRecord:
    now = time.time()
    new = NewPayment(
        amount=stack.price,
        decimals=stack.token_decimals,
        asset=stack.token,
        network=stack.network_v2,
        pay_to=stack.pay_to,
        host="shop.test",
        method="GET",
        url="http://shop.test/paid",
        x402_version=2,
        scheme="exact",
        nonce="0x" + os.urandom(32).hex(),
        valid_before=int(now) + 400,
        payer=stack.payer_address,
    )
    record = store.insert_pending(replace(new, **overrides), now=now)
    return store.mark_in_doubt(record.id, reason="transport failure after sending payment: test")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteLedgerStore]:
    ledger_store = SqliteLedgerStore(tmp_path / "state.db")
    yield ledger_store
    ledger_store.close()


async def test_unreachable_rpc_leaves_rows_untouched(
    store: SqliteLedgerStore, x402_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Long expired by the local clock: only the chain may say so, and it cannot be reached.
    row = unknown_row(store, x402_stack, valid_before=int(time.time()) - 3600)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    with caplog.at_level(logging.INFO, RECONCILE_LOGGER):
        report = await Reconciler(store, {x402_stack.network_v2: closed}).run_once()
    assert report.errors == [row.id] and not report.settled and not report.never_moved
    assert store.get(row.id) == row
    assert f"cannot reconcile payments on {x402_stack.network_v2} now" in caplog.text


async def test_rpc_of_another_chain_is_not_trusted(
    store: SqliteLedgerStore, x402_stack: Stack, private_chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    # A row on Ethereum (chain id 1) whose [rpc] URL serves chain 84532, where the nonce is unused and
    # validBefore long past: trusting it would declare a payment that may have moved "never moved".
    row = unknown_row(store, x402_stack, network="eip155:1", valid_before=1)
    with caplog.at_level(logging.INFO, RECONCILE_LOGGER):
        report = await Reconciler(store, {"eip155:1": private_chain.rpc_url}).run_once()
    assert report.errors == [row.id]
    assert store.get(row.id) == row
    assert "serves chain id 84532, not 1" in caplog.text


def cancel_authorization(chain: Chain, key: str, nonce: str) -> None:
    """The payer cancels an authorization on chain: the nonce becomes used without any transfer."""
    account = Account.from_key(key)
    signed = Account.sign_typed_data(
        key,
        {"name": "USDC", "version": "2", "chainId": chain.chain_id, "verifyingContract": chain.token_address},
        {
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        {"authorizer": account.address, "nonce": bytes.fromhex(nonce[2:])},
    )
    cancel = chain.token.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    tx = cancel(account.address, bytes.fromhex(nonce[2:]), bytes(signed.signature)).transact(
        {"from": DEPLOYER.address}
    )
    assert chain.w3.eth.wait_for_transaction_receipt(tx, timeout=30)["status"] == 1


async def test_used_nonce_without_log_is_settled_without_a_hash(
    store: SqliteLedgerStore, x402_stack: Stack, private_chain: Chain
) -> None:
    row = unknown_row(store, x402_stack, payer=PAYER.address, asset=private_chain.token_address)
    cancel_authorization(private_chain, PAYER.key, str(row.nonce))
    assert private_chain.authorization_state(PAYER.address, str(row.nonce))
    report = await Reconciler(store, {x402_stack.network_v2: private_chain.rpc_url}).run_once()
    assert report.undelivered == [row.id]  # used, and its answer never reached the client
    after = store.get(row.id)
    assert after is not None and after.state is PaymentState.SETTLED_UNDELIVERED and after.tx_hash is None
    assert "no AuthorizationUsed log was found" in (after.reason or "")
    assert "transaction hash is unknown" in (after.reason or "")


async def test_rows_the_token_cannot_answer_for_stay_unknown(
    store: SqliteLedgerStore, x402_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    permit2 = unknown_row(store, x402_stack, nonce="12345678901234567890", valid_before=1)
    no_payer = unknown_row(store, x402_stack, payer=None, valid_before=1)
    with caplog.at_level(logging.INFO, RECONCILE_LOGGER):
        reconciler = Reconciler(store, {x402_stack.network_v2: x402_stack.rpc_url})
        report = await reconciler.run_once()
        await reconciler.run_once()
    assert report.in_doubt == [permit2.id, no_payer.id]
    assert store.get(permit2.id) == permit2 and store.get(no_payer.id) == no_payer
    assert (
        caplog.text.count(f"payment #{permit2.id} stays in doubt: cannot check on chain: not an EIP-3009") == 1
    )


async def test_a_pass_with_nothing_unknown_reads_no_chain(store: SqliteLedgerStore) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    report = await Reconciler(store, {"eip155:84532": closed}).run_once()
    assert report.errors == [] and report.in_doubt == [] and report.no_rpc == []


# -- the decision, the store and the config on their own --------------------------------------------

NONCE = "0x" + "ab" * 32
PAYER_ADDRESS = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
TX = "0x" + "cd" * 32


def record(**overrides: Any) -> PaymentRecord:
    base = PaymentRecord(
        id=7,
        created_at=1_800_000_000.0,
        updated_at=1_800_000_000.0,
        state=PaymentState.IN_DOUBT,
        amount=1000,
        decimals=6,
        asset=ASSET,
        network="eip155:84532",
        pay_to="0x90F79bf6EB2c4f870365E785982E1f101E93b906",
        host="shop.test",
        method="GET",
        url="http://shop.test/paid",
        x402_version=2,
        scheme="exact",
        resource=None,
        nonce=NONCE,
        valid_before=1_800_000_400,
        payment_id=None,
        payer=PAYER_ADDRESS,
        tx_hash=None,
        reason="the proxy stopped before the outcome was recorded",
        session_id=None,
    )
    return replace(base, **overrides)


def test_a_channel_deposit_is_checked_like_an_exact_payment() -> None:
    """A batch-settlement deposit row names the EIP-3009 authorization its collector takes."""
    row = record(scheme="batch-settlement")
    assert uncheckable(row) is None
    verdict = decide(row, ChainFacts(12, 1_800_000_100, used=True, tx_hash=TX))
    assert verdict.outcome is Outcome.SETTLED and verdict.tx_hash == TX
    # A channel row without an EIP-3009 nonce (a Permit2 collector's) stays in doubt, whatever the chain says.
    permit2 = record(scheme="batch-settlement", nonce="12345678901234567890")
    assert "not an EIP-3009 authorization" in (uncheckable(permit2) or "")
    assert decide(permit2, ChainFacts(12, 1_800_000_100, used=True, tx_hash=TX)).outcome is Outcome.IN_DOUBT


def test_used_with_log_is_settled_with_its_hash() -> None:
    verdict = decide(record(), ChainFacts(12, 1_800_000_100, used=True, tx_hash=TX))
    assert verdict.outcome is Outcome.SETTLED and verdict.tx_hash == TX
    assert TX in verdict.reason and "block 12" in verdict.reason


def test_used_without_log_is_settled_and_says_the_hash_is_missing() -> None:
    # Used even after validBefore: the chain's "used" is final whatever the time.
    verdict = decide(record(), ChainFacts(12, 1_900_000_000, used=True))
    assert verdict.outcome is Outcome.SETTLED and verdict.tx_hash is None
    assert "no AuthorizationUsed log was found" in verdict.reason


@pytest.mark.parametrize(
    ("block_time", "outcome"),
    [
        (1_800_000_399, Outcome.IN_DOUBT),  # one second before validBefore: a block may still include it
        (1_800_000_400, Outcome.NEVER_MOVED),  # the token requires block.timestamp < validBefore
        (1_800_000_401, Outcome.NEVER_MOVED),
    ],
)
def test_unused_is_never_moved_only_once_block_time_reaches_valid_before(
    block_time: int, outcome: Outcome
) -> None:
    verdict = decide(record(), ChainFacts(12, block_time, used=False))
    assert verdict.outcome is outcome and verdict.tx_hash is None


def test_the_local_clock_plays_no_part() -> None:
    # validBefore in 1970 by any local clock, but the chain's latest block is older still.
    verdict = decide(record(valid_before=1_000), ChainFacts(3, 999, used=False))
    assert verdict.outcome is Outcome.IN_DOUBT and "validBefore 1000" in verdict.reason


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"nonce": "12345678901234567890"}, "not an EIP-3009 authorization"),  # Permit2: uint256 nonce
        ({"scheme": "upto"}, "not an EIP-3009 authorization"),
        ({"nonce": None}, "not an EIP-3009 authorization"),
        ({"nonce": "0x" + "ab" * 31}, "not an EIP-3009 authorization"),
        ({"payer": None}, "no payer address recorded"),
        ({"valid_before": None}, "no validBefore recorded"),
        ({"network": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"}, "not an EVM (eip155) network"),
        ({"asset": "USDC"}, "the asset is not an EVM address"),
        ({"state": PaymentState.DRY_RUN}, "not a payment whose money may have moved"),
        ({"state": PaymentState.PENDING}, "not a payment whose money may have moved"),
        ({"chain_state": ChainState.UNUSED}, "the chain already answered"),
    ],
)
def test_rows_the_chain_cannot_answer_for_stay_in_doubt(overrides: dict[str, Any], problem: str) -> None:
    row = record(**overrides)
    assert problem in (uncheckable(row) or "")
    # Whatever the chain says: an answer about another nonce space proves nothing about this row.
    for facts in (ChainFacts(1, 1_900_000_000, used=False), ChainFacts(1, 1, used=True, tx_hash=TX)):
        verdict = decide(row, facts)
        assert verdict.outcome is Outcome.IN_DOUBT and problem in verdict.reason


def test_ledger_reason_keeps_why_the_row_was_unknown_and_is_bounded() -> None:
    verdict = decide(record(), ChainFacts(12, 1_800_000_100, used=True, tx_hash=TX))
    text = ledger_reason(record(), verdict)
    assert text == f"{verdict.reason}; was in_doubt: the proxy stopped before the outcome was recorded"
    assert ledger_reason(record(reason=None), verdict) == verdict.reason
    assert len(ledger_reason(record(reason="x" * 2000), verdict)) == 500


def test_store_resolves_unknown_rows_and_the_in_doubt_refusal_follows(store: SqliteLedgerStore) -> None:
    now = 1_800_000_000.0
    new = NewPayment(
        amount=1000,
        decimals=6,
        asset=ASSET,
        network="eip155:84532",
        pay_to=PAYER_ADDRESS,
        host="shop.test",
        method="GET",
        url="http://shop.test/paid",
        x402_version=2,
        scheme="exact",
        nonce=NONCE,
        valid_before=int(now) + 400,
    )
    a, b, c = (store.insert_pending(new, now=now) for _ in range(3))
    assert store.list_in_doubt() == []
    for row in (a, b, c):
        store.mark_in_doubt(row.id, reason="transport failure")
    assert [r.id for r in store.list_in_doubt()] == [a.id, b.id, c.id]  # oldest first

    def in_doubt(at: float) -> int | None:
        found = store.find_in_doubt("GET", new.url, still_valid_at=at)
        return None if found is None else found.id

    assert in_doubt(now) == c.id  # the newest
    store.mark_rejected(c.id, reason="reconciled from chain: never moved", now=now + 1)  # now allowed
    assert in_doubt(now) == b.id
    # Settled from the chain: the money moved, the client never got the answer; still blocks a retry.
    settled = store.mark_settled(b.id, tx_hash=TX, reason=f"{RECONCILED_USED} in tx {TX}", now=now + 1)
    assert settled.state is PaymentState.SETTLED and in_doubt(now) == b.id
    assert in_doubt(now + 400) is None  # until its authorization's window is over, like an unknown row
    store.mark_rejected(a.id, reason="reconciled from chain: never moved", now=now + 1)
    assert in_doubt(now) == b.id
    assert store.list_in_doubt() == []
    # A row settled by its server's receipt is a paid need, not one in doubt.
    d = store.insert_pending(replace(new, url="http://shop.test/other"), now=now)
    store.mark_settled(d.id, tx_hash=TX, now=now)
    assert store.find_in_doubt("GET", "http://shop.test/other", still_valid_at=now) is None
    # A settled payment never becomes "never moved", nor the reverse.
    with pytest.raises(StoreError) as info:
        store.mark_rejected(b.id, reason="late")
    assert info.value.kind == "transition"
    with pytest.raises(StoreError):
        store.mark_settled(a.id, tx_hash=TX)
    # Never-moved rows count in budgets only while their authorization is valid by the local clock
    # (conservative); settled ones always count.
    assert store.spent_since(now - 10, now=now + 500).count == 2


def test_reconcile_interval_config() -> None:
    assert load_config(None, env={}).reconcile.interval == 60.0
    assert load_config(None, env={"X402_PROXY_RECONCILE__INTERVAL": "5"}).reconcile.interval == 5.0
    for bad in ("0", "86401", "soon"):
        with pytest.raises(ConfigError) as info:
            load_config(None, env={"X402_PROXY_RECONCILE__INTERVAL": bad})
        assert info.value.key == "reconcile.interval"
