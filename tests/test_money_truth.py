"""Money truth under slow or ambiguous settlement (issue 12), on real chains and reference servers.

- A private anvil whose mining is paused, behind the SDK facilitator with a 2 s confirmation timeout:
  settle answers `settlement_pending` with the broadcast hash, as a slow real chain does. The FastAPI
  reference server and `@x402/express` sit in front of it.
- Servers that lie about settlement (tests/support/liar_server.py) on the shared stack.

Every test asserts on chain: at most one price per need, the ledger equal to the chain (`audit`).
Each test pays from its own fresh wallet, so the audit of its ledger sees only its own transfers.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account

from tests.stack import Stack, start_stack
from tests.support.admin import AdminProxy
from tests.support.crash import ERROR, PAYMENT, get, wait_for
from tests.support.liar_server import FAKE_TX, LiarServer
from tests.support.paying_proxy import ledger, proxies, stack_config, wait_warmed
from tests.support.proxy_process import ProxyProcess

RECONCILE = "\n[reconcile]\ninterval = 1.0\n"
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("slow-stack"), confirmation_timeout=2)
    yield stack
    stack.stop()


def funded_key(stack: Stack) -> str:
    key = "0x" + bytes(Account.create().key).hex()
    stack.mint(Account.from_key(key).address, 10**9)
    return key


def start_proxy(
    stack: Stack, home: Path, key: str, policy: str = "", env: dict[str, str] | None = None
) -> AdminProxy:
    config = stack_config(
        stack, policy=policy or 'daily_budget = "5"\nper_host_daily_budget = "5"', extra=RECONCILE
    )
    return AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": key, **(env or {})}).start()


def audit(proxy: AdminProxy) -> tuple[int, dict[str, Any]]:
    response = proxy.call("GET", "/audit?since=3600")
    assert response.status_code == 200, response.text
    cli = proxy.admin_cli("audit", "--since", "1h")
    data: dict[str, Any] = response.json()
    assert cli.returncode == (0 if data["ok"] else 1), cli.stdout + cli.stderr
    return cli.returncode, data


def paused(stack: Stack) -> Any:
    class Paused:
        def __enter__(self) -> None:
            stack.chain.set_automine(False)

        def __exit__(self, *exc: object) -> None:
            stack.chain.set_automine(True)
            stack.chain.mine()

    return Paused()


@pytest.mark.parametrize("server", ["py", "express_v2"])
def test_settlement_pending_is_in_doubt_and_never_signed_twice(
    slow_stack: Stack, home: Path, running: list[ProxyProcess], server: str
) -> None:
    stack = slow_stack
    key = funded_key(stack)
    proxy = start_proxy(stack, home, key)
    running.append(proxy)
    url = f"{getattr(stack, server)}/paid/a"
    before = stack.balance_of(stack.pay_to)
    seen_before = set(stack.facilitator_stats()["authorizations"])
    with paused(stack):
        first = get(proxy, url)
        assert first.status_code == 402 and first.headers[ERROR] == "payment_in_doubt", first.headers
        assert int(first.headers["Retry-After"]) >= 1
        (row,) = ledger(proxy)
        assert row["state"] == "in_doubt" and row["presentations"] == 1, row
        if server == "py":  # the SDK server passes the facilitator's pending receipt on, hash included
            assert row["tx_hash"] and "settlement_pending" in row["reason"], row
        # The client gives up and retries at once, and three more clients want the same need.
        answers: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(get(proxy, url))) for _ in range(3)]
        for thread in threads:
            thread.start()
        again = get(proxy, url)
        for thread in threads:
            thread.join(60)
        for answer in [again, *answers]:
            assert answer.status_code == 402 and answer.headers[ERROR] == "payment_in_doubt", answer.headers
        assert len(ledger(proxy)) == 1, "a second payment was prepared"
        assert stack.balance_of(stack.pay_to) == before  # nothing mined yet
    # Blocks come: the one transfer that was broadcast is mined; the chain decides the row.
    wait_for(lambda: stack.balance_of(stack.pay_to) - before == stack.price, 30, "the transfer", 0.25)
    wait_for(lambda: ledger(proxy)[0]["state"] != "in_doubt", 30, "the reconciler", 0.25)
    (row,) = ledger(proxy)
    assert row["state"] == "settled_undelivered" and row["chain_state"] == "used", row
    retry = get(proxy, url)
    assert retry.status_code == 402 and retry.headers[ERROR] == "payment_undelivered", retry.headers
    assert stack.balance_of(stack.pay_to) - before == stack.price  # one price for one need
    assert len(set(stack.facilitator_stats()["authorizations"]) - seen_before) == 1  # one authorization
    assert len(ledger(proxy)) == 1
    code, data = audit(proxy)
    assert code == 0 and len(data["networks"][0]["matched"]) == 1, data
    budget = proxy.call("GET", "/budget").json()
    assert float(budget["global"]["spent"]) == stack.price / 10**6, budget


def test_presenting_the_same_payload_again_delivers_once_blocks_come(
    slow_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    stack = slow_stack
    proxy = start_proxy(stack, home, funded_key(stack))
    running.append(proxy)
    url = f"{stack.py}/paid/b"
    before = stack.balance_of(stack.pay_to)
    with paused(stack):
        first = get(proxy, url)
        assert first.status_code == 402 and first.headers[ERROR] == "payment_in_doubt"
        time.sleep(1.2)  # the backoff before the first re-presentation
        # The retry presents the identical payload; blocks come while its settle waits for the receipt.
        miner = threading.Timer(1.0, lambda: (stack.chain.set_automine(True), stack.chain.mine()))
        miner.start()
        retry = get(proxy, url)
        miner.join()
    assert retry.status_code == 200, (retry.status_code, retry.headers, proxy.log_text()[-2000:])
    (row,) = ledger(proxy)
    assert retry.headers[PAYMENT] == str(row["id"])
    assert row["state"] == "settled" and row["presentations"] == 2 and row["delivered"] == 1, row
    assert stack.balance_of(stack.pay_to) - before == stack.price
    wait_for(lambda: ledger(proxy)[0]["chain_state"] == "used", 30, "the chain to confirm", 0.25)
    assert audit(proxy)[0] == 0


def test_sigkill_while_in_doubt_signs_nothing_new_after_restart(
    slow_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    stack = slow_stack
    proxy = start_proxy(stack, home, funded_key(stack))
    running.append(proxy)
    url = f"{stack.py}/paid/a"
    before = stack.balance_of(stack.pay_to)
    seen_before = set(stack.facilitator_stats()["authorizations"])
    with paused(stack):
        first = get(proxy, url)
        assert first.headers[ERROR] == "payment_in_doubt"
        proxy.stop(signal.SIGKILL)
        proxy.start()
        retry = get(proxy, url)
        assert retry.status_code == 402 and retry.headers[ERROR] == "payment_in_doubt", retry.headers
        assert len(ledger(proxy)) == 1
    wait_for(lambda: ledger(proxy)[0]["state"] == "settled_undelivered", 30, "the reconciler", 0.25)
    assert stack.balance_of(stack.pay_to) - before == stack.price
    assert len(set(stack.facilitator_stats()["authorizations"]) - seen_before) == 1
    assert audit(proxy)[0] == 0


# -- servers that lie about settlement -----------------------------------------------------------


@pytest.fixture(scope="module")
def liar(x402_stack: Stack) -> Iterator[LiarServer]:
    server = LiarServer(x402_stack).start()
    yield server
    server.stop()


def test_servers_that_lie_about_settlement_are_corrected_by_the_chain(
    x402_stack: Stack, liar: LiarServer, home: Path, running: list[ProxyProcess]
) -> None:
    stack = x402_stack
    key = funded_key(stack)
    liar.other_tx = stack.mint(Account.create().address, 1)  # someone else's real transaction
    proxy = start_proxy(stack, home, key)
    running.append(proxy)
    wait_warmed(proxy)  # the reconciler's start-up pass first: the rows below are the server's word
    before = stack.balance_of(stack.pay_to)
    answers = {kind: get(proxy, f"{liar.url}/{kind}/x") for kind in ("success-no-tx", "fake-tx", "other-tx")}
    assert all(a.status_code == 200 for a in answers.values())
    rows = {r["url"].split("/")[3]: r for r in ledger(proxy)}
    assert rows["success-no-tx"]["state"] == "in_doubt" and rows["success-no-tx"]["delivered"] == 1
    assert rows["fake-tx"]["state"] == "settled" and rows["fake-tx"]["tx_hash"] == FAKE_TX
    assert rows["other-tx"]["state"] == "settled"  # the server's word, until the chain disagrees

    def resolved() -> bool:
        now = {r["url"].split("/")[3]: r for r in ledger(proxy)}
        return now["success-no-tx"]["chain_state"] == "used" and now["fake-tx"]["chain_state"] == "used"

    wait_for(resolved, 30, "the reconciler", 0.25)
    rows = {r["url"].split("/")[3]: r for r in ledger(proxy)}
    assert rows["success-no-tx"]["state"] == "settled" and rows["success-no-tx"]["tx_hash"]
    real = rows["fake-tx"]["tx_hash"]
    assert real != FAKE_TX and stack.chain.w3.eth.get_transaction_receipt(real)["status"] == 1
    assert f"the server named tx {FAKE_TX}" in rows["fake-tx"]["reason"]
    # Nothing moved for other-tx (still valid, so not final), and the audit says the ledger is wrong there.
    assert rows["other-tx"]["chain_state"] is None
    assert stack.balance_of(stack.pay_to) - before == 2 * stack.price
    code, data = audit(proxy)
    report = data["networks"][0]
    assert code == 1 and [r["id"] for r in report["ledger_only"]] == [rows["other-tx"]["id"]], report
    assert len(report["matched"]) == 2 and not report["chain_only"], report


def test_a_server_that_settles_and_answers_402_or_500_cannot_refill_the_budget(
    x402_stack: Stack, liar: LiarServer, home: Path, running: list[ProxyProcess]
) -> None:
    if not FAKETIME_LIB.exists():
        pytest.fail(f"{FAKETIME_LIB} missing: apt-get install faketime (Makefile apt-test)")
    stack = x402_stack
    key = funded_key(stack)
    budget = 3 * stack.price / 10**6
    policy = f'daily_budget = "{budget}"\nper_host_daily_budget = "{budget}"'
    proxy = start_proxy(stack, home, key, policy)
    running.append(proxy)
    before = stack.balance_of(stack.pay_to)

    def hammer(round_: int) -> list[str]:
        codes = []
        for i in range(6):
            kind = "settle-then-402" if i % 2 else "settle-then-500"
            answer = requests.get(f"{liar.url}/{kind}/{round_}-{i}", proxies=proxies(proxy), timeout=60)
            codes.append(answer.headers.get(ERROR, ""))
        return codes

    first = hammer(1)
    assert first.count("budget_exhausted") == 3, first
    assert stack.balance_of(stack.pay_to) - before == 3 * stack.price
    wait_for(
        lambda: all(r["state"] == "settled_undelivered" for r in ledger(proxy) if r["state"] != "dry_run"),
        30,
        "the chain to show the money moved",
        0.25,
    )
    # Past every authorization window by the proxy's clock (+20 min): the rows still count.
    assert proxy.stop(signal.SIGTERM) == 0
    proxy.env.update(
        {
            "LD_PRELOAD": str(FAKETIME_LIB),
            "FAKETIME": "+1200s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1",
        }
    )
    proxy.start()
    second = hammer(2)
    assert second == ["budget_exhausted"] * 6, second
    assert stack.balance_of(stack.pay_to) - before == 3 * stack.price  # the budget held on chain
    spent = proxy.call("GET", "/budget").json()
    assert (
        float(spent["global"]["spent"]) == budget and liar.url.split("//")[1].split(":")[0] in spent["hosts"]
    )
    assert audit(proxy)[0] == 0


def test_a_transfer_signed_outside_the_proxy_is_chain_only_in_the_audit(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    stack = x402_stack
    key = funded_key(stack)
    proxy = start_proxy(stack, home, key)
    running.append(proxy)
    assert get(proxy, f"{stack.py}/paid/a").status_code == 200
    wait_for(lambda: ledger(proxy)[0]["chain_state"] == "used", 30, "the chain to confirm", 0.25)
    assert audit(proxy)[0] == 0
    # The same key pays someone directly, without the proxy.
    account = Account.from_key(key)
    stack.chain.rpc("anvil_setBalance", [account.address, hex(10**18)])  # gas for its own transaction
    transfer = stack.chain.token.functions.transfer(stack.pay_to, 1234).build_transaction(
        {
            "from": account.address,
            "nonce": stack.chain.w3.eth.get_transaction_count(account.address),
            "gas": 100_000,
        }
    )
    stack.chain.w3.eth.send_raw_transaction(account.sign_transaction(transfer).raw_transaction)
    code, data = audit(proxy)
    chain_only = data["networks"][0]["chain_only"]
    assert code == 1 and [(c["kind"], c["amount"]) for c in chain_only] == [("transfer", "1234")], data
