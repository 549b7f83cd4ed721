"""`[channels]` on SIGHUP (proxy/reload.py), on the real channel stack (tests/stack/channels.py).

A real `x402-proxy run` with `[channels] enabled` (tests/support/channels.py); each test rewrites its
config file, sends SIGHUP and reads the reload's log lines ("configuration reloaded: ..." and "changed
but only applied at the next start: ..."). What is asserted next to them is what the chain, the
ledger and the channel table say:

- `deposit_prices`: reported applied; the next channel opened deposits the new number of prices, the
  channel already open keeps its own deposit.
- `max_deposit` lowered below an open channel's deposit: the next sweep's budget cut ends its session
  and refunds the channel; no new channel of that deposit opens.
- `enabled`: reported as needing a restart (`channels.enabled`), the holder keeps holding channels, and
  the keys changed with it (`deposit_amount`) apply.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack, wait_for
from tests.support import channels as _channels_support
from tests.support.admin import AdminProxy
from tests.support.channels import FINAL_STATES, channels, get, open_channel_session
from tests.support.paying_proxy import ledger

x402_channel_stack = _stack_fixtures.x402_channel_stack
proxy = _channels_support.proxy


@pytest.fixture(autouse=True)
def _refund_what_is_left(proxy: AdminProxy) -> Iterator[None]:
    """After each test, every channel it left open is ended and refunded: the stack is shared, and the
    seller's next batch claim (tests/test_channels_stack.py asserts the receiver's totals) would
    otherwise claim these channels' vouchers too."""
    yield
    for session_id in {r["session_id"] for r in channels(proxy) if r["state"] == "open" and r["session_id"]}:
        proxy.call("DELETE", f"/sessions/{session_id}")
    assert wait_for(lambda: all(c["state"] in FINAL_STATES for c in channels(proxy)), 30), channels(proxy)

APPLIED = "configuration reloaded: "
NEEDS_RESTART = "changed but only applied at the next start: "


def reload(proxy: AdminProxy, old: str, new: str) -> tuple[str | None, str | None]:
    """Replace `old` by `new` in the config file, SIGHUP; (what was applied, what needs a restart), as
    the reload logged them (None: no such line)."""
    text = proxy.config_path.read_text()
    assert text.count(old) == 1, (old, text)
    proxy.config_path.write_text(text.replace(old, new))
    mark = len(proxy.log_text())
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: APPLIED in proxy.log_text()[mark:], 10)
    time.sleep(0.3)  # the restart warning follows the applied line in the same call

    def line(phrase: str) -> str | None:
        logged = proxy.log_text()[mark:]
        return logged.split(phrase, 1)[1].splitlines()[0].strip() if phrase in logged else None

    return line(APPLIED), line(NEEDS_RESTART)


def test_deposit_prices_reloaded_sizes_the_next_channel(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    stack = x402_channel_stack
    price = stack.price
    payer_before = stack.balance_of(stack.payer_address)
    open_channel_session(proxy, stack, 2, "/paid/many/1")  # deposit_prices = 10
    reloaded = reload(proxy, "deposit_prices = 10\n", "deposit_prices = 20\n")
    open_channel_session(proxy, stack, 2, "/paid/many/2")
    rows = channels(proxy)
    seen = {
        "reload": reloaded,
        "channel rows": [(r["state"], r["deposit"]) for r in rows],
        "ledger rows": [(r["scheme"], int(r["amount"])) for r in ledger(proxy)],
        "on chain": [stack.channel_state(r["channel_id"]) for r in rows],
        "payer paid": payer_before - stack.balance_of(stack.payer_address),
    }
    assert seen == {
        "reload": ("channels", None),
        "channel rows": [("open", 10 * price), ("open", 20 * price)],
        "ledger rows": [("batch-settlement", 10 * price), ("batch-settlement", 20 * price)],
        "on chain": [(10 * price, 0), (20 * price, 0)],
        "payer paid": 30 * price,
    }


def test_max_deposit_lowered_below_an_open_deposit_is_a_budget_cut(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    """The open channel holds 10 prices (0.01); max_deposit 0.005 no longer allows it: the sweep ends
    its session and refunds it, and a new channel (10 prices again) is refused."""
    stack = x402_channel_stack
    price = stack.price
    payer_before = stack.balance_of(stack.payer_address)
    session_id = open_channel_session(proxy, stack, 2)
    reloaded = reload(proxy, 'max_deposit = "0.05"', 'max_deposit = "0.005"')
    wait_for(lambda: channels(proxy)[0]["state"] in FINAL_STATES, 30)
    [done] = channels(proxy)
    session = proxy.call("GET", f"/sessions/{session_id}").json()
    after = get(proxy, f"{stack.server}/paid/many/3")
    seen = {
        "reload": reloaded,
        "channel": (done["state"], done["refunded"], (done["detail"] or "").split(":")[0]),
        "session": (session["state"], (session.get("ended_reason") or "").split(":")[0]),
        "next request": (after.status_code, after.headers.get("X-402-Proxy-Error")),
        "channels": len(channels(proxy)),
        "payer paid": payer_before - stack.balance_of(stack.payer_address),
    }
    assert seen == {
        "reload": ("channels", None),
        "channel": ("refunded", 8 * price, "budget cut"),
        "session": ("ended", "budget cut"),
        "next request": (402, "over_max_per_payment"),
        "channels": 1,
        "payer paid": 2 * price,
    }


def test_enabled_needs_a_restart_and_the_other_keys_apply(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    """`enabled = false` with a new deposit_amount: the switch is reported as needing a restart (the
    holder is built at start) and left alone, so the next channel opens, with the new deposit (0.012,
    above the seller's minDeposit of 10 prices, which would floor a smaller one)."""
    stack = x402_channel_stack
    reloaded = reload(
        proxy,
        '[channels]\nenabled = true\ndeposit_prices = 10\ndeposit_amount = ""\n',
        '[channels]\nenabled = false\ndeposit_prices = 10\ndeposit_amount = "0.012"\n',
    )
    open_channel_session(proxy, stack, 2)
    seen = {
        "reload": reloaded,
        "channel rows": [(r["state"], r["deposit"]) for r in channels(proxy)],
        "ledger rows": [(r["scheme"], int(r["amount"])) for r in ledger(proxy)],
    }
    assert seen == {
        "reload": ("channels", "channels.enabled"),
        "channel rows": [("open", 12_000)],
        "ledger rows": [("batch-settlement", 12_000)],
    }
