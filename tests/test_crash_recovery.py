"""SIGKILL the real proxy at each step of a payment, restart it on the same home, check money and state.

Each scenario: a session is opened on `/paid/a` (so there is something to restore), the proxy is
killed while a second payment is at one point of its life, and a new proxy starts on the same home.
Then, on the real chain and in the ledger:
  - no row is left `pending`, and every ledger row whose nonce was used on chain is accounted for:
    payTo's balance delta equals exactly the amounts of those rows;
  - a payment whose outcome the proxy could not know is `unknown`, and a retry of the same request
    is refused `payment_in_doubt` instead of paying again;
  - no point leaves a settled payment without the session it bought (a retry would pay again);
  - the session opened before the crash is back and used without paying.

Most points are reached with the `X402_PROXY_FAULT_PAUSE` hook (proxy/faults.py): the proxy stops
dead at the named point and the test SIGKILLs it there. "Paid request at the upstream" needs no hook:
a real slow handler holds the paid request while the proxy is killed.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.faults import FAULT_PAUSE_ENV
from proxy.store.base import RECONCILED_USED
from tests.stack import PyServer, Stack
from tests.support.crash import (
    ERROR,
    PAYMENT,
    SESSION,
    TIMEOUT,
    assert_ledger_matches_chain,
    get,
    in_background,
    session_rows,
    wait_for,
)
from tests.support.paying_proxy import ledger, stack_config
from tests.support.proxy_process import ProxyProcess


@dataclass(frozen=True)
class CrashPoint:
    fault: str | None  # the fault point the proxy pauses at; None: a real slow upstream holds the request
    path: str  # the paid request in flight when the proxy is killed
    row_state: str  # its ledger row after the restart, once the reconciler has read the chain
    money_moved: bool  # whether its authorization settles on chain
    retry: str  # what the same request does after the restart: in_doubt | undelivered | session


# A row left pending by the crash is `in_doubt` at restart; the reconciler (proxy/payments/reconcile.py)
# then finds its authorization used on chain: `settled_undelivered` (the answer it bought never reached
# the client). The retry never pays again: this server honours Sign-In-With-X, so the proxy signs in as
# the wallet that paid and opens the session that payment bought (a server without SIWX: the retry is
# refused `payment_undelivered`, tests/test_reconcile.py).
CRASH_POINTS = {
    # Row durable, nothing signed yet: the proxy cannot know that (the authorization is still valid on
    # chain), so the row stays in doubt and blocks a retry.
    "a-pending-written": CrashPoint("payment.pending_written", "/paid/b", "in_doubt", False, "in_doubt"),
    # The paid request is at the server (handler sleeping): the server settles although its client died.
    "b-at-upstream": CrashPoint(None, "/paid/slow?delay=4", "settled_undelivered", True, "session"),
    # The server settled and answered; the proxy died before recording it.
    "c-answered-unrecorded": CrashPoint("payment.answered", "/paid/b", "settled_undelivered", True, "session"),
    # What the payment bought (its session) is saved before the row says settled. So:
    # answered and settled, its session not yet saved: the row is in doubt, then settled_undelivered;
    # the retry signs in (SIWX) and opens the session it bought.
    "d-session-unsaved": CrashPoint("session.before_save", "/paid/b", "settled_undelivered", True, "session"),
    # Session saved, the row not yet linked to it nor settled: the session is back and serves the retry
    # (the row says undelivered: the answer was lost, but what it bought rides on).
    "d-session-saved": CrashPoint("session.saved", "/paid/b", "settled_undelivered", True, "session"),
    # Recorded settled with its session saved, the client never got the answer: the retry rides the session.
    "c-recorded-unanswered": CrashPoint("payment.recorded", "/paid/b", "settled", True, "session"),
}
# Reconcile every second: a transfer that lands after the startup pass (b-at-upstream) is seen soon.
RECONCILE_CONFIG = "\n[reconcile]\ninterval = 1.0\n"


@pytest.mark.parametrize("case", list(CRASH_POINTS))
def test_sigkill_at_payment_step(
    case: str, x402_stack: Stack, siwx_server: PyServer, home: Path, running: list[ProxyProcess]
) -> None:
    point = CRASH_POINTS[case]
    price = x402_stack.price
    pay_to_before = x402_stack.balance_of(x402_stack.pay_to)
    verify_before = x402_stack.facilitator_stats()["counts"]["verify"]
    config = stack_config(x402_stack, extra=RECONCILE_CONFIG)
    proxy = ProxyProcess(home, config, {"X402_PROXY_PRIVATE_KEY": x402_stack.payer_key})
    running.append(proxy)

    # 1. A session to restore later: one payment on /paid/a.
    proxy.start()
    opened = get(proxy, f"{siwx_server.url}/paid/a")
    assert opened.status_code == 200 and PAYMENT in opened.headers
    session_a = opened.headers[SESSION]
    assert x402_stack.balance_of(x402_stack.pay_to) - pay_to_before == price

    # 2. Kill the proxy while the next payment is at the crash point.
    if point.fault is not None:
        assert proxy.stop(signal.SIGTERM) == 0
        proxy.env[FAULT_PAUSE_ENV] = point.fault
        proxy.start()
    handled_before = siwx_server.stats()["handled"].get("/paid/slow", 0)
    url = f"{siwx_server.url}{point.path}"
    thread, outcome = in_background(proxy, url)
    if point.fault is not None:
        marker = f"fault point reached: {point.fault}"
        wait_for(lambda: marker in proxy.log_text(), 30, marker)
    else:
        wait_for(
            lambda: siwx_server.stats()["handled"].get("/paid/slow", 0) > handled_before,
            30,
            "the paid request to reach the slow handler",
        )
        assert [r["state"] for r in ledger(proxy)] == ["settled", "pending"]
    proxy.stop(signal.SIGKILL)
    thread.join(TIMEOUT)
    assert "error" in outcome, f"the client got an answer from a killed proxy: {outcome}"

    # 3. Restart on the same home, without the fault.
    proxy.env.pop(FAULT_PAUSE_ENV, None)
    proxy.start()
    if point.money_moved:
        wait_for(
            lambda: x402_stack.balance_of(x402_stack.pay_to) - pay_to_before == 2 * price,
            30,
            "the in-flight payment to settle",
            interval=0.25,
        )
    if point.row_state != "in_doubt":
        wait_for(
            lambda: ledger(proxy)[-1]["state"] == point.row_state, 30, "the row to be resolved", interval=0.25
        )
    rows = assert_ledger_matches_chain(x402_stack, proxy, pay_to_before)
    first, crashed = rows
    assert first["state"] == "settled" and first["session_id"] == session_a
    assert crashed["state"] == point.row_state, crashed
    if point.fault != "payment.recorded":  # the proxy had not recorded the outcome: the chain told it
        assert (crashed["state"] == "settled_undelivered") is (crashed["reason"] or "").startswith(
            RECONCILED_USED
        ), crashed
        assert (crashed["tx_hash"] is not None) is point.money_moved, crashed
    assert crashed["nonce"] and crashed["valid_before"]
    assert (
        x402_stack.chain.authorization_state(x402_stack.payer_address, crashed["nonce"]) is point.money_moved
    )
    # Exactly one authorization per payment ever reached the facilitator (two, or one if nothing left).
    expected_verifies = 2 if point.fault != "payment.pending_written" else 1
    assert x402_stack.facilitator_stats()["counts"]["verify"] - verify_before == expected_verifies
    if point.fault != "payment.recorded":
        assert f"payment #{crashed['id']} was pending at shutdown" in proxy.log_text()

    # The session opened before the crash is back, and free.
    reused = get(proxy, f"{siwx_server.url}/paid/a")
    assert reused.status_code == 200 and reused.headers[SESSION] == session_a
    assert PAYMENT not in reused.headers

    # The interrupted request again.
    paid_so_far = x402_stack.balance_of(x402_stack.pay_to) - pay_to_before
    retry = get(proxy, url)
    if point.retry in ("in_doubt", "undelivered"):
        assert retry.status_code == 402 and retry.headers[ERROR] == f"payment_{point.retry}"
        assert len(ledger(proxy)) == 2, "a second payment was prepared"
        assert x402_stack.balance_of(x402_stack.pay_to) - pay_to_before == paid_so_far
    else:
        assert point.retry == "session"
        assert retry.status_code == 200 and PAYMENT not in retry.headers
        (restored,) = (s for s in session_rows(home) if s != session_a)
        assert retry.headers[SESSION] == restored
        assert session_rows(home)[restored]["payment_ids"] == [crashed["id"]]
        # Killed at session.saved: before the link, so only the session side holds it. (A session claimed
        # with Sign-In-With-X for an undelivered payment is linked when it opens, after the retry.)
        linked = next(r for r in ledger(proxy) if r["id"] == crashed["id"])
        assert linked["session_id"] == (None if point.fault == "session.saved" else restored)
        assert x402_stack.balance_of(x402_stack.pay_to) - pay_to_before == paid_so_far
    final = assert_ledger_matches_chain(x402_stack, proxy, pay_to_before)
    assert len(final) == 2  # never a second payment for the interrupted request
    assert proxy.stop(signal.SIGTERM) == 0
