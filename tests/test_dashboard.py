"""The dashboard at /ui (issue 17) in a real browser: Debian's chromium driven by Playwright, against a
real paying proxy on the local stack. Screenshots go to test-artifacts/dashboard/ (not committed)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.stack import PyServer, Stack
from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack
from tests.support.admin import AdminProxy, ThreadedApp
from tests.support.channels import channels, open_channel_session
from tests.support.channels import start_proxy as start_channel_proxy
from tests.support.crash import ERROR, PAYMENT, wait_for
from tests.support.paying_proxy import ledger, proxies, stack_config

x402_channel_stack = _stack_fixtures.x402_channel_stack  # the channel stack's session fixture, here too

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
TIMEOUT = 60
HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (Makefile apt-test)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def pricey(x402_stack: Stack) -> Iterator[PyServer]:
    """A server whose price (0.002) is above the proxy's ask_above (0.0015)."""
    server = x402_stack.start_py_server(price=2000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hostile(x402_stack: Stack) -> Iterator[str]:
    """A server whose 402 error text is markup: the paid retry is refused with that text as the reason."""
    stack = x402_stack
    requirement = {
        "scheme": "exact",
        "network": stack.network_v2,
        "asset": stack.token,
        "amount": str(stack.price),
        "payTo": stack.pay_to,
        "maxTimeoutSeconds": 60,
        "extra": {"name": stack.token_name, "version": stack.token_version},
    }

    async def handle(request: web.Request) -> web.Response:
        document = {"x402Version": 2, "error": HOSTILE, "accepts": [requirement]}
        header = base64.b64encode(json.dumps(document).encode()).decode()
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    served = ThreadedApp(app)
    yield served.url
    served.stop()


@pytest.fixture(scope="module")
def proxy(x402_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    home = tmp_path_factory.mktemp("dashboard") / "home"
    config = stack_config(
        x402_stack, policy='daily_budget = "5"\nper_host_daily_budget = "5"\nask_above = "0.0015"\n'
    )
    process = AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": x402_stack.payer_key}).start()
    yield process
    process.stop()


@pytest.fixture
def page(browser: Browser, proxy: AdminProxy, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context()
    opened = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text}")

    opened.on("console", on_console)
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.goto(f"{proxy.admin_url}/ui")
    yield opened
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    opened.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    expected = getattr(request.node, "expected_console_errors", 0)
    assert len(problems) == expected, problems


def login(page: Page, proxy: AdminProxy) -> None:
    page.fill("#token", proxy.token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#tabs")).to_be_visible()


def in_background(proxy: AdminProxy, url: str) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def client() -> None:
        outcome["response"] = requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    return thread, outcome


def test_the_page_is_locked_down(proxy: AdminProxy) -> None:
    response = requests.get(f"{proxy.admin_url}/ui", timeout=10)  # no token needed for the page itself
    assert response.status_code == 200 and "text/html" in response.headers["Content-Type"]
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Frame-Options"] == "DENY" and "token" not in response.url
    assert '<script src="/ui/app.js"' in response.text and "http" not in response.text.split("<body>")[0]
    assert requests.get(f"{proxy.admin_url}/ui/../budget", timeout=10).status_code == 401
    assert requests.get(f"{proxy.admin_url}/ui/secret.txt", timeout=10).status_code == 404
    assert requests.get(f"{proxy.admin_url}/budget", timeout=10).status_code == 401  # the API still needs it


def test_a_wrong_token_shows_an_error(page: Page, request: pytest.FixtureRequest) -> None:
    request.node.expected_console_errors = 1  # the browser itself logs the refused (401) request
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("Wrong token: the admin API refused it.")
    expect(page.locator("#tabs")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_paid_request_appears_and_the_token_stays_in_the_tab(
    page: Page, proxy: AdminProxy, x402_stack: Stack
) -> None:
    login(page, proxy)
    assert page.evaluate("Object.keys(sessionStorage)") == ["x402-proxy-admin-token"]
    assert page.evaluate("document.cookie") == "" and proxy.token not in page.url
    paid = requests.get(f"{x402_stack.py}/paid/b", proxies=proxies(proxy), timeout=TIMEOUT)
    assert paid.status_code == 200
    row_id = paid.headers[PAYMENT]
    page.click("#tabs button[data-tab=payments]")
    row = page.locator("#payment-table tbody tr", has_text=f"{x402_stack.py}/paid/b").first
    expect(row).to_contain_text("settled")
    expect(row.locator("td").first).to_have_text(row_id)
    page.click("#tabs button[data-tab=overview]")
    expect(page.locator("#hosts tbody")).to_contain_text("127.0.0.1")
    expect(page.locator("#spend-chart path.spend")).to_have_count(1)


def test_ending_a_session_in_the_ui_makes_the_next_request_pay_again(
    page: Page, proxy: AdminProxy, x402_stack: Stack, siwx_server: PyServer
) -> None:
    url = f"{siwx_server.url}/paid/a"
    first = requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)
    assert first.status_code == 200
    session_id = first.headers["X-402-Proxy-Session"]
    reused = requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)
    assert reused.status_code == 200 and PAYMENT not in reused.headers  # the session rides
    login(page, proxy)
    page.click("#tabs button[data-tab=sessions]")
    end = page.locator(f"#session-table button[data-session='{session_id}']")
    expect(end).to_be_enabled()
    end.click()
    expect(page.locator("#session-table tbody tr", has_text=siwx_server.url).first).to_contain_text("ended")
    before = x402_stack.balance_of(x402_stack.pay_to)
    again = requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)
    assert again.status_code == 200 and PAYMENT in again.headers
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price  # paid again, on chain


def test_approving_in_the_ui_lets_the_waiting_payment_through(
    page: Page, proxy: AdminProxy, x402_stack: Stack, pricey: PyServer
) -> None:
    login(page, proxy)
    page.click("#tabs button[data-tab=approvals]")
    before = x402_stack.balance_of(x402_stack.pay_to)
    thread, outcome = in_background(proxy, f"{pricey.url}/paid/a")
    approve = page.locator("#approval-table button.approve").first
    expect(approve).to_be_visible(timeout=20_000)
    expect(page.locator("#approval-count")).to_have_text("1")
    expect(page.locator("#approval-table tbody tr").first).to_contain_text("above ask_above 0.0015")
    approve.click()
    thread.join(TIMEOUT)
    assert outcome["response"].status_code == 200
    assert x402_stack.balance_of(x402_stack.pay_to) - before == 2000
    row = next(r for r in ledger(proxy) if r["url"] == f"{pricey.url}/paid/a")
    assert row["approved_by"] == "ui" and row["state"] == "settled"
    expect(page.locator("#approval-table tbody tr").first).to_contain_text("approved")


def test_denying_in_the_ui_gives_the_client_the_402(
    page: Page, proxy: AdminProxy, x402_stack: Stack, pricey: PyServer
) -> None:
    login(page, proxy)
    page.click("#tabs button[data-tab=approvals]")
    before = x402_stack.balance_of(x402_stack.pay_to)
    thread, outcome = in_background(proxy, f"{pricey.url}/paid/b")
    deny = page.locator("#approval-table button.deny").first
    expect(deny).to_be_visible(timeout=20_000)
    deny.click()
    thread.join(TIMEOUT)
    response = outcome["response"]
    assert response.status_code == 402 and response.headers[ERROR] == "approval_denied"
    assert x402_stack.balance_of(x402_stack.pay_to) == before


def test_hostile_strings_from_a_server_render_as_text(page: Page, proxy: AdminProxy, hostile: str) -> None:
    refused = requests.get(f"{hostile}/x", proxies=proxies(proxy), timeout=TIMEOUT)
    assert refused.status_code == 402
    wait_for(lambda: any(HOSTILE in (r["reason"] or "") for r in ledger(proxy)), 10, "the rejected row")
    login(page, proxy)
    page.click("#tabs button[data-tab=payments]")
    cell = page.locator("#payment-table tbody tr", has_text="onerror").first
    expect(cell).to_contain_text(HOSTILE)  # shown as text
    assert page.locator("#payment-table img, #payment-table script").count() == 0
    assert page.title() == "x402-proxy"


@pytest.fixture(scope="module")
def channel_proxy(
    x402_channel_stack: ChannelStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdminProxy]:
    """A proxy holding batch-settlement channels on the channel stack (tests/support/channels.py)."""
    process = start_channel_proxy(x402_channel_stack, tmp_path_factory.mktemp("dashboard-ch") / "home")
    yield process
    process.stop()


def test_a_channel_session_shows_deposit_signed_refunded_and_net_spend(
    browser: Browser, channel_proxy: AdminProxy, x402_channel_stack: ChannelStack
) -> None:
    """A real channel (deposit of 10 prices, 3 vouchers) through the proxy, the sessions tab in the
    browser: deposit, signed and charged while open; ended in the UI, refunded and the net spend, which
    is what the chain says the payer lost."""
    stack = x402_channel_stack
    payer_before = stack.balance_of(stack.payer_address)
    session_id = open_channel_session(channel_proxy, stack, 3)
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    try:
        page.goto(f"{channel_proxy.admin_url}/ui")
        login(page, channel_proxy)
        page.click("#tabs button[data-tab=sessions]")
        end = page.locator(f"button[data-session='{session_id}']")
        row = page.locator("#session-table tbody tr", has=end)
        cell = row.locator("td.channel")
        expect(cell.locator("[data-channel=state] b")).to_have_text("open")
        expect(cell.locator("[data-channel=deposit] b")).to_have_text("0.01")  # 10 x 0.001 TUSDC
        expect(cell.locator("[data-channel=signed] b")).to_have_text("0.003")
        expect(cell.locator("[data-channel=charged] b")).to_have_text("0.003")
        expect(cell.locator("[data-channel=refunded] b")).to_have_text("not yet")
        expect(cell.locator("[data-channel=net_spend] b")).to_have_text("open")
        end.click()
        expect(row.locator("td.state-ended")).to_have_text("ended")
        expect(cell.locator("[data-channel=state] b")).to_have_text("refunded")
        expect(cell.locator("[data-channel=refunded] b")).to_have_text("0.007")
        expect(cell.locator("[data-channel=net_spend] b")).to_have_text("0.003")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "channel_session.png"), full_page=True)
    finally:
        context.close()
    assert problems == []
    assert payer_before - stack.balance_of(stack.payer_address) == 3 * stack.price  # on chain
    [row_ch] = channels(channel_proxy)
    assert row_ch["state"] == "refunded" and row_ch["refunded"] == 7 * stack.price
