"""A proxy process configured to pay on the local x402 stack, and readers for its ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tests.stack import Stack
from tests.support.proxy_process import ProxyProcess


def stack_config(
    stack: Stack,
    *,
    policy: str = "",
    extra: str = "",
    with_asset: bool = True,
    eip712_name: str | None = None,
    upstream_ca: Path | None = None,
) -> str:
    asset = (
        "[[assets]]\n"
        f'network = "{stack.network_v2}"\naddress = "{stack.token}"\ndecimals = {stack.token_decimals}\n'
        f'symbol = "TUSDC"\neip712_name = "{eip712_name or stack.token_name}"\n'
        f'eip712_version = "{stack.token_version}"\n'
    )
    upstream = f'[upstream]\nextra_ca_bundle = "{upstream_ca}"\n' if upstream_ca else ""
    return (
        '[proxy]\nconnect_ports = ["*"]\n'
        f"{upstream}"
        f'[policy]\nmax_per_payment = "0.01"\n{policy}\n'
        f'[rpc]\n"{stack.network_v2}" = "{stack.rpc_url}"\n'
        f"{asset if with_asset else ''}{extra}"
    )


def start_paying_proxy(stack: Stack, home: Path, *, key: str | None = None, **config: Any) -> ProxyProcess:
    env = {"X402_PROXY_PRIVATE_KEY": key or stack.payer_key}
    return ProxyProcess(home, stack_config(stack, **config), env).start()


def wait_warmed(proxy: ProxyProcess, timeout: float = 30) -> None:
    """Until the proxy's warm-up has logged that it is done. The reconciler's start-up pass runs right
    after it, on the ledger as it is then: a test that asserts a payment's state before the chain has
    been asked waits for this before paying, so that pass finds nothing (the next is `[reconcile]
    interval` later)."""
    from tests.support.crash import wait_for  # crash.py imports this module

    wait_for(lambda: "warm-up: paid path loaded" in proxy.log_text(), timeout, "the warm-up")


def ledger(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """Rows of the proxy's ledger, read through a second SQLite connection as an auditor would."""
    path = proxy.home / "state.db"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM payments ORDER BY id")]


def proxies(proxy: ProxyProcess) -> dict[str, str]:
    return {"http": proxy.url, "https": proxy.url}
