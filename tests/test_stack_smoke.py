"""The local x402 stack works on its own, paid with the reference PyPI SDK client (no proxy involved).

For each reference server (FastAPI V2, @x402/express V2, x402-express V1): an unpaid request gets a
402 with a parseable challenge, the SDK client's payment gets 200 with a settlement header, and the
merchant's on-chain TestUSDC balance rises by exactly the price; a paid route whose handler fails
answers 500 and moves no money.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from eth_account import Account
from eth_typing import HexStr
from web3.exceptions import ContractLogicError
from x402 import x402Client
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, append_payment_identifier_to_extensions
from x402.extensions.sign_in_with_x import SIGN_IN_WITH_X, create_siwx_client_hook
from x402.http import x402HTTPClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequiredV1
from x402.schemas.hooks import PaymentRequiredContext

from tests.stack import PAYER_2, Stack

pytest_plugins = ["tests.stack.fixtures"]
pytestmark = pytest.mark.stack

SERVERS = ("py", "express_v2", "express_v1")


def sdk_client(stack: Stack) -> x402HTTPClient:
    """Reference SDK client paying from the stack's funded payer in the local token."""
    client = x402Client()
    # V2 for eip155:* plus V1 for the legacy names (base-sepolia), signing with an eth-account key.
    register_exact_evm_client(client, EthAccountSigner(stack.payer))
    # The SDK only pays known USDC deployments by default; allow the local token explicitly.
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": stack.network_v2, "asset": stack.token},
                {"network": stack.network_v1, "asset": stack.token},
            ]
        }
    )
    return x402HTTPClient(client)


def challenge(http: x402HTTPClient, response: httpx.Response) -> PaymentRequired | PaymentRequiredV1:
    assert response.status_code == 402, response.text
    return http.get_payment_required_response(response.headers.get, response.content)


async def pay(
    http: x402HTTPClient, required: PaymentRequired | PaymentRequiredV1
) -> tuple[dict[str, str], Any]:
    payload = await http.create_payment_payload(required)
    return http.encode_payment_signature_header(payload), payload


def base_url(stack: Stack, server: str) -> str:
    url: str = getattr(stack, server)
    return url


@pytest.mark.parametrize("server", SERVERS)
async def test_free_route_needs_no_payment(x402_stack: Stack, server: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"{base_url(x402_stack, server)}/free", headers={"X-Probe": "free"})
    assert r.status_code == 200
    assert r.json()["headers"]["x-probe"] == "free"


@pytest.mark.parametrize("server", SERVERS)
async def test_unpaid_request_gets_parseable_challenge(x402_stack: Stack, server: str) -> None:
    stack = x402_stack
    url = f"{base_url(stack, server)}/paid/a"
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(url)
    required = challenge(sdk_client(stack), r)
    for req in required.accepts:
        assert req.scheme == "exact"
        assert req.pay_to.lower() == stack.pay_to.lower()
        assert req.asset.lower() == stack.token.lower()
        assert req.extra is not None
        assert (req.extra["name"], req.extra["version"]) == ("USDC", "2")
    if server == "express_v1":
        assert isinstance(required, PaymentRequiredV1)
        assert "payment-required" not in r.headers  # V1: challenge only in the JSON body
        assert r.json()["x402Version"] == 1
        v1 = required.accepts[0]
        assert v1.network == "base-sepolia"
        assert v1.max_amount_required == str(stack.price)
        assert v1.resource == url
    else:
        assert isinstance(required, PaymentRequired)
        raw = json.loads(base64.b64decode(r.headers["payment-required"]))
        assert raw["x402Version"] == 2
        v2 = required.accepts[0]
        assert v2.network == "eip155:84532"
        assert v2.amount == str(stack.price)
        assert required.resource is not None and required.resource.url == url


