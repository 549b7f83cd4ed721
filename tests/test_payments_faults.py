"""Faults around a payment, through the real proxy process on the real local stack.

Settlement failing at the facilitator, an unfunded payer the proxy cannot check, a wrong EIP-712
domain name, the proxy's clock off by five minutes, the proxy killed while a payment is in flight,
and the key never leaking into logs or state files. Every test asserts the on-chain outcome.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from eth_account import Account

from tests.stack import Stack
from tests.stack._proc import ManagedProcess, free_port, http_ready, wait_all
from tests.support.crash import get, in_background, wait_for
from tests.support.paying_proxy import ledger, stack_config, start_paying_proxy
from tests.support.proxy_process import ProxyProcess

ERROR = "X-402-Proxy-Error"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def authorizations_since(stack: Stack, before: set[str]) -> set[str]:
    """EIP-3009 nonces the facilitator verified that it had not seen before."""
    return set(stack.facilitator_stats()["authorizations"]) - before


def row_of(proxy: ProxyProcess, response: requests.Response) -> dict[str, Any]:
    return next(r for r in ledger(proxy) if r["id"] == int(response.headers[PAYMENT]))


def fresh_key() -> str:
    return "0x" + bytes(Account.create().key).hex()


def settle_counts(stack: Stack) -> tuple[int, int]:
    counts = stack.facilitator_stats()["counts"]
    return counts["verify"], counts["settle"]


# -- settlement fails ---------------------------------------------------------------------------


def test_facilitator_cannot_settle(x402_stack: Stack, home: Path, running: list[ProxyProcess]) -> None:
    proxy = start_paying_proxy(x402_stack, home)
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    payer_before = x402_stack.balance_of(x402_stack.payer_address)
    x402_stack.facilitator_faults(settle_fail_reason="unexpected_settle_error")
    try:
        response = get(proxy, f"{x402_stack.py}/paid/a")
    finally:
        x402_stack.reset_facilitator_faults()
    # The SDK server ran the handler, then failed to settle: it withholds the resource and answers
    # 402 again with its challenge; the proxy passes that on and flags the payment as rejected.
    assert response.status_code == 402, response.text[:300]
    assert response.headers[ERROR] == "payment_rejected"
    row = row_of(proxy, response)
    assert row["state"] == "rejected"
    assert row["state"] != "settled" and row["tx_hash"] is None
    assert x402_stack.balance_of(x402_stack.pay_to) == before
    assert x402_stack.balance_of(x402_stack.payer_address) == payer_before

    # Once the facilitator recovers the same proxy pays normally (the rejected row costs no budget).
    again = get(proxy, f"{x402_stack.py}/paid/a")
    assert again.status_code == 200
    assert row_of(proxy, again)["state"] == "settled"
    assert x402_stack.balance_of(x402_stack.pay_to) == before + x402_stack.price


def test_facilitator_down(x402_stack: Stack, home: Path, running: list[ProxyProcess]) -> None:
    """A resource server whose facilitator is unreachable: nothing settles, the proxy keeps serving."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = x402_stack.start_py_server(extra_args=["--facilitator", dead])
    proxy = start_paying_proxy(x402_stack, home)
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    try:
        response = get(proxy, f"{server.url}/paid/a")
        assert response.status_code >= 400  # whatever the server says, it cannot have been served paid
        assert all(r["state"] != "settled" for r in ledger(proxy))
        assert x402_stack.balance_of(x402_stack.pay_to) == before
        after = get(proxy, f"{x402_stack.py}/paid/a")  # the healthy server still gets paid
        assert after.status_code == 200 and row_of(proxy, after)["state"] == "settled"
    finally:
        server.stop()


def _config_without_rpc(stack: Stack, **kwargs: Any) -> str:
    text = stack_config(stack, **kwargs)
    without = re.sub(r"\[rpc\]\n[^\[]*", "", text)
    assert "[rpc]" not in without and stack.rpc_url not in without
    return without


