"""Small and quick to start: the SDKs the proxy needs only later load after the listener is up, the
warm-up loads everything the first paid request needs, and the proxy port accepts only once the admin
port does (issue #14, item 5). Figures: bench/footprint.py, docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import accepts, free_port
from tests.support.proxy_process import REPO, ProxyProcess

# Run in a fresh interpreter: the test process has imported everything long ago.
PRELUDE = r"""
import asyncio, sys, time

import proxy.app, proxy.cli  # what `x402-proxy run` imports before it listens
from proxy.admin.api import AdminServer  # the admin listener's app, /mcp route included

heavy = ("web3", "mcp", "mcp.server", "x402.mechanisms.evm", "starlette", "eth_account", "x402.extensions")
loaded = [name for name in heavy if name in sys.modules]
assert not loaded, f"imported before the listener is up: {loaded}"

from proxy.payments.assets import AssetRegistry
from proxy.payments.challenge import parse_challenge
from proxy.payments.networks import NetworkRegistry
from proxy.payments.policy import PaymentContext, Policy, PolicyConfig, choose_requirement
from proxy.payments.signer import build_payment_header, plan_authorization
from proxy.payments.wallet import Wallet
from proxy.warmup import BACKENDS, PAID_PATH, SDK_PATH, warm_up
from tests.test_payments_fixtures import OTHER_PAY_TO, v1_requirement, v1_response, v2_requirement, v2_response

networks = NetworkRegistry()
assets = AssetRegistry(networks)
KEY = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")


def pay(cases, wallet):
    now = time.time()
    for response, policy in cases:
        try:
            challenge = parse_challenge(*response)
        except Exception:
            continue  # the mixed-case address fails its checksum: running the check was the point
        try:
            selection = choose_requirement(
                challenge,
                Policy.compile(PolicyConfig(**policy), networks),
                assets,
                PaymentContext("shop.test", "http://shop.test/paid", now, 0, 0),
            )
        except Exception:
            continue
        assert hasattr(selection, "requirement"), selection
        window = plan_authorization(selection, now)
        build_payment_header(challenge, selection, wallet, now, "pay_" + "0" * 32, window)


def imported_since(before):
    return sorted(
        name for name in set(sys.modules) - before
        if name != "tests" and not name.startswith(("proxy.", "tests."))
    )


EIP3009 = [
    (v2_response(v2_requirement(payTo="0x" + "Ab" * 20)), {}),  # mixed case: its EIP-55 check runs
    (v2_response(v2_requirement()), {}),
    (v1_response(v1_requirement()), {}),
]
SDK = [
    (v2_response(v2_requirement(extra={"assetTransferMethod": "permit2", "name": "USDC", "version": "2"})), {}),
    (v2_response(v2_requirement(scheme="upto", amount="50000", extra={"facilitatorAddress": OTHER_PAY_TO})),
     {"enable_upto": True}),
]
"""

# The default configuration: the paid path's tier only. An EIP-3009 payment, a session token and a SIWX
# text signed after it import nothing new, and neither eth-account nor the SDK is loaded.
DEFAULT_TIER = (
    PRELUDE
    + r"""
asyncio.run(warm_up(PAID_PATH))
before = set(sys.modules)
wallet = Wallet.from_key(KEY)
pay(EIP3009, wallet)
from proxy.payments.signer import new_payment_id
from proxy.tokens import SessionClaim, make_session_token

new_payment_id()
wallet.sign_text("example.com wants you to sign in with your Ethereum account")
make_session_token(
    SessionClaim("s_1", wallet.address, "http://shop.test", "prefix", "/", None, int(time.time()),
                 int(time.time()) + 60, None, "1", "0x" + "11" * 20, "eip155:84532", "0x" + "22" * 20),
    wallet,
)
new = imported_since(before)
assert not new, f"the paid path imported after the warm-up: {new}"
loaded = [name for name in heavy if name in sys.modules]
assert not loaded, f"loaded by the default tier: {loaded}"
print("ok")
"""
)

# A server offering Sign-In-With-X (or a restored session holding its parameters): after `load_off_loop`
# (what the flow and the session stage await first), signing in imports nothing on the loop.
SIWX_TIER = (
    PRELUDE
    + r"""
from proxy.warmup import SIWX_PATH, load_off_loop, loaded

asyncio.run(warm_up(PAID_PATH))
assert not loaded(SIWX_PATH)
asyncio.run(load_off_loop(SIWX_PATH))
assert loaded(SIWX_PATH)
before = set(sys.modules)
from proxy.sessions.credentials import build_siwx_header, siwx_challenge_response

wallet = Wallet.from_key(KEY)
info = {"domain": "shop.test", "uri": "http://shop.test/", "version": "1", "chainId": "eip155:84532",
        "statement": "Sign in", "type": "eip191"}
assert build_siwx_header(info, wallet.sign_text, "http://shop.test/paid", now=time.time(), address=wallet.address)
challenge = {"info": {**info, "nonce": "a" * 16, "issuedAt": "2026-01-01T00:00:00.000Z",
                      "resources": ["http://shop.test/paid"]},
             "supportedChains": [{"chainId": "eip155:84532", "type": "eip191"}]}
assert siwx_challenge_response(challenge, wallet.sign_text, "http://shop.test/paid", network="eip155:84532",
                               address=wallet.address)
new = imported_since(before)
assert not new, f"signing in imported after load_off_loop: {new}"
print("ok")
"""
)

# Permit2, upto (and channels, the reconciler): the SDK tier covers them.
SDK_TIER = (
    PRELUDE
    + r"""
asyncio.run(warm_up((*PAID_PATH, *SDK_PATH), BACKENDS))
assert "web3" in sys.modules and "x402.mechanisms.evm" in sys.modules
before = set(sys.modules)
from eth_account import Account

pay(EIP3009 + SDK, Wallet(Account.create()))
from x402.extensions.payment_identifier import generate_payment_id

generate_payment_id()
new = imported_since(before)
assert not new, f"the paid path imported after the warm-up: {new}"
print("ok")
"""
)


def run_script(script: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_sdks_load_after_the_listener_and_the_warm_up_covers_the_paid_path() -> None:
    run_script(DEFAULT_TIER)


def test_siwx_loads_off_the_loop_and_then_signs_in_without_imports() -> None:
    run_script(SIWX_TIER)


def test_the_sdk_tier_covers_permit2_and_upto() -> None:
    run_script(SDK_TIER)


def test_the_proxy_port_accepts_only_once_the_admin_port_does(tmp_path: Path) -> None:
    """Polled every millisecond from exec: the moment the proxy port accepts, the admin port does too
    (it used to come up after the proxy had started accepting)."""
    for attempt in range(3):
        port, admin = free_port(), free_port()
        process = ProxyProcess(tmp_path / f"home{attempt}", f'[admin]\nlisten = "127.0.0.1:{admin}"\n')
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "--home",
            str(process.home),
            "--config",
            str(process.config_path),
        ]
        proc = subprocess.Popen(
            [*cmd, "run", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=process.env,
            stdout=subprocess.DEVNULL,
            stderr=process.log_path.open("a"),
        )
        try:
            deadline = time.monotonic() + 60
            while not accepts(port):
                assert proc.poll() is None and time.monotonic() < deadline, process.log_text()[-2000:]
                time.sleep(0.001)
            assert accepts(admin), f"attempt {attempt}: the proxy accepted before the admin listener was up"
        finally:
            proc.terminate()
            proc.wait(15)
