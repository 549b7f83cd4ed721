"""batch-settlement channels held by a real proxy process (issue 18), on the real channel stack.

Real anvil with our channel contracts at the SDK's addresses, the SDK's facilitator and resource server
(tests/stack/channels.py), and `x402-proxy run` with `[channels] enabled`. What is asserted is what
the chain says (token balances, channels(channelId)) next to what the proxy's ledger and channel
table say. Each test uses its own proxy home, so its own channels (a fresh salt per channel).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import httpx

from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack, wait_for
from tests.support import channels as _channels_support
from tests.support.admin import AdminProxy
from tests.support.channels import SESSION, channels, end_and_wait_refund, get, start_proxy
from tests.support.paying_proxy import ledger

x402_channel_stack = _stack_fixtures.x402_channel_stack
proxy = _channels_support.proxy


def test_deposit_once_n_vouchers_then_end_refunds_and_net_spend_is_the_final_voucher(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    stack, n = x402_channel_stack, 5
    payer_before = stack.balance_of(stack.payer_address)
    url = f"{stack.server}/paid/ch"
    responses = [get(proxy, url) for _ in range(n)]
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    sessions = {r.headers.get(SESSION) for r in responses}
    assert len(sessions) == 1 and None not in sessions
    session_id = sessions.pop()
    assert session_id is not None
    # One ledger row: the deposit, written before signing, named batch-settlement.
    rows = ledger(proxy)
    assert len(rows) == 1 and rows[0]["scheme"] == "batch-settlement"
    assert int(rows[0]["amount"]) == 10 * stack.price and rows[0]["state"] == "settled"
    # The row names the deposit's EIP-3009 authorization, and the chain shows it used: the record agrees
    # with the chain, and the reconciler can read it like any payment's.
    assert rows[0]["nonce"] and rows[0]["valid_before"], rows[0]
    assert stack.chain.authorization_state(stack.payer_address, rows[0]["nonce"])
    [row] = channels(proxy)
    assert row["state"] == "open" and row["deposit"] == 10 * stack.price
    assert row["signed"] == row["charged"] == n * stack.price
    assert stack.channel_state(row["channel_id"]) == (10 * stack.price, 0)
    assert stack.balance_of(stack.payer_address) == payer_before - 10 * stack.price
    # The session shows the channel (admin API JSON).
    shown = proxy.call("GET", f"/sessions/{session_id}").json()
    assert shown.get("channel", {}).get("deposit") == str(10 * stack.price), shown

    done = end_and_wait_refund(proxy, session_id)
    assert done["state"] == "refunded" and done["refunded"] == 5 * stack.price
    assert done["claimed"] == n * stack.price
    net = payer_before - stack.balance_of(stack.payer_address)
    assert net == n * stack.price == done["signed"]  # on chain: the payer paid exactly the final voucher
    assert stack.channel_state(row["channel_id"]) == (n * stack.price, n * stack.price)
    stack.settle()
    shown = proxy.call("GET", f"/sessions/{session_id}").json()
    assert shown["channel"]["net_spend"] == str(n * stack.price)
    assert shown["channel"]["refunded"] == str(5 * stack.price)


def test_concurrent_requests_on_one_channel_are_serialized(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    stack = x402_channel_stack
    payer_before = stack.balance_of(stack.payer_address)
    # The deposit, on the scope the burst uses (the session's scope is the paid URL's path).
    assert get(proxy, f"{stack.server}/paid/slow?delay=0").status_code == 200

    async def burst() -> list[int]:
        async with httpx.AsyncClient(proxy=proxy.url, timeout=60, trust_env=False) as client:
            rs = await asyncio.gather(*(client.get(f"{stack.server}/paid/slow?delay=0.2") for _ in range(4)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 4
    [row] = channels(proxy)
    assert row["charged"] == row["signed"] == 5 * stack.price
    session_id = row["session_id"]
    done = end_and_wait_refund(proxy, session_id)
    assert done["refunded"] == 5 * stack.price
    assert payer_before - stack.balance_of(stack.payer_address) == 5 * stack.price
    assert len(ledger(proxy)) == 1


def test_restart_mid_channel_and_a_corrective_402(x402_channel_stack: ChannelStack, tmp_path: Path) -> None:
    """Restart: the channel goes on from our table on the first try. Then the SDK's context is set
    back (as if a voucher's answer was lost in a crash): the next voucher is below the server's view,
    the corrective 402 is checked against what we signed, accepted, and the request is paid once."""
    stack = x402_channel_stack
    payer_before = stack.balance_of(stack.payer_address)
    home = tmp_path / "home"
    proxy = start_proxy(stack, home)
    try:
        url = f"{stack.server}/paid/ch"
        assert [get(proxy, url).status_code for _ in range(3)] == [200] * 3
        proxy.stop()
        proxy = start_proxy(stack, home)
        r = get(proxy, url)
        assert r.status_code == 200, r.text
        [row] = channels(proxy)
        assert row["charged"] == 4 * stack.price and row["state"] == "open"
        handled = stack.server_stats()["handled"]["/paid/ch"]

        proxy.stop()
        with sqlite3.connect(home / "channels.db") as conn:
            context = json.loads(conn.execute("SELECT context FROM channels").fetchone()[0])
            context["chargedCumulativeAmount"] = str(2 * stack.price)  # the SDK's view, set back
            conn.execute("UPDATE channels SET context = ?", (json.dumps(context),))
        proxy = start_proxy(stack, home)
        r = get(proxy, url)
        assert r.status_code == 200, r.text
        assert stack.server_stats()["handled"]["/paid/ch"] == handled + 1  # served once
        assert "corrective 402" in proxy.log_text()
        [row] = channels(proxy)
        assert row["charged"] == 5 * stack.price
        assert len(ledger(proxy)) == 1  # never a second deposit
        done = end_and_wait_refund(proxy, row["session_id"])
        assert done["refunded"] == 5 * stack.price
        assert payer_before - stack.balance_of(stack.payer_address) == 5 * stack.price
    finally:
        proxy.stop()


def test_corrective_402_above_what_we_signed_is_refused(
    x402_channel_stack: ChannelStack, tmp_path: Path
) -> None:
    """Our table says we signed less than the server claims: no voucher on its word; the channel is
    retired and refunded; the payer loses at most what it really signed."""
    stack = x402_channel_stack
    payer_before = stack.balance_of(stack.payer_address)
    home = tmp_path / "home"
    proxy = start_proxy(stack, home)
    try:
        url = f"{stack.server}/paid/ch"
        assert [get(proxy, url).status_code for _ in range(3)] == [200] * 3
        proxy.stop()
        with sqlite3.connect(home / "channels.db") as conn:
            context = json.loads(conn.execute("SELECT context FROM channels").fetchone()[0])
            context["chargedCumulativeAmount"] = str(1 * stack.price)
            conn.execute(
                "UPDATE channels SET context = ?, signed = ?", (json.dumps(context), 2 * stack.price)
            )
        proxy = start_proxy(stack, home)
        r = get(proxy, url)
        assert r.status_code == 402
        assert r.headers.get("X-402-Proxy-Error") == "channel_state_mismatch"
        assert wait_for(lambda: channels(proxy)[0]["state"] == "refunded", 30), channels(proxy)
        # The seller's 3 vouchers are claimed by the refund batch: it holds our signatures for them.
        assert payer_before - stack.balance_of(stack.payer_address) == 3 * stack.price
    finally:
        proxy.stop()