@pytest.mark.parametrize("server", SERVERS)
async def test_paid_request_settles_on_chain(x402_stack: Stack, server: str) -> None:
    stack = x402_stack
    url = f"{base_url(stack, server)}/paid/a"
    http = sdk_client(stack)
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        required = challenge(http, await client.get(url))
        headers, payload = await pay(http, required)
        merchant_before = stack.balance_of(stack.pay_to)
        payer_before = stack.balance_of(stack.payer_address)

        r = await client.get(url, headers=headers)

    assert r.status_code == 200, r.text
    settle = http.get_payment_settle_response(r.headers.get)
    assert settle.success
    assert settle.transaction.startswith("0x")
    assert (settle.payer or "").lower() == stack.payer_address.lower()
    expected_header = "x-payment-response" if server == "express_v1" else "payment-response"
    assert expected_header in r.headers
    assert stack.balance_of(stack.pay_to) == merchant_before + stack.price
    assert stack.balance_of(stack.payer_address) == payer_before - stack.price
    receipt = stack.chain.w3.eth.get_transaction_receipt(HexStr(settle.transaction))
    assert receipt["status"] == 1
    nonce = payload.payload["authorization"]["nonce"]
    assert stack.chain.authorization_state(stack.payer_address, nonce)
    # The payment credential reached the origin handler.
    seen = r.json()["headers"]
    assert ("x-payment" if server == "express_v1" else "payment-signature") in seen


@pytest.mark.parametrize("server", SERVERS)
async def test_failing_handler_is_not_settled(x402_stack: Stack, server: str) -> None:
    stack = x402_stack
    url = f"{base_url(stack, server)}/paid/fail500"
    http = sdk_client(stack)
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        required = challenge(http, await client.get(url))
        headers, payload = await pay(http, required)
        merchant_before = stack.balance_of(stack.pay_to)
        r = await client.get(url, headers=headers)
    assert r.status_code == 500
    assert "x-payment-response" not in r.headers
    assert stack.balance_of(stack.pay_to) == merchant_before
    nonce = payload.payload["authorization"]["nonce"]
    assert not stack.chain.authorization_state(stack.payer_address, nonce)


async def test_replayed_payment_header_is_rejected(x402_stack: Stack) -> None:
    stack = x402_stack
    url = f"{stack.py}/paid/b"
    http = sdk_client(stack)
    async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
        headers, _ = await pay(http, challenge(http, await client.get(url)))
        assert (await client.get(url, headers=headers)).status_code == 200
        merchant_after_first = stack.balance_of(stack.pay_to)
        replay = await client.get(url, headers=headers)
    assert replay.status_code == 402
    assert stack.balance_of(stack.pay_to) == merchant_after_first


async def test_v1_browser_request_gets_html_paywall(x402_stack: Stack) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"{x402_stack.express_v1}/paid/a", headers=browser)
    assert r.status_code == 402
    assert r.headers["content-type"].startswith("text/html")


async def test_siwx_grants_access_after_one_payment(x402_stack: Stack) -> None:
    stack = x402_stack
    http = sdk_client(stack)
    with stack.start_py_server(siwx=True) as server:
        url = f"{server.url}/paid/a"
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            first = await client.get(url)
            required = challenge(http, first)
            assert isinstance(required, PaymentRequired)
            assert required.extensions is not None and SIGN_IN_WITH_X in required.extensions
            headers, _ = await pay(http, required)
            assert (await client.get(url, headers=headers)).status_code == 200

            merchant_before = stack.balance_of(stack.pay_to)
            again = challenge(http, await client.get(url))
            siwx = await create_siwx_client_hook(stack.payer)(PaymentRequiredContext(again, url))
            assert siwx is not None
            granted = await client.get(url, headers=siwx.headers)
            assert granted.status_code == 200, granted.text
            assert granted.json()["paid"] is False
            assert SIGN_IN_WITH_X.lower() in granted.json()["headers"]
            assert stack.balance_of(stack.pay_to) == merchant_before

            # Access is per path: /paid/b was never bought.
            other = f"{server.url}/paid/b"
            required_b = challenge(http, await client.get(other))
            siwx_b = await create_siwx_client_hook(stack.payer)(PaymentRequiredContext(required_b, other))
            assert siwx_b is not None
            assert (await client.get(other, headers=siwx_b.headers)).status_code == 402


