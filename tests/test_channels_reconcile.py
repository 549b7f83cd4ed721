"""A channel's deposit row agrees with the chain (proxy/payments/reconcile.py, proxy/channels/holder.py), on
the real channel stack (anvil with our channel contracts, the SDK's facilitator and resource server).

The deposit is an EIP-3009 `receiveWithAuthorization` taken by the ERC-3009 deposit collector under the
nonce on the row, so the token's `authorizationState` and `AuthorizationUsed` log answer for it:

- a deposit answered normally: the pass confirms it (`chain_state` used, the server's transaction);
- a proxy SIGKILLed after the deposit settled but before anything was recorded: the row is in doubt at
  restart, then `settled_undelivered` with the transaction that moved the deposit, found by the log
  search; the channel is refunded, and the payer's spend on chain is what the seller claimed;
- a refund gives its money back to the budget: the deposit's row records what the chain shows came
  back, budgets count the rest, and a deposit the budget refused before the refund fits after it.
"""

from __future__ import annotations

import signal
from decimal import Decimal
from pathlib import Path
from typing import Any

from web3.logs import DISCARD

from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack
from tests.support.admin import AdminProxy
from tests.support.channels import (
    SESSION,
    channel_config,
    channels,
    end_and_wait_refund,
    get,
    start_proxy,
    wait_all_refunded,
)
from tests.support.crash import in_background, receipt_using_authorization, wait_for
from tests.support.paying_proxy import ledger

x402_channel_stack = _stack_fixtures.x402_channel_stack

RECONCILE_EVERY_SECOND = "[reconcile]\ninterval = 1\n"


def only_row(proxy: Any) -> dict[str, Any]:
    rows = ledger(proxy)
    assert len(rows) == 1, rows
    return rows[0]


def assert_tx_moved_the_deposit(stack: ChannelStack, row: dict[str, Any]) -> None:
    """The row's transaction used the row's authorization and took the deposit from the payer."""
    receipt = receipt_using_authorization(stack.chain, stack.payer_address, row)
    transfers = stack.chain.token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    from_payer = [e["args"]["value"] for e in transfers if e["args"]["from"] == stack.payer_address]
    assert from_payer == [int(row["amount"])], transfers


def test_a_deposit_answered_normally_is_confirmed_by_the_chain(
    x402_channel_stack: ChannelStack, tmp_path: Path
) -> None:
    stack = x402_channel_stack
    proxy = start_proxy(stack, tmp_path / "home", RECONCILE_EVERY_SECOND)
    try:
        r = get(proxy, f"{stack.server}/paid/ch")
        assert r.status_code == 200 and r.headers.get(SESSION), r.text
        row = only_row(proxy)
        assert row["scheme"] == "batch-settlement" and row["state"] == "settled"
        wait_for(lambda: only_row(proxy)["chain_state"] is not None, 30, "a pass to check the deposit", 0.1)
        row = only_row(proxy)
        assert row["chain_state"] == "used" and row["state"] == "settled", row
        assert_tx_moved_the_deposit(stack, row)
        # Ended: refunded, so no voucher of this channel is left for a later test's claim on this stack.
        done = end_and_wait_refund(proxy, r.headers[SESSION])
        assert done["refunded"] == int(row["amount"]) - stack.price
    finally:
        proxy.stop()


