"""Lifecycle of a real proxy process: SIGHUP reloads policy and session rules without dropping
connections; SIGTERM drains in-flight requests (a payment among them) and exits 0."""

from __future__ import annotations

import http.client
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.stack import Stack
from tests.support.paying_proxy import ledger, proxies, stack_config
from tests.support.proxy_process import ProxyProcess

PAYMENT = "X-402-Proxy-Payment"
ERROR = "X-402-Proxy-Error"


def paying_process(
    stack: Stack, home: Path, *, max_per_payment: str, env: dict[str, str] | None = None
) -> ProxyProcess:
    cap = f'max_per_payment = "{max_per_payment}"'
    text = stack_config(stack).replace('max_per_payment = "0.01"', cap)
    return ProxyProcess(home, text, {"X402_PROXY_PRIVATE_KEY": stack.payer_key, **(env or {})})


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def session_ttls(home: Path) -> list[float]:
    with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as conn:
        return [row[0] - row[1] for row in conn.execute("SELECT expires_at, created_at FROM sessions")]


def get_on(conn: http.client.HTTPConnection, url: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", url)  # absolute-form: http.client sends the URL as given
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_sighup_reloads_policy_and_rules_keeping_connections(x402_stack: Stack, tmp_path: Path) -> None:
    price_units = x402_stack.price / 10**x402_stack.token_decimals
    below_price = f"{price_units / 2:.6f}"
    proxy = paying_process(x402_stack, tmp_path / "home", max_per_payment=below_price).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        status, _, _ = get_on(conn, f"{x402_stack.py}/free")
        assert status == 200
        sock = conn.sock
        before = x402_stack.balance_of(x402_stack.pay_to)

        status, headers, _ = get_on(conn, f"{x402_stack.py}/paid/b?before-reload")
        assert (status, headers.get(ERROR.lower())) == (402, "over_max_per_payment")

        # A broken file on SIGHUP changes nothing: the error names the key, the old policy stays.
        proxy.config_path.write_text(proxy.config_path.read_text().replace(below_price, "lots"))
        proxy.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: "reload refused" in proxy.log_text(), what="reload refusal in the log")
        assert "max_per_payment" in proxy.log_text().split("reload refused", 1)[1].splitlines()[0]
        status, headers, _ = get_on(conn, f"{x402_stack.py}/paid/b?after-bad-reload")
        assert (status, headers.get(ERROR.lower())) == (402, "over_max_per_payment")

        # A good file: the higher cap and a session rule apply to the next request, same connection.
        rule = f'[[sessions.rules]]\npattern = "{x402_stack.py}/paid/*"\nttl_seconds = 120\n'
        proxy.config_path.write_text(proxy.config_path.read_text().replace('"lots"', '"0.01"') + rule)
        proxy.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(
            lambda: "configuration reloaded: policy, sessions" in proxy.log_text(), what="reload in the log"
        )
        status, headers, body = get_on(conn, f"{x402_stack.py}/paid/b")
        assert status == 200, body[:500]
        assert conn.sock is sock, "the keep-alive connection was replaced"
        assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
        row = next(r for r in ledger(proxy) if r["id"] == int(headers[PAYMENT.lower()]))
        assert row["state"] == "settled"
        assert session_ttls(proxy.home) == [pytest.approx(120, abs=1)]
        conn.close()
    finally:
        assert proxy.stop() == 0


def admin_url(proxy: ProxyProcess) -> str:
    line = next(line for line in proxy.startup_lines if line.startswith("admin API on "))
    return line.removeprefix("admin API on ").strip()


def test_sigterm_lets_a_paid_request_finish_and_exits_zero(x402_stack: Stack, tmp_path: Path) -> None:
    proxy = paying_process(x402_stack, tmp_path / "home", max_per_payment="0.01").start()
    token = (proxy.home / "admin-token").read_text().strip()
    admin = admin_url(proxy)
    assert requests.get(f"{admin}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok
    before = x402_stack.balance_of(x402_stack.pay_to)
    result: dict[str, requests.Response] = {}

    def slow_paid() -> None:
        result["r"] = requests.get(f"{x402_stack.py}/paid/slow?delay=2.5", proxies=proxies(proxy), timeout=60)

    client = threading.Thread(target=slow_paid)
    client.start()
    wait_for(lambda: ledger(proxy), what="the pending ledger row")
    time.sleep(0.3)  # the paid retry is now out, held by the slow handler
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: draining" in proxy.log_text(), what="drain start")
    ready = requests.get(f"{admin}/readyz", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert ready.status_code == 503
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    client.join(30)
    response = result["r"]
    assert response.status_code == 200, response.text[:500]
    assert proxy.proc.wait(30) == 0
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    rows = ledger(proxy)
    assert [(r["id"], r["state"]) for r in rows] == [(int(response.headers[PAYMENT]), "settled")]
    proxy.stop()


def test_drain_deadline_records_the_paid_request_unknown(x402_stack: Stack, tmp_path: Path) -> None:
    drain = {"X402_PROXY_PROXY__DRAIN_TIMEOUT": "1.0"}
    proxy = paying_process(x402_stack, tmp_path / "home", max_per_payment="0.01", env=drain).start()
    payer_before = x402_stack.balance_of(x402_stack.payer_address)
    outcome: dict[str, Any] = {}

    def slow_paid() -> None:
        try:
            outcome["status"] = requests.get(
                f"{x402_stack.py}/paid/slow?delay=3", proxies=proxies(proxy), timeout=60
            ).status_code
        except requests.RequestException as exc:
            outcome["error"] = exc

    client = threading.Thread(target=slow_paid)
    client.start()
    wait_for(lambda: ledger(proxy), what="the pending ledger row")
    time.sleep(0.3)
    assert proxy.proc is not None
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - started < 6, "the drain deadline was not enforced"
    client.join(30)
    assert "status" not in outcome or outcome["status"] >= 500, outcome
    (row,) = ledger(proxy)
    assert row["state"] == "in_doubt", row
    assert "cancelled" in (row["reason"] or "")
    time.sleep(3.5)  # let the server finish: whatever it settled, at most one price left the payer
    assert payer_before - x402_stack.balance_of(x402_stack.payer_address) in (0, x402_stack.price)
    proxy.stop()
