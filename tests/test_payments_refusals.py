"""Refusals through the real proxy process on the real local stack.

Every refusal is checked four ways: what the client sees (the upstream's 402 plus
`X-402-Proxy-Error: <reason>`), the ledger (no `pending`/`settled` row; a `dry_run` row only in dry
run), the facilitator (never asked to verify: nothing was signed and sent) and the chain (payTo's
TestUSDC balance unchanged).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from aiohttp import ClientSession, web
from eth_account import Account

from tests.stack import PAY_TO_2, Stack
from tests.support.paying_proxy import ledger, proxies, stack_config, start_paying_proxy, wait_warmed
from tests.support.proxy_process import ProxyProcess

ERROR = "X-402-Proxy-Error"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60


# -- helpers ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What must not change when the proxy refuses: payTo's balance and the facilitator's work."""

    stack: Stack
    pay_to: str
    balance: int = 0
    verify: int = 0
    settle: int = 0

    def __post_init__(self) -> None:
        self.balance = self.stack.balance_of(self.pay_to)
        counts = self.stack.facilitator_stats()["counts"]
        self.verify, self.settle = counts["verify"], counts["settle"]

    def assert_nothing_moved(self) -> None:
        assert self.stack.balance_of(self.pay_to) == self.balance, "payTo balance changed on chain"
        counts = self.stack.facilitator_stats()["counts"]
        assert (counts["verify"], counts["settle"]) == (self.verify, self.settle), (
            "a payment reached the facilitator"
        )


def get(proxy: ProxyProcess, url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT, **kwargs)


def assert_refused(response: requests.Response, code: str, proxy: ProxyProcess) -> None:
    assert response.status_code == 402, response.text[:500] + proxy.log_text()[-2000:]
    assert response.headers.get(ERROR) == code, (dict(response.headers), proxy.log_text()[-2000:])
    assert PAYMENT not in response.headers
    assert ledger(proxy) == [], "a refusal must not leave a payment row"


def assert_paid(response: requests.Response, proxy: ProxyProcess) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:500] + proxy.log_text()[-2000:]
    assert ERROR not in response.headers
    row = next(r for r in ledger(proxy) if r["id"] == int(response.headers[PAYMENT]))
    assert row["state"] == "settled"
    return row


def fresh_key() -> str:
    """A key no one has ever funded (PAYER_2 might be topped up by some other test)."""
    return "0x" + bytes(Account.create().key).hex()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def started() -> Iterator[list[ProxyProcess]]:
    """Proxies started by a test; stopped afterwards whatever happened."""
    procs: list[ProxyProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


def paying(stack: Stack, home: Path, started: list[ProxyProcess], **config: Any) -> ProxyProcess:
    proc = start_paying_proxy(stack, home, **config)
    started.append(proc)
    return proc


# -- policy refusals ----------------------------------------------------------------------------


def test_over_max_per_payment(x402_stack: Stack, home: Path, started: list[ProxyProcess]) -> None:
    proxy = paying(x402_stack, home, started)  # max_per_payment = "0.01"
    with x402_stack.start_py_server(price=20_000) as expensive:  # 0.02 TUSDC
        snap = Snapshot(x402_stack, x402_stack.pay_to)
        response = get(proxy, f"{expensive.url}/paid/a")
        assert_refused(response, "over_max_per_payment", proxy)
        snap.assert_nothing_moved()
        assert expensive.stats()["handled"].get("/paid/a", 0) == 0


@pytest.mark.parametrize(
    ("code", "config"),
    [
        # 84532 is a testnet, but the policy lists only another one.
        ("network_not_allowed", {"policy": 'allowed_networks = ["polygon-amoy"]'}),
        # No [[assets]] entry: the local token's decimals are unknown, so it cannot be priced.
        ("asset_not_allowed", {"with_asset": False}),
        ("host_not_allowed", {"policy": 'host_deny = ["127.0.0.*"]'}),
    ],
)
def test_policy_refusals(
    x402_stack: Stack, home: Path, started: list[ProxyProcess], code: str, config: dict[str, Any]
) -> None:
    proxy = paying(x402_stack, home, started, **config)
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert_refused(response, code, proxy)
    assert response.content == b"{}"  # the server's own 402 body, passed through
    assert "PAYMENT-REQUIRED" in response.headers  # and its challenge, for the client to inspect
    snap.assert_nothing_moved()


def test_pay_to_deny_list(x402_stack: Stack, home: Path, started: list[ProxyProcess]) -> None:
    proxy = paying(x402_stack, home, started, policy=f'pay_to_deny = ["{x402_stack.pay_to.lower()}"]')
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    for base in (x402_stack.py, x402_stack.express_v2, x402_stack.express_v1):
        assert_refused(get(proxy, f"{base}/paid/a"), "pay_to_not_allowed", proxy)
    snap.assert_nothing_moved()


def test_daily_budget_fits_one_payment(x402_stack: Stack, home: Path, started: list[ProxyProcess]) -> None:
    price = x402_stack.price  # 0.001
    proxy = paying(x402_stack, home, started, policy='daily_budget = "0.0015"')
    before = x402_stack.balance_of(x402_stack.pay_to)
    assert_paid(get(proxy, f"{x402_stack.py}/paid/a"), proxy)
    assert x402_stack.balance_of(x402_stack.pay_to) == before + price

    snap = Snapshot(x402_stack, x402_stack.pay_to)
    for base in (x402_stack.py, x402_stack.express_v2):  # the global budget covers every host
        second = get(proxy, f"{base}/paid/a")
        assert second.status_code == 402
        assert second.headers[ERROR] == "budget_exhausted"
        assert PAYMENT not in second.headers
    assert [r["state"] for r in ledger(proxy)] == ["settled"]
    snap.assert_nothing_moved()


def test_concurrent_requests_cannot_overspend(
    x402_stack: Stack, home: Path, started: list[ProxyProcess]
) -> None:
    """Five clients at once against a budget that fits one payment: exactly one pays."""
    proxy = paying(x402_stack, home, started, policy='daily_budget = "0.0015"')
    before = x402_stack.balance_of(x402_stack.pay_to)
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: get(proxy, f"{x402_stack.py}/paid/slow?delay=1"), range(5)))
    statuses = sorted((r.status_code, r.headers.get(ERROR, "")) for r in responses)
    assert statuses == [(200, "")] + [(402, "budget_exhausted")] * 4, statuses
    assert [r["state"] for r in ledger(proxy)] == ["settled"]
    assert x402_stack.balance_of(x402_stack.pay_to) == before + x402_stack.price