def test_a_deposit_killed_before_it_was_recorded_is_settled_from_the_chain(
    x402_channel_stack: ChannelStack, tmp_path: Path
) -> None:
    stack = x402_channel_stack
    home = tmp_path / "home"
    payer_before = stack.balance_of(stack.payer_address)
    url = f"{stack.server}/paid/ch"
    proxy = start_proxy(stack, home, env={"X402_PROXY_FAULT_PAUSE": "payment.answered"})
    try:
        thread, outcome = in_background(proxy, url)
        marker = "fault point reached: payment.answered"
        wait_for(lambda: marker in proxy.log_text(), 30, marker)
        proxy.stop(signal.SIGKILL)  # the deposit settled and was answered; nothing recorded
        thread.join(60)
        assert "error" in outcome, f"the client got an answer from a killed proxy: {outcome}"
        deposit = 10 * stack.price
        assert payer_before - stack.balance_of(stack.payer_address) == deposit
        assert only_row(proxy)["state"] == "pending"

        proxy = start_proxy(stack, home, RECONCILE_EVERY_SECOND)
        wait_for(lambda: only_row(proxy)["chain_state"] is not None, 30, "a pass to resolve the deposit", 0.1)
        row = only_row(proxy)
        assert row["scheme"] == "batch-settlement" and int(row["amount"]) == deposit
        assert row["chain_state"] == "used" and row["state"] == "settled_undelivered", row
        assert row["reason"].startswith("reconciled from chain: authorization used in tx "), row
        assert_tx_moved_the_deposit(stack, row)

        # The channel was opening at the kill: refunded at restart. On chain the payer spent what the
        # seller claimed (at most the first voucher), and the table says the same.
        done = wait_all_refunded(proxy, timeout=60)
        [channel] = channels(proxy)
        assert done["channel_id"] == channel["channel_id"]
        spent = payer_before - stack.balance_of(stack.payer_address)
        assert spent == done["claimed"] <= stack.price, (spent, done)
        assert done["refunded"] == deposit - spent
        assert len(ledger(proxy)) == 1  # never a second deposit
    finally:
        proxy.stop()


def test_a_refund_gives_its_money_back_to_the_budget(
    x402_channel_stack: ChannelStack, tmp_path: Path
) -> None:
    stack = x402_channel_stack
    price, deposit = stack.price, 10 * stack.price  # 0.001 and 0.010 TUSDC (6 decimals)
    payer_before = stack.balance_of(stack.payer_address)
    config = channel_config(stack, daily_budget="0.015")  # one deposit fits, two do not
    proxy = AdminProxy(tmp_path / "home", config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()

    def spent() -> Decimal:
        return Decimal(proxy.call("GET", "/budget").json()["global"]["spent"])

    def units(amount: int) -> Decimal:
        return Decimal(amount).scaleb(-6)

    try:
        first = [get(proxy, f"{stack.server}/paid/ch") for _ in range(3)]
        assert [r.status_code for r in first] == [200] * 3, [r.text for r in first]
        assert spent() == units(deposit)  # the whole deposit is committed money
        refused = get(proxy, f"{stack.server}/paid/many/1")  # a second channel: 20 prices > 15
        assert refused.status_code == 402 and refused.headers.get("X-402-Proxy-Error") == "budget_exhausted"

        done = end_and_wait_refund(proxy, first[0].headers[SESSION])
        assert done["refunded"] == deposit - 3 * price and done["claimed"] == 3 * price
        [row] = ledger(proxy)
        assert int(row["refunded"]) == deposit - 3 * price  # what the chain shows came back
        assert payer_before - stack.balance_of(stack.payer_address) == 3 * price
        assert spent() == units(3 * price)  # budgets count what was spent, as the chain does

        second = get(proxy, f"{stack.server}/paid/many/1")  # 3 + 10 prices fit now
        assert second.status_code == 200, second.text
        assert spent() == units(13 * price)
        done = end_and_wait_refund(proxy, second.headers[SESSION])
        rows = ledger(proxy)
        assert [int(r["refunded"]) for r in rows] == [deposit - 3 * price, deposit - price]
        net = payer_before - stack.balance_of(stack.payer_address)
        assert net == 4 * price and spent() == units(net)  # ledger, budget and chain agree
        shown = proxy.call("GET", "/payments").json()["payments"]  # newest first
        assert [p["refunded"] for p in shown] == [str(deposit - price), str(deposit - 3 * price)]
    finally:
        proxy.stop()
