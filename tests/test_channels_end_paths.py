"""Every way a channel session ends gives the unused deposit back (issue 18), on the real channel stack.

A real `x402-proxy run` with `[channels] enabled` (tests/support/channels.py), the SDK's batch-settlement
server and facilitator on a real anvil (tests/stack/channels.py). Each test opens one channel (a deposit
of 10 prices, then vouchers), ends its session one way, and asserts what the chain says: the payer's
token balance afterwards is its balance before minus the final voucher (the net spend), the channel on
chain is (claimed = final voucher, balance drained), and the session's `channel` summary shows deposit,
signed, charged, claimed, refunded and net_spend. The ways: REST `DELETE /sessions/{id}`, the CLI
(`x402-proxy sessions end`, a subprocess), the MCP tool `x402_session_end`, TTL expiry found by the
refund sweep, and a budget cut (a config reload whose daily budget no longer holds the deposit).
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from proxy.payments.amounts import format_units
from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack, wait_for
from tests.support import channels as _channels_support
from tests.support.admin import AdminProxy
from tests.support.channels import (
    SESSION,
    channels,
    get,
    open_channel_session,
    start_proxy,
    wait_all_refunded,
)
from tests.support.paying_proxy import ledger
from tests.test_admin_mcp import mcp_session, text_of

x402_channel_stack = _stack_fixtures.x402_channel_stack
proxy = _channels_support.proxy

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
N = 4  # requests on the channel: the deposit's first voucher, then 3 more


def assert_refunded(
    stack: ChannelStack, summary: dict[str, Any], payer_before: int, row: dict[str, Any], n: int
) -> None:
    """The chain and the session's channel summary agree: the payer paid exactly the final voucher."""
    price, deposit = stack.price, 10 * stack.price
    assert row["state"] == "refunded", row
    assert payer_before - stack.balance_of(stack.payer_address) == n * price == row["signed"]
    assert stack.channel_state(row["channel_id"]) == (n * price, n * price)  # claimed, nothing left
    channel = summary["channel"]
    assert channel["deposit"] == str(deposit)
    assert channel["signed"] == channel["charged"] == str(n * price)
    assert channel["claimed"] == str(n * price)
    assert channel["refunded"] == str(deposit - n * price)
    assert channel["net_spend"] == str(n * price)
    assert channel["state"] == "refunded" and channel["decimals"] == 6
    [shown] = channel["channels"]
    assert shown["channel_id"] == row["channel_id"] and shown["refund_tx"], shown


def opened(stack: ChannelStack, proxy: AdminProxy) -> tuple[str, int, dict[str, Any]]:
    """A channel session with N requests on it: (session id, payer balance before, channel row)."""
    payer_before = stack.balance_of(stack.payer_address)
    session_id = open_channel_session(proxy, stack, N)
    [row] = channels(proxy)
    assert row["state"] == "open" and row["signed"] == row["charged"] == N * stack.price
    assert stack.balance_of(stack.payer_address) == payer_before - 10 * stack.price  # the deposit moved
    assert [r["scheme"] for r in ledger(proxy)] == ["batch-settlement"]
    return session_id, payer_before, row