def test_per_host_budget(x402_stack: Stack, home: Path, started: list[ProxyProcess]) -> None:
    price = x402_stack.price
    proxy = paying(
        x402_stack, home, started, policy='daily_budget = "1.00"\nper_host_daily_budget = "0.0015"'
    )
    with x402_stack.start_py_server(host="127.0.0.2") as other_host:
        before = x402_stack.balance_of(x402_stack.pay_to)
        assert_paid(get(proxy, f"{x402_stack.py}/paid/a"), proxy)

        snap = Snapshot(x402_stack, x402_stack.pay_to)
        second = get(proxy, f"{x402_stack.py}/paid/b")  # same host 127.0.0.1, another resource
        assert second.status_code == 402 and second.headers[ERROR] == "budget_exhausted"
        snap.assert_nothing_moved()

        # Another host has its own allowance.
        assert_paid(get(proxy, f"{other_host.url}/paid/a"), proxy)
        assert x402_stack.balance_of(x402_stack.pay_to) == before + 2 * price
        rows = ledger(proxy)
        assert [(r["host"], r["state"]) for r in rows] == [("127.0.0.1", "settled"), ("127.0.0.2", "settled")]


def test_insufficient_balance_checked_over_rpc(
    x402_stack: Stack, home: Path, started: list[ProxyProcess]
) -> None:
    key = fresh_key()
    payer = Account.from_key(key).address
    assert x402_stack.balance_of(payer) == 0
    proxy = paying(x402_stack, home, started, key=key)  # stack_config has [rpc] for the chain
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert_refused(response, "insufficient_balance", proxy)
    snap.assert_nothing_moved()


def test_dry_run_records_but_signs_nothing(
    x402_stack: Stack, home: Path, started: list[ProxyProcess]
) -> None:
    proxy = paying(x402_stack, home, started, policy="dry_run = true")
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    handled_before = x402_stack.server_stats(x402_stack.py)["handled"].get("/paid/a", 0)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert response.status_code == 402
    assert response.headers[ERROR] == "dry_run"
    rows = ledger(proxy)
    assert len(rows) == 1
    row = rows[0]
    assert int(response.headers[PAYMENT]) == row["id"]
    assert row["state"] == "dry_run"
    assert int(row["amount"]) == x402_stack.price
    assert row["pay_to"].lower() == x402_stack.pay_to.lower()
    assert row["nonce"] is None and row["tx_hash"] is None  # no authorization was drawn or signed
    snap.assert_nothing_moved()
    assert x402_stack.server_stats(x402_stack.py)["handled"].get("/paid/a", 0) == handled_before


def test_no_wallet_passes_the_402_through(x402_stack: Stack, home: Path, started: list[ProxyProcess]) -> None:
    proxy = ProxyProcess(home, stack_config(x402_stack), {})
    proxy.env.pop("X402_PROXY_PRIVATE_KEY", None)
    started.append(proxy.start())
    direct = httpx.get(f"{x402_stack.py}/paid/a", trust_env=False, timeout=TIMEOUT)
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    response = get(proxy, f"{x402_stack.py}/paid/a")
    assert_refused(response, "no_wallet", proxy)
    assert response.content == direct.content
    assert response.headers["PAYMENT-REQUIRED"] == direct.headers["payment-required"]
    snap.assert_nothing_moved()
    assert "no wallet configured" in proxy.log_text()


