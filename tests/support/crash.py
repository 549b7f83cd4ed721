"""Helpers for tests that kill a paying proxy and check the ledger against the chain afterwards
(tests/test_crash_recovery.py, tests/test_reconcile.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from web3.logs import DISCARD

from tests.stack import Stack
from tests.support.paying_proxy import ledger, proxies
from tests.support.proxy_process import ProxyProcess

ERROR = "X-402-Proxy-Error"
PAYMENT = "X-402-Proxy-Payment"
SESSION = "X-402-Proxy-Session"
TIMEOUT = 60


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def get(proxy: ProxyProcess, url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT, **kwargs)


def in_background(proxy: ProxyProcess, url: str) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def client() -> None:
        try:
            outcome["response"] = get(proxy, url)
        except requests.RequestException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread, outcome


def session_rows(home: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT id, ended_at, data FROM sessions").fetchall()
    return {row[0]: {"ended_at": row[1], **json.loads(row[2])} for row in rows}


def receipt_using_authorization(chain: Any, payer: str, row: dict[str, Any]) -> Any:
    """The receipt of the row's transaction, checked to be a success that used the row's EIP-3009
    authorization (payer, nonce) and no other: what the reconciler's verdict names."""
    tx = row["tx_hash"]
    assert tx and tx.startswith("0x") and len(tx) == 66, row
    receipt = chain.w3.eth.get_transaction_receipt(tx)
    assert receipt["status"] == 1
    used = chain.token.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert [(e["args"]["authorizer"], "0x" + e["args"]["nonce"].hex()) for e in used] == [
        (payer, row["nonce"])
    ]
    return receipt


def assert_ledger_matches_chain(
    stack: Stack, proxy: ProxyProcess, pay_to_before: int
) -> list[dict[str, Any]]:
    """No row left pending; payTo received exactly the amounts of the rows whose nonce was used on chain."""
    rows = ledger(proxy)
    assert rows, "the ledger is empty"
    assert not [r for r in rows if r["state"] == "pending"], rows
    used = [
        r for r in rows if r["nonce"] and stack.chain.authorization_state(stack.payer_address, r["nonce"])
    ]
    for row in rows:
        if row["state"] in ("settled", "settled_undelivered"):
            assert row in used, f"settled row #{row['id']} has no transfer on chain"
    delta = stack.balance_of(stack.pay_to) - pay_to_before
    assert delta == sum(int(r["amount"]) for r in used), (delta, rows)
    return rows
