"""Paying real reference servers on a real local chain, through the proxy, with real clients."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import requests

from tests.stack import Stack
from tests.support.paying_proxy import ledger, proxies, start_paying_proxy
from tests.support.proxy_process import ProxyProcess


@pytest.fixture(scope="module")
def paying(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = start_paying_proxy(x402_stack, tmp_path_factory.mktemp("paying") / "home")
    yield process
    process.stop()


@pytest.mark.parametrize("server", ["py", "express_v2", "express_v1"])
def test_curl_pays_each_reference_server(paying: ProxyProcess, x402_stack: Stack, server: str) -> None:
    base = getattr(x402_stack, server)
    before = x402_stack.balance_of(x402_stack.pay_to)
    payer_before = x402_stack.balance_of(x402_stack.payer_address)
    result = subprocess.run(
        ["curl", "-sS", "-i", "-x", paying.url, "--noproxy", "", f"{base}/paid/a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    head, _, _body = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert head.startswith("HTTP/1.1 200"), result.stdout[:2000] + paying.log_text()[-2000:]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\n")[1:])}
    ledger_id = int(headers["x-402-proxy-payment"])
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert payer_before - x402_stack.balance_of(x402_stack.payer_address) == x402_stack.price
    row = next(r for r in ledger(paying) if r["id"] == ledger_id)
    assert row["state"] == "settled"
    assert int(row["amount"]) == x402_stack.price
    assert row["tx_hash"] and row["tx_hash"].startswith("0x")
    assert row["x402_version"] == (1 if server == "express_v1" else 2)


def test_v1_browser_request_gets_paid_not_paywalled(paying: ProxyProcess, x402_stack: Stack) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    browser = {"Accept": "text/html,application/xhtml+xml", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    response = requests.get(
        f"{x402_stack.express_v1}/paid/a", headers=browser, proxies=proxies(paying), timeout=60
    )
    assert response.status_code == 200, response.text[:500]
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price


def test_free_route_and_payment_header_already_present(paying: ProxyProcess, x402_stack: Stack) -> None:
    rows = len(ledger(paying))
    free = requests.get(f"{x402_stack.py}/free", proxies=proxies(paying), timeout=30)
    assert free.status_code == 200 and "X-402-Proxy-Payment" not in free.headers
    before = x402_stack.balance_of(x402_stack.pay_to)
    carried = requests.get(
        f"{x402_stack.py}/paid/a",
        headers={"PAYMENT-SIGNATURE": "bm90LWEtcGF5bWVudA=="},
        proxies=proxies(paying),
        timeout=30,
    )
    assert carried.status_code == 402
    assert "X-402-Proxy-Error" not in carried.headers  # untouched: the client is paying itself
    assert len(ledger(paying)) == rows
    assert x402_stack.balance_of(x402_stack.pay_to) == before


def test_handler_500_after_verification_is_unsettled(paying: ProxyProcess, x402_stack: Stack) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    response = requests.get(f"{x402_stack.py}/paid/fail500", proxies=proxies(paying), timeout=60)
    assert response.status_code == 500
    row = next(r for r in ledger(paying) if r["id"] == int(response.headers["X-402-Proxy-Payment"]))
    assert row["state"] == "unsettled"
    assert x402_stack.balance_of(x402_stack.pay_to) == before


def test_post_body_replayed_exactly(paying: ProxyProcess, x402_stack: Stack) -> None:
    payload = json.dumps({"question": "what is x402?", "pad": "z" * 5000}).encode()
    response = requests.post(
        f"{x402_stack.py}/paid/echo",
        data=payload,
        headers={"Content-Type": "application/json"},
        proxies=proxies(paying),
        timeout=60,
    )
    assert response.status_code == 200, response.text[:300]
    echoed = response.json()
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert echoed["headers"]["content-type"] == "application/json"
    assert "X-402-Proxy-Payment" in response.headers


def test_body_too_large_to_replay(paying: ProxyProcess, x402_stack: Stack) -> None:
    before = x402_stack.balance_of(x402_stack.pay_to)
    response = requests.post(
        f"{x402_stack.py}/paid/echo", data=b"x" * (11 * 1024 * 1024), proxies=proxies(paying), timeout=60
    )
    assert response.status_code == 402
    assert response.headers["X-402-Proxy-Error"] == "body_too_large_to_replay"
    assert x402_stack.balance_of(x402_stack.pay_to) == before


def test_httpx_over_intercepted_https(paying_https: tuple[ProxyProcess, str], x402_stack: Stack) -> None:
    proxy, base = paying_https
    before = x402_stack.balance_of(x402_stack.pay_to)
    import ssl

    ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
    with httpx.Client(proxy=proxy.url, verify=ctx, timeout=60) as client:
        response = client.get(f"{base}/paid/a")
    assert response.status_code == 200, response.text[:500]
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert ledger(proxy)[-1]["state"] == "settled"
    assert ledger(proxy)[-1]["url"].startswith("https://")


@pytest.fixture(scope="module")
def paying_https(
    x402_stack: Stack,
    tmp_path_factory: pytest.TempPathFactory,
    upstream_ca,  # type: ignore[no-untyped-def]
) -> Iterator[tuple[ProxyProcess, str]]:
    directory = tmp_path_factory.mktemp("paid-tls")
    cert = upstream_ca.issue(directory, ["127.0.0.2"])
    server = x402_stack.start_py_server(
        host="127.0.0.2", ssl_certfile=cert.cert_path, ssl_keyfile=cert.key_path
    )
    process = start_paying_proxy(x402_stack, directory / "home", upstream_ca=upstream_ca.cert_path)
    yield process, server.url
    process.stop()
    server.stop()