# -- hostile or odd 402s ------------------------------------------------------------------------

TEST_HOST = "127.0.0.2"
GREEDY_PAY_TO = PAY_TO_2.address


@dataclass
class OddServer:
    url: str = ""
    routes: dict[str, Callable[[], web.StreamResponse]] = field(default_factory=dict)


def _b64(document: Any) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def _odd_routes(stack: Stack) -> dict[str, Callable[[], web.StreamResponse]]:
    real = json.loads(
        base64.b64decode(
            httpx.get(f"{stack.py}/paid/a", trust_env=False, timeout=TIMEOUT).headers["payment-required"]
        )
    )

    def with_amount(amount: Any) -> dict[str, Any]:
        document = copy.deepcopy(real)
        document["accepts"][0]["amount"] = amount
        return document

    def v2(document: Any) -> Callable[[], web.StreamResponse]:
        header = document if isinstance(document, str) else _b64(document)
        return lambda: web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    v1_entry = {
        "scheme": "exact",
        "network": "base-sepolia",
        "maxAmountRequired": "1000",
        "asset": stack.token,
        "payTo": stack.pay_to,
        "resource": "http://127.0.0.2/x",
        "description": "",
        "mimeType": "application/json",
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    }
    many_v1 = {"x402Version": 1, "error": "pay", "accepts": [v1_entry] * 10_000}
    return {
        "/plain": lambda: web.Response(
            status=402, text="Payment Required: subscribe at example.org\n", headers={"X-Odd": "kept"}
        ),
        "/bad-base64": v2("%%% this is not base64 %%%"),
        "/not-json": v2(base64.b64encode(b"\xff\xfe not json").decode()),
        "/negative": v2(with_amount("-1000")),
        "/negative-int": v2(with_amount(-1000)),
        "/fractional": v2(with_amount("0.5")),
        "/fractional-number": v2(with_amount(1000.5)),
        # 10k entries: small ones fit the header limits and hit the accepts cap; full V1 ones are a
        # 2.5 MB JSON body, over the challenge body limit.
        "/many-accepts": v2({**real, "accepts": [{}] * 10_000}),
        "/many-accepts-v1": lambda: web.json_response(many_v1, status=402),
        # Over the challenge parser's 64 KiB header limit but within what the HTTP client reads.
        "/big-header": v2(_b64({**real, "error": "x" * 60_000})),
        # A header several megabytes long: not even parseable as an HTTP response by a sane client.
        "/huge-header": v2("A" * (3 * 1024 * 1024)),
    }


async def _greedy(request: web.Request, stack: Stack) -> web.StreamResponse:
    """A dishonest server: settles every payment it receives, then answers 402 as if it had not."""
    challenge = {
        "x402Version": 2,
        "error": "Payment required",
        "resource": {"url": str(request.url), "description": "greedy", "mimeType": "application/json"},
        "accepts": [
            {
                "scheme": "exact",
                "network": stack.network_v2,
                "asset": stack.token,
                "amount": str(stack.price),
                "payTo": GREEDY_PAY_TO,
                "maxTimeoutSeconds": 60,
                "extra": {"name": stack.token_name, "version": stack.token_version},
            }
        ],
    }
    signature = request.headers.get("PAYMENT-SIGNATURE")
    if signature:
        payload = json.loads(base64.b64decode(signature))
        body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}
        async with ClientSession() as session:
            async with session.post(f"{stack.facilitator_url}/settle", json=body) as answer:
                await answer.read()
        challenge["error"] = "payment rejected"
    return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": _b64(challenge)})


@pytest.fixture(scope="module")
def odd_server(x402_stack: Stack) -> Iterator[OddServer]:
    state = OddServer(routes=_odd_routes(x402_stack))
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/greedy":
            return await _greedy(request, x402_stack)
        make = state.routes.get(request.path)
        return make() if make else web.Response(status=404)

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((TEST_HOST, 0))
        sock.listen(64)
        sock.setblocking(False)
        loop.run_until_complete(web.SockSite(runner, sock).start())
        state.url = f"http://{TEST_HOST}:{sock.getsockname()[1]}"
        holder["stop"] = lambda: loop.call_soon_threadsafe(loop.stop)
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True, name="odd-402-server")
    thread.start()
    assert ready.wait(10)
    yield state
    holder["stop"]()
    thread.join(10)