def end_by_rest(proxy: AdminProxy, session_id: str) -> dict[str, Any]:
    r = proxy.call("DELETE", f"/sessions/{session_id}")
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def end_by_cli(proxy: AdminProxy, session_id: str) -> dict[str, Any]:
    done = proxy.admin_cli("sessions", "end", session_id, "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def end_by_mcp(proxy: AdminProxy, session_id: str) -> dict[str, Any]:
    async def call() -> dict[str, Any]:
        async with mcp_session(proxy) as session:
            ended = await session.call_tool("x402_session_end", {"session_id": session_id})
        assert not ended.is_error, text_of(ended)
        assert ended.structured_content is not None
        return dict(ended.structured_content)

    return asyncio.run(call())


@pytest.mark.parametrize("how", ["rest", "cli", "mcp"])
def test_ending_a_channel_session_refunds_before_the_end_answers(
    x402_channel_stack: ChannelStack, proxy: AdminProxy, how: str
) -> None:
    stack = x402_channel_stack
    session_id, payer_before, _ = opened(stack, proxy)
    end = {"rest": end_by_rest, "cli": end_by_cli, "mcp": end_by_mcp}[how]
    answer = end(proxy, session_id)
    assert answer["ended"] is True and answer["already_ended"] is False
    assert answer["session"]["state"] == "ended"
    # The answer itself shows the refund: it was made before the end answered.
    [done] = channels(proxy)
    assert_refunded(stack, answer["session"], payer_before, done, N)
    assert_refunded(stack, proxy.call("GET", f"/sessions/{session_id}").json(), payer_before, done, N)
    assert len(ledger(proxy)) == 1  # one deposit, no row for the refund or the vouchers


def channel_shown(command: str, session_id: str, stdout: str) -> str | None:
    """The channel text of one CLI text output: the `channel` row of `sessions show`, the CHANNEL cell of
    the session's row in `sessions list`, the `  channel: ` line of `sessions end` (None: not shown)."""
    lines = stdout.splitlines()
    if command == "list":
        header = lines[0] if lines else ""
        row = next((line for line in lines if line.startswith(session_id)), "")
        return row[header.index("CHANNEL") :].strip() if "CHANNEL" in header else None
    if command == "end":
        prefix = "  channel: "
        return next((line[len(prefix) :] for line in lines if line.startswith(prefix)), None)
    return next((line.split(None, 1)[1] for line in lines if line.startswith("channel ")), None)


def test_cli_text_output_shows_the_channel(x402_channel_stack: ChannelStack, proxy: AdminProxy) -> None:
    """`x402-proxy sessions show|list|end` without --json (real subprocesses) name a channel session's
    state, deposit, signed, charged, refunded and net spend in the asset's units: open (refund not yet),
    then refunded by the end (deposit 10 prices, N vouchers signed and charged, the rest refunded)."""
    stack = x402_channel_stack
    session_id, _, _ = opened(stack, proxy)
    price = stack.price

    def units(amount: int) -> str:
        return format_units(amount, 6)

    deposit, spent, back = units(10 * price), units(N * price), units((10 - N) * price)
    before = f"open: deposit {deposit}, signed {spent}, charged {spent}, refunded not yet, net spend open"
    after = (
        f"refunded: deposit {deposit}, signed {spent}, charged {spent}, refunded {back}, net spend {spent}"
    )
    seen: dict[str, tuple[int, str | None]] = {}
    for name, args in (
        ("show", ("sessions", "show", session_id)),
        ("list", ("sessions", "list")),
        ("end", ("sessions", "end", session_id)),
        ("show after end", ("sessions", "show", session_id)),
    ):
        done = proxy.admin_cli(*args)
        seen[name] = (done.returncode, channel_shown(args[1], session_id, done.stdout))
    assert seen == {
        "show": (0, before),
        "list": (0, before),
        "end": (0, after),
        "show after end": (0, after),
    }


def test_ttl_expiry_is_refunded_by_the_sweep(x402_channel_stack: ChannelStack, tmp_path: Path) -> None:
    """A session started with the shortest TTL (60 s, `POST /sessions`); the proxy's clock is then moved
    past it (libfaketime reading a file the test rewrites; monotonic time is left alone): the refund
    sweep finds the session expired, with no request and no admin call, and refunds the channel."""
    if not FAKETIME_LIB.exists():
        pytest.fail(f"{FAKETIME_LIB} missing: apt-get install faketime (Makefile apt-test)")
    stack = x402_channel_stack
    clock = tmp_path / "faketime"
    clock.write_text("+0s\n")
    env = {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
    proxy = start_proxy(stack, tmp_path / "home", env=env)
    try:
        payer_before = stack.balance_of(stack.payer_address)
        started = proxy.call(
            "POST", "/sessions", json={"endpoint": f"{stack.server}/paid/ch", "ttl_seconds": 60}
        )
        assert started.status_code == 201, started.text
        session = started.json()["session"]
        session_id = session["id"]
        assert session["expires_at"] - session["created_at"] == pytest.approx(60, abs=1)
        for _ in range(N - 1):  # the start paid the first voucher; these ride on the channel
            r = get(proxy, f"{stack.server}/paid/ch")
            assert r.status_code == 200 and r.headers[SESSION] == session_id, r.text
        [row] = channels(proxy)
        assert row["session_id"] == session_id and row["charged"] == N * stack.price
        # Not before its time: the sweep runs every 0.2 s and leaves an active session's channel open.
        assert not wait_for(lambda: channels(proxy)[0]["state"] != "open", 1.0)

        clock.write_text("+90s\n")
        done = wait_all_refunded(proxy)
        assert "session expired" in (done["detail"] or ""), done
        summary = proxy.call("GET", f"/sessions/{session_id}").json()
        assert summary["state"] == "expired"
        assert_refunded(stack, summary, payer_before, done, N)
    finally:
        proxy.stop()


def test_a_budget_cut_by_reload_ends_and_refunds_the_channel_session(
    x402_channel_stack: ChannelStack, proxy: AdminProxy
) -> None:
    """SIGHUP with a daily budget that still holds the deposit changes nothing; one below the deposit
    (10 prices = 0.01) ends the session and refunds its channel, and nothing opens a new one."""
    stack = x402_channel_stack
    session_id, payer_before, _ = opened(stack, proxy)
    config = proxy.config_path.read_text()

    def reload(budget: str, count: int) -> None:
        text = config.replace('daily_budget = "5"', f'daily_budget = "{budget}"')
        assert text.count(f'daily_budget = "{budget}"') == 2  # daily_budget and per_host_daily_budget
        proxy.config_path.write_text(text)
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: proxy.log_text().count("configuration reloaded: policy") == count, 10)

    reload("0.02", 1)  # lower, but the deposit still fits: the channel stays open and carries vouchers
    assert not wait_for(lambda: channels(proxy)[0]["state"] != "open", 1.0), channels(proxy)
    r = get(proxy, f"{stack.server}/paid/ch")
    assert r.status_code == 200 and r.headers[SESSION] == session_id
    n = N + 1

    reload("0.005", 2)
    done = wait_all_refunded(proxy)
    assert "budget cut" in (done["detail"] or "") and "daily_budget" in done["detail"], done
    summary = proxy.call("GET", f"/sessions/{session_id}").json()
    assert summary["state"] == "ended" and "budget cut" in summary["ended_reason"], summary
    assert_refunded(stack, summary, payer_before, done, n)
    # The next request opens no new channel: its deposit would not fit the budget either.
    after = get(proxy, f"{stack.server}/paid/ch")
    assert after.status_code == 402 and after.headers.get("X-402-Proxy-Error") == "budget_exhausted"
    assert len(channels(proxy)) == 1 and len(ledger(proxy)) == 1
    assert payer_before - stack.balance_of(stack.payer_address) == n * stack.price