async def test_payment_identifier_replays_idempotently(x402_stack: Stack) -> None:
    stack = x402_stack
    http = sdk_client(stack)
    with stack.start_py_server(payment_identifier="optional") as server:
        url = f"{server.url}/paid/a"
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            required = challenge(http, await client.get(url))
            assert isinstance(required, PaymentRequired)
            assert required.extensions is not None and PAYMENT_IDENTIFIER in required.extensions
            extensions = append_payment_identifier_to_extensions(
                dict(required.extensions), "pay_smoke_test_0001"
            )
            required = required.model_copy(update={"extensions": extensions})
            payload = await http.create_payment_payload(required)
            assert isinstance(payload, PaymentPayload)
            headers = http.encode_payment_signature_header(payload)

            merchant_before = stack.balance_of(stack.pay_to)
            first = await client.get(url, headers=headers)
            retry = await client.get(url, headers=headers)
            assert first.status_code == retry.status_code == 200
            assert first.headers["payment-response"] == retry.headers["payment-response"]
            assert stack.balance_of(stack.pay_to) == merchant_before + stack.price

            # Same id, new signature: a different payment under a used id is a conflict.
            other = http.encode_payment_signature_header(await http.create_payment_payload(required))
            assert (await client.get(url, headers=other)).status_code == 409
        stats = server.stats()
        assert stats["handled"]["/paid/a"] == 1
        assert stats["idempotent_replays"] == 1


def self_signed_cert(directory: Path, ip: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_https_variant_settles(x402_stack: Stack, tmp_path: Path) -> None:
    stack = x402_stack
    cert, key = self_signed_cert(tmp_path, "127.0.0.2")
    http = sdk_client(stack)
    with stack.start_py_server(host="127.0.0.2", ssl_certfile=cert, ssl_keyfile=key, price=2500) as server:
        assert server.url.startswith("https://127.0.0.2:")
        url = f"{server.url}/paid/a"
        async with httpx.AsyncClient(trust_env=False, timeout=60, verify=str(cert)) as client:
            required = challenge(http, await client.get(url))
            assert required.accepts[0].get_amount() == "2500"
            headers, _ = await pay(http, required)
            merchant_before = stack.balance_of(stack.pay_to)
            r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        assert stack.balance_of(stack.pay_to) == merchant_before + 2500


def test_token_enforces_eip3009_rules(x402_stack: Stack) -> None:
    """TestUSDC behaves like FiatToken where facilitators depend on it (simulated with eth_call)."""
    stack = x402_stack
    token = stack.chain.token
    assert (token.functions.name().call(), token.functions.version().call()) == ("USDC", "2")
    assert token.functions.decimals().call() == 6
    now = stack.chain.latest_timestamp()

    def signed(valid_after: int, valid_before: int, key: str = stack.payer_key) -> tuple[list[Any], bytes]:
        nonce = secrets.token_bytes(32)
        message = {
            "from": stack.payer_address,
            "to": stack.pay_to,
            "value": 1,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        }
        sig = Account.sign_typed_data(
            key,
            {"name": "USDC", "version": "2", "chainId": stack.chain_id, "verifyingContract": stack.token},
            {
                "TransferWithAuthorization": [
                    {"name": "from", "type": "address"},
                    {"name": "to", "type": "address"},
                    {"name": "value", "type": "uint256"},
                    {"name": "validAfter", "type": "uint256"},
                    {"name": "validBefore", "type": "uint256"},
                    {"name": "nonce", "type": "bytes32"},
                ]
            },
            message,
        ).signature
        return [stack.payer_address, stack.pay_to, 1, valid_after, valid_before, nonce], bytes(sig)

    def call(args: list[Any], sig: bytes, *, packed: bool = False) -> str:
        fn = (
            token.get_function_by_signature(
                "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
            )(*args, sig)
            if packed
            else token.get_function_by_signature(
                "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
            )(*args, sig[64], sig[:32], sig[32:64])
        )
        try:
            fn.call({"from": stack.pay_to})
        except ContractLogicError as exc:
            return str(exc)
        return "ok"

    args, sig = signed(0, now + 3600)
    assert call(args, sig) == "ok"
    assert call(args, sig, packed=True) == "ok"
    assert "authorization is not yet valid" in call(*signed(now + 3600, now + 7200))
    assert "authorization is expired" in call(*signed(0, now - 1))
    assert "invalid signature" in call(*signed(0, now + 3600, key=PAYER_2.key))