def test_unfunded_payer_without_rpc_is_rejected(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    key = fresh_key()
    proxy = ProxyProcess(home, _config_without_rpc(x402_stack), {"X402_PROXY_PRIVATE_KEY": key}).start()
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    verify_before, _ = settle_counts(x402_stack)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    # Without an RPC the proxy cannot see the empty wallet: it signs, the facilitator refuses.
    assert response.status_code == 402
    assert response.headers[ERROR] == "payment_rejected"
    row = row_of(proxy, response)
    assert row["state"] == "rejected"
    assert row["payer"].lower() == Account.from_key(key).address.lower()
    assert "insufficient" in (row["reason"] or "").lower(), row["reason"]
    assert settle_counts(x402_stack)[0] == verify_before + 1  # it really was signed and sent
    assert x402_stack.balance_of(x402_stack.pay_to) == before

    # A rejected payment does not count against the budget, and a retry is not "in doubt".
    second = get(proxy, f"{x402_stack.py}/paid/a")
    assert second.headers[ERROR] == "payment_rejected"
    assert [r["state"] for r in ledger(proxy)] == ["rejected", "rejected"]
    assert x402_stack.balance_of(x402_stack.pay_to) == before


# -- EIP-712 domain name ------------------------------------------------------------------------


def test_wrong_eip712_name_in_config_is_overridden_by_server(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    """Design: the domain in the server's `extra` wins; the configured name is only a fallback.

    The server's requirement is also what its facilitator verifies against, so following it is the
    only way a payment can verify at all; a wrong local name therefore costs nothing.
    """
    proxy = start_paying_proxy(x402_stack, home, eip712_name="USD Coin")
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert response.status_code == 200, response.text[:300]
    assert row_of(proxy, response)["state"] == "settled"
    assert x402_stack.balance_of(x402_stack.pay_to) == before + x402_stack.price


@pytest.fixture(scope="module")
def wrong_domain_server(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The reference FastAPI server, but advertising the token's EIP-712 name as "USD Coin"."""
    port = free_port()
    code = (
        "import sys, uvicorn\n"
        "from tests.stack import server_py\n"
        "cfg = server_py.parse_args(sys.argv[1:])\n"
        "cfg.token_name = 'USD Coin'\n"
        "uvicorn.run(server_py.create_app(cfg), host=cfg.host, port=cfg.port, log_level='warning')\n"
    )
    args = [
        sys.executable,
        "-c",
        code,
        "--port",
        str(port),
        "--facilitator",
        x402_stack.facilitator_url,
        "--asset",
        x402_stack.token,
        "--pay-to",
        x402_stack.pay_to,
        "--price",
        str(x402_stack.price),
    ]
    log = tmp_path_factory.mktemp("wrong-domain") / "server.log"
    proc = ManagedProcess("server_py-wrong-domain", args, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_all([(proc, http_ready(f"{url}/free"), "serving /free")], 60)
        yield url
    finally:
        proc.stop()


def test_server_advertising_wrong_eip712_name(
    x402_stack: Stack, home: Path, running: list[ProxyProcess], wrong_domain_server: str
) -> None:
    """A wrong domain name signs fine, but the token contract's domain differs: the facilitator's
    verify step simulates the transfer, the token reverts "invalid signature", and the server
    answers 402 again. Nothing reaches settlement, no money moves, the row is `rejected`."""
    proxy = start_paying_proxy(x402_stack, home)  # our asset table has the right name, "USDC"
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    payer_before = x402_stack.balance_of(x402_stack.payer_address)
    response = get(proxy, f"{wrong_domain_server}/paid/a")
    assert response.status_code == 402, response.text[:300]
    assert response.headers[ERROR] == "payment_rejected"
    row = row_of(proxy, response)
    assert row["state"] == "rejected"
    assert "signature" in (row["reason"] or ""), row["reason"]
    assert row["tx_hash"] is None
    assert x402_stack.balance_of(x402_stack.pay_to) == before
    assert x402_stack.balance_of(x402_stack.payer_address) == payer_before


# -- the proxy's clock is off -------------------------------------------------------------------


@pytest.mark.parametrize("skew", [+300, -300], ids=["fast-5m", "slow-5m"])
def test_proxy_clock_skew(x402_stack: Stack, home: Path, running: list[ProxyProcess], skew: int) -> None:
    if not FAKETIME_LIB.exists():
        pytest.skip(f"{FAKETIME_LIB} missing: apt-get install faketime (Makefile apt-test)")
    assert abs(x402_stack.chain.latest_timestamp() - time.time()) < 120, "the chain's clock was moved"
    env = {
        "X402_PROXY_PRIVATE_KEY": x402_stack.payer_key,
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": f"{skew:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timers and timeouts keep running at real speed
        "FAKETIME_NO_CACHE": "1",
    }
    proxy = ProxyProcess(home, stack_config(x402_stack), env).start()
    running.append(proxy)
    before = x402_stack.balance_of(x402_stack.pay_to)
    sent_at = time.time()
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert response.status_code == 200, response.text[:300] + proxy.log_text()[-2000:]
    row = row_of(proxy, response)
    assert row["state"] == "settled"
    # The proxy really ran on the skewed clock: its ledger timestamps are off by the skew.
    assert abs((row["created_at"] - sent_at) - skew) < 30, (row["created_at"], sent_at)
    assert x402_stack.balance_of(x402_stack.pay_to) == before + x402_stack.price


# -- killed while a payment is in flight --------------------------------------------------------


def test_sigkill_while_pending_never_pays_twice(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    proxy = start_paying_proxy(x402_stack, home)
    running.append(proxy)
    url = f"{x402_stack.py}/paid/slow?delay=5"
    before = x402_stack.balance_of(x402_stack.pay_to)
    verify_before, _ = settle_counts(x402_stack)
    authorizations_before = set(x402_stack.facilitator_stats()["authorizations"])
    handled_before = x402_stack.server_stats(x402_stack.py)["handled"].get("/paid/slow", 0)

    thread, outcome = in_background(proxy, url)
    # The paid request is at the server (verified, handler sleeping) and the row is still pending.
    wait_for(lambda: [r["state"] for r in ledger(proxy)] == ["pending"], 15, "a pending ledger row")
    wait_for(
        lambda: x402_stack.server_stats(x402_stack.py)["handled"].get("/paid/slow", 0) > handled_before,
        15,
        "the paid request to reach the handler",
    )
    proxy.stop(signal.SIGKILL)
    thread.join(30)
    assert "error" in outcome, "the client should have lost its connection"

    proxy.start()  # same home, same config
    (row,) = ledger(proxy)
    assert row["state"] == "in_doubt", row
    assert "stopped" in row["reason"]
    assert row["nonce"] and row["valid_before"]

    # The same request again: a new 402 arrives, but the first authorization may still settle.
    retry = get(proxy, url)
    assert retry.status_code == 402
    assert retry.headers[ERROR] == "payment_in_doubt"
    assert len(ledger(proxy)) == 1, "a second payment was prepared"

    # Let the first handler finish and its settlement land (or not), then look at the chain.
    wait_for(
        lambda: x402_stack.balance_of(x402_stack.pay_to) != before,
        30,
        "the first payment to settle",
        interval=0.25,
    )
    delta = x402_stack.balance_of(x402_stack.pay_to) - before
    # The reference server finishes the handler and settles although its client is gone: the first
    # authorization did move money, so paying the retry would have paid twice for one need.
    assert delta == x402_stack.price, delta
    # Exactly one authorization was ever sent: the retry presented the identical payload again (at most
    # once more), never a new signature.
    assert settle_counts(x402_stack)[0] in (verify_before + 1, verify_before + 2)
    assert row["nonce"].lower() in x402_stack.facilitator_stats()["authorizations"]
    assert len(authorizations_since(x402_stack, authorizations_before)) == 1

    # Still in doubt after the settlement until the reconciler's next pass (every 60 s): refused again,
    # at most the same payload presented once more, never a new authorization.
    again = get(proxy, url)
    assert again.headers[ERROR] == "payment_in_doubt"
    assert x402_stack.balance_of(x402_stack.pay_to) - before == delta
    assert settle_counts(x402_stack)[0] <= verify_before + 3
    assert len(authorizations_since(x402_stack, authorizations_before)) == 1


# -- the key never leaks ------------------------------------------------------------------------


def test_private_key_never_written_outside_key_file(
    x402_stack: Stack, home: Path, running: list[ProxyProcess]
) -> None:
    key = x402_stack.payer_key
    home.mkdir(mode=0o700, parents=True)
    key_file = home / "wallet.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (key + "\n").encode())
    os.close(fd)
    extra = f'[wallet]\nkey_file = "{key_file}"\n[log]\nlevel = "debug"\n'
    proxy = ProxyProcess(home, stack_config(x402_stack, extra=extra), {})
    proxy.env.pop("X402_PROXY_PRIVATE_KEY", None)
    running.append(proxy.start())

    # httpx's client closes its connections on exit, so the proxy can stop without a drain wait.
    with httpx.Client(proxy=proxy.url, timeout=TIMEOUT, trust_env=False) as client:
        for base in (x402_stack.py, x402_stack.express_v2, x402_stack.express_v1):
            response = client.get(f"{base}/paid/a")
            assert response.status_code == 200, response.text[:300]
            # The receipt is what a client sees of the payment: it names the payer, never the key.
            receipt = response.headers.get("PAYMENT-RESPONSE") or response.headers.get("X-PAYMENT-RESPONSE")
            assert (
                receipt and key[2:].lower() not in json.dumps(json.loads(base64.b64decode(receipt))).lower()
            )
        assert client.get(f"{x402_stack.py}/paid/fail500").status_code == 500
    cli = proxy.cli("config", "check")
    proxy.stop()
    assert "paying from wallet" in proxy.log_text()

    body = key[2:]
    needles = [
        n.encode() for n in {body.lower(), body.upper(), "0x" + body.lower(), "0x" + body.upper(), body}
    ]
    needles.append(bytes.fromhex(body))  # the raw 32 bytes too
    scanned = []
    candidates = [proxy.log_path, proxy.config_path, *sorted(p for p in home.rglob("*") if p.is_file())]
    for path in candidates:
        if path == key_file:
            continue
        data = path.read_bytes()
        scanned.append(path.name)
        for needle in needles:
            assert needle not in data, f"private key material found in {path}"
    assert "state.db" in scanned and proxy.log_path.name in scanned
    for text in (cli.stdout, cli.stderr):
        assert body.lower() not in text.lower()
