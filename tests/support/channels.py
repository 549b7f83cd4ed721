"""A proxy holding batch-settlement channels on the channel stack (tests/stack/channels.py), and readers
for what it holds: its channel table and the admin API's view of a channel session. Shared by the
channel tests (tests/test_channels_*.py) and the dashboard's channel test."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stack.channels import ChannelStack, wait_for
from tests.support.admin import AdminProxy

SESSION = "X-402-Proxy-Session"
PAYMENT = "X-402-Proxy-Payment"
FINAL_STATES = ("refunded", "void")


def channel_config(
    stack: ChannelStack,
    extra: str = "",
    *,
    daily_budget: str = "5",
    deposit_amount: str = "",
    max_deposit: str = "0.05",
) -> str:
    """`[channels] enabled`, a deposit of 10 prices (or `deposit_amount`), refunds swept every 0.2 s."""
    return (
        '[proxy]\nconnect_ports = ["*"]\n'
        f'[policy]\nmax_per_payment = "0.01"\ndaily_budget = "{daily_budget}"\n'
        f'per_host_daily_budget = "{daily_budget}"\n'
        f'[rpc]\n"{stack.network}" = "{stack.rpc_url}"\n'
        f'[[assets]]\nnetwork = "{stack.network}"\naddress = "{stack.token}"\ndecimals = 6\n'
        'symbol = "TUSDC"\neip712_name = "USDC"\neip712_version = "2"\n'
        f'[channels]\nenabled = true\ndeposit_prices = 10\ndeposit_amount = "{deposit_amount}"\n'
        f'max_deposit = "{max_deposit}"\nrefund_interval = 0.2\n'
        f"{extra}"
    )


def start_proxy(
    stack: ChannelStack, home: Path, extra: str = "", env: dict[str, str] | None = None
) -> AdminProxy:
    proxy = AdminProxy(
        home, channel_config(stack, extra), {"X402_PROXY_PRIVATE_KEY": stack.payer_key, **(env or {})}
    )
    return proxy.start()


@pytest.fixture()
def proxy(x402_channel_stack: ChannelStack, tmp_path: Path) -> Iterator[AdminProxy]:
    """A fresh channel-holding proxy per test (`proxy = channels_support.proxy` in a test module)."""
    process = start_proxy(x402_channel_stack, tmp_path / "home")
    yield process
    process.stop()


def channels(proxy: AdminProxy) -> list[dict[str, Any]]:
    path = proxy.home / "channels.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM channels ORDER BY opened_at")]


def get(proxy: AdminProxy, url: str) -> httpx.Response:
    return httpx.get(url, proxy=proxy.url, timeout=60, trust_env=False)


def wait_all_refunded(proxy: AdminProxy, timeout: float = 30) -> dict[str, Any]:
    """Every channel of the proxy refunded (or void); the newest."""
    assert wait_for(lambda: all(c["state"] in FINAL_STATES for c in channels(proxy)), timeout), channels(
        proxy
    )
    return channels(proxy)[-1]


def end_and_wait_refund(proxy: AdminProxy, session_id: str) -> dict[str, Any]:
    r = proxy.call("DELETE", f"/sessions/{session_id}")
    assert r.status_code in (200, 204), r.text
    return wait_all_refunded(proxy)


def open_channel_session(proxy: AdminProxy, stack: ChannelStack, n: int, path: str = "/paid/ch") -> str:
    """n paid requests on one channel (a deposit, then n - 1 vouchers); the session's id."""
    responses = [get(proxy, f"{stack.server}{path}") for _ in range(n)]
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    sessions: set[str | None] = {r.headers.get(SESSION) for r in responses}
    assert len(sessions) == 1 and None not in sessions, sessions
    session_id = sessions.pop()
    assert session_id is not None
    return session_id