@pytest.fixture(scope="module")
def module_proxy(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = start_paying_proxy(x402_stack, tmp_path_factory.mktemp("odd") / "home")
    yield proc
    proc.stop()


def curl_get(proxy: ProxyProcess, url: str, tmp_path: Path) -> tuple[int, dict[str, str], bytes]:
    body_path = tmp_path / "curl-body"
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-D",
            "-",
            "-o",
            str(body_path),
            "-x",
            proxy.url,
            "--noproxy",
            "",
            "--max-time",
            "60",
            url,
        ],
        capture_output=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    head = result.stdout.decode("latin-1").replace("\r\n", "\n").strip().split("\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split(" ")[1]), headers, body_path.read_bytes()


def test_server_that_settles_but_answers_402_stays_within_budget(
    x402_stack: Stack, odd_server: OddServer, home: Path, started: list[ProxyProcess]
) -> None:
    """A 402 after payment is the server's word, not the chain's: the signed authorization could
    still have moved money (here it did). Such payments must count against the budget until their
    authorization expires, or a dishonest server could take max_per_payment per request forever."""
    proxy = paying(x402_stack, home, started, policy='daily_budget = "0.0025"')  # fits two payments
    # The rule under test is the budget's while nothing else knows better. The reconciler's start-up pass
    # (right after the warm-up) would find payment #1 on chain and answer `payment_undelivered` instead, so
    # it runs first, on an empty ledger; its next pass is a minute away.
    wait_warmed(proxy)
    before = x402_stack.balance_of(GREEDY_PAY_TO)
    answers = [get(proxy, f"{odd_server.url}/greedy") for _ in range(4)]
    codes = [r.headers.get(ERROR) for r in answers]
    assert all(r.status_code == 402 for r in answers)
    taken = x402_stack.balance_of(GREEDY_PAY_TO) - before
    assert taken <= 2 * x402_stack.price, f"{taken} moved with a budget of 0.0025; proxy said {codes}"
    assert codes == ["payment_rejected", "payment_rejected", "budget_exhausted", "budget_exhausted"]
    assert [r["state"] for r in ledger(proxy)] == ["rejected", "rejected"]


def _assert_still_pays(proxy: ProxyProcess, stack: Stack, rows_before: int) -> None:
    assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy died"
    before = stack.balance_of(stack.pay_to)
    assert_paid(get(proxy, f"{stack.py}/paid/a"), proxy)
    assert stack.balance_of(stack.pay_to) == before + stack.price
    assert len(ledger(proxy)) == rows_before + 1


def test_plain_402_passes_through_untouched(
    x402_stack: Stack, odd_server: OddServer, module_proxy: ProxyProcess
) -> None:
    rows = len(ledger(module_proxy))
    direct = httpx.get(f"{odd_server.url}/plain", trust_env=False, timeout=TIMEOUT)
    response = get(module_proxy, f"{odd_server.url}/plain")
    assert response.status_code == 402
    assert ERROR not in response.headers and PAYMENT not in response.headers
    assert response.content == direct.content
    assert response.headers["X-Odd"] == "kept"
    assert response.headers["Content-Type"] == direct.headers["content-type"]
    assert len(ledger(module_proxy)) == rows
    _assert_still_pays(module_proxy, x402_stack, rows)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/bad-base64", 402, "malformed_challenge"),
        ("/not-json", 402, "malformed_challenge"),
        ("/negative", 402, "malformed_challenge"),
        ("/negative-int", 402, "malformed_challenge"),
        ("/fractional", 402, "malformed_challenge"),
        ("/fractional-number", 402, "malformed_challenge"),
        ("/many-accepts", 402, "malformed_challenge"),
        ("/many-accepts-v1", 402, "malformed_challenge"),
        ("/big-header", 402, "malformed_challenge"),
        # Beyond the upstream client's 128 KiB header limit: a clear 502, not a hang or a crash.
        ("/huge-header", 502, "upstream_bad_response"),
    ],
)
def test_malformed_challenges(
    x402_stack: Stack,
    odd_server: OddServer,
    module_proxy: ProxyProcess,
    tmp_path: Path,
    path: str,
    status: int,
    code: str,
) -> None:
    rows = len(ledger(module_proxy))
    snap = Snapshot(x402_stack, x402_stack.pay_to)
    # curl, because it reads header lines up to 100 KiB (Python's http.client stops at 64 KiB, and
    # the refused 402 is passed on with the server's own oversized PAYMENT-REQUIRED header).
    got_status, headers, body = curl_get(module_proxy, f"{odd_server.url}{path}", tmp_path)
    assert got_status == status, body[:300]
    assert headers.get(ERROR.lower()) == code, headers
    assert PAYMENT.lower() not in headers
    assert len(body) < 2 * 1024 * 1024
    assert len(ledger(module_proxy)) == rows
    snap.assert_nothing_moved()
    _assert_still_pays(module_proxy, x402_stack, rows)
