"""Signer tests with real keys: recover the signer from each signature with eth-account, built
independently of the SDK's typed-data helpers (domain from `extra`, chain id from the network)."""

import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from x402.http import decode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentPayloadV1

from proxy.payments.assets import AssetRegistry
from proxy.payments.challenge import Challenge, parse_challenge
from proxy.payments.networks import NetworkRegistry
from proxy.payments.policy import PaymentContext, Policy, PolicyConfig, Selection, choose_requirement
from proxy.payments.signer import (
    CLOCK_SKEW_ALLOWANCE,
    VALID_AFTER_BACKDATE,
    build_payment_header,
    plan_authorization,
)
from proxy.payments.wallet import Wallet
from tests.test_payments_fixtures import (
    BASE_SEPOLIA_USDC,
    BASE_USDC,
    DROP,
    OTHER_PAY_TO,
    PAY_TO,
    decode_header,
    v1_requirement,
    v1_response,
    v2_requirement,
    v2_response,
)

NOW = 1_800_000_000
NETWORKS = NetworkRegistry()
ASSETS = AssetRegistry(NETWORKS)
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"

EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
TRANSFER_WITH_AUTHORIZATION = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


@pytest.fixture
def wallet() -> Wallet:
    return Wallet(Account.create())


def select(challenge: Challenge, **policy: Any) -> Selection:
    compiled = Policy.compile(PolicyConfig(**policy), NETWORKS)
    result = choose_requirement(
        challenge, compiled, ASSETS, PaymentContext("shop.test", "http://shop.test/paid", NOW, 0, 0)
    )
    assert isinstance(result, Selection), result
    return result


def parsed(response: tuple[int, dict[str, str], bytes]) -> Challenge:
    challenge = parse_challenge(*response)
    assert challenge is not None
    return challenge


def recover_eip3009(payload: dict[str, Any], name: str, version: str, chain_id: int, asset: str) -> str:
    auth = payload["authorization"]
    typed = {
        "types": {"EIP712Domain": EIP712_DOMAIN, "TransferWithAuthorization": TRANSFER_WITH_AUTHORIZATION},
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": asset},
        "message": {
            "from": auth["from"],
            "to": auth["to"],
            "value": int(auth["value"]),
            "validAfter": int(auth["validAfter"]),
            "validBefore": int(auth["validBefore"]),
            "nonce": bytes.fromhex(auth["nonce"][2:]),
        },
    }
    return str(Account.recover_message(encode_typed_data(full_message=typed), signature=payload["signature"]))


def test_v2_exact_signature_recovers_and_accepted_is_echoed_exactly(wallet: Wallet) -> None:
    requirement = v2_requirement(futureField={"nested": [1, 2.5, None]}, description="kept")
    challenge = parsed(v2_response(requirement))
    header = build_payment_header(challenge, select(challenge), wallet, NOW)

    assert header.name == "PAYMENT-SIGNATURE"
    document = decode_header(header.value)
    assert document == header.payload_dict
    assert document["x402Version"] == 2
    assert document["accepted"] == requirement  # byte-for-byte the server's dict, unknown fields included
    assert document["resource"] == challenge.raw["resource"]
    assert "extensions" not in document  # the server declared none: we add none

    payload = document["payload"]
    auth = payload["authorization"]
    assert auth["from"] == wallet.address
    assert auth["to"].lower() == PAY_TO.lower()
    assert auth["value"] == "10000"
    assert int(auth["validAfter"]) == NOW - VALID_AFTER_BACKDATE
    assert int(auth["validBefore"]) == NOW + 60 + CLOCK_SKEW_ALLOWANCE == header.valid_before
    assert auth["nonce"] == header.nonce and len(auth["nonce"]) == 66
    assert recover_eip3009(payload, "USDC", "2", 84532, BASE_SEPOLIA_USDC) == wallet.address

    # The SDK (what reference servers run) decodes the header too.
    decoded = decode_payment_signature_header(header.value)
    assert isinstance(decoded, PaymentPayload)
    assert decoded.accepted.amount == "10000" and decoded.resource is not None


def test_requirement_without_extra_is_not_given_one(wallet: Wallet) -> None:
    requirement = v2_requirement(extra=DROP)  # domain comes from our asset table instead
    challenge = parsed(v2_response(requirement))
    header = build_payment_header(challenge, select(challenge), wallet, NOW)
    assert "extra" not in header.payload_dict["accepted"]
    assert header.payload_dict["accepted"] == requirement
    assert (
        recover_eip3009(header.payload_dict["payload"], "USDC", "2", 84532, BASE_SEPOLIA_USDC)
        == wallet.address
    )


def test_domain_name_comes_from_extra_per_chain(wallet: Wallet) -> None:
    mainnet = v2_requirement(
        network="eip155:8453", asset=BASE_USDC, extra={"name": "USD Coin", "version": "2"}
    )
    challenge = parsed(v2_response(mainnet))
    selection = select(challenge, allowed_networks=["base"], allow_mainnet=True)
    payload = build_payment_header(challenge, selection, wallet, NOW).payload_dict["payload"]
    assert recover_eip3009(payload, "USD Coin", "2", 8453, BASE_USDC) == wallet.address
    # signing with Base Sepolia's name would have produced a different signer: the domain matters
    assert recover_eip3009(payload, "USDC", "2", 8453, BASE_USDC) != wallet.address


def test_server_extensions_are_echoed_and_payment_identifier_added(wallet: Wallet) -> None:
    extensions = {
        "payment-identifier": {"info": {"required": True}, "schema": {"type": "object"}},
        "bazaar": {"info": {"x": 1}},
    }
    challenge = parsed(v2_response(extensions=extensions))
    header = build_payment_header(
        challenge, select(challenge), wallet, NOW, payment_id="pay_0123456789abcdef01"
    )
    echoed = header.payload_dict["extensions"]
    assert echoed["bazaar"] == {"info": {"x": 1}}
    assert echoed["payment-identifier"]["info"] == {"required": True, "id": "pay_0123456789abcdef01"}
    assert echoed["payment-identifier"]["schema"] == {"type": "object"}
    assert "id" not in challenge.extensions["payment-identifier"]["info"]  # the challenge is not mutated


def test_payment_identifier_only_when_offered(wallet: Wallet) -> None:
    challenge = parsed(v2_response(extensions={"other": {}}))
    header = build_payment_header(
        challenge, select(challenge), wallet, NOW, payment_id="pay_0123456789abcdef01"
    )
    assert header.payload_dict["extensions"] == {"other": {}}


def test_v1_header_is_x_payment_with_network_name(wallet: Wallet) -> None:
    challenge = parsed(v1_response(v1_requirement(maxTimeoutSeconds=120)))
    header = build_payment_header(challenge, select(challenge), wallet, NOW)
    assert header.name == "X-PAYMENT"
    document = decode_header(header.value)
    assert set(document) == {"x402Version", "scheme", "network", "payload"}
    assert (
        document["x402Version"] == 1
        and document["network"] == "base-sepolia"
        and document["scheme"] == "exact"
    )
    assert int(document["payload"]["authorization"]["validBefore"]) == NOW + 120 + CLOCK_SKEW_ALLOWANCE
    assert recover_eip3009(document["payload"], "USDC", "2", 84532, BASE_SEPOLIA_USDC) == wallet.address
    assert isinstance(decode_payment_signature_header(header.value), PaymentPayloadV1)


def test_every_attempt_gets_a_fresh_nonce(wallet: Wallet) -> None:
    challenge = parsed(v2_response())
    selection = select(challenge)
    nonces = {build_payment_header(challenge, selection, wallet, NOW).nonce for _ in range(20)}
    assert len(nonces) == 20


def test_planned_window_is_what_gets_signed(wallet: Wallet) -> None:
    challenge = parsed(v2_response())
    selection = select(challenge)
    window = plan_authorization(selection, NOW)
    header = build_payment_header(challenge, selection, wallet, NOW, window=window)
    assert header.nonce == window.nonce and header.valid_before == window.valid_before


def test_clock_skew_window_covers_five_minutes_either_way(wallet: Wallet) -> None:
    """Facilitators accept when validAfter <= chain_now and validBefore >= chain_now + 6."""
    challenge = parsed(v2_response(v2_requirement(maxTimeoutSeconds=60)))
    selection = select(challenge)
    for skew in (-300, 0, 300):  # local clock minus chain clock
        local_now = NOW + skew
        auth = build_payment_header(challenge, selection, wallet, local_now).payload_dict["payload"][
            "authorization"
        ]
        chain_now = NOW
        # settles any time during the server's full timeout after being sent
        for elapsed in (0, 54):
            assert int(auth["validAfter"]) <= chain_now + elapsed
            assert int(auth["validBefore"]) >= chain_now + elapsed + 6


def recover_permit2(payload: dict[str, Any], chain_id: int, witness_fields: list[dict[str, str]]) -> str:
    auth = payload["permit2Authorization"]
    witness = {k: auth["witness"][k] for k in (f["name"] for f in witness_fields)}
    witness = {k: int(v) if k == "validAfter" else v for k, v in witness.items()}
    typed = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "PermitWitnessTransferFrom": [
                {"name": "permitted", "type": "TokenPermissions"},
                {"name": "spender", "type": "address"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
                {"name": "witness", "type": "Witness"},
            ],
            "TokenPermissions": [{"name": "token", "type": "address"}, {"name": "amount", "type": "uint256"}],
            "Witness": witness_fields,
        },
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2},
        "message": {
            "permitted": {"token": auth["permitted"]["token"], "amount": int(auth["permitted"]["amount"])},
            "spender": auth["spender"],
            "nonce": int(auth["nonce"]),
            "deadline": int(auth["deadline"]),
            "witness": witness,
        },
    }
    return str(Account.recover_message(encode_typed_data(full_message=typed), signature=payload["signature"]))


def test_exact_permit2_via_sdk(wallet: Wallet) -> None:
    requirement = v2_requirement(extra={"assetTransferMethod": "permit2", "name": "USDC", "version": "2"})
    challenge = parsed(v2_response(requirement))
    before = int(time.time())
    header = build_payment_header(challenge, select(challenge), wallet, time.time())
    document = header.payload_dict
    assert document["accepted"] == requirement
    payload = document["payload"]
    auth = payload["permit2Authorization"]
    assert auth["from"] == wallet.address
    assert auth["witness"]["to"].lower() == PAY_TO.lower()
    assert auth["permitted"]["amount"] == "10000"
    assert auth["permitted"]["token"].lower() == BASE_SEPOLIA_USDC.lower()
    assert auth["spender"] == "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"  # x402ExactPermit2Proxy
    assert header.nonce == auth["nonce"]
    expected = before + 60 + CLOCK_SKEW_ALLOWANCE
    assert expected <= header.valid_before == int(auth["deadline"]) <= expected + 5
    witness = [{"name": "to", "type": "address"}, {"name": "validAfter", "type": "uint256"}]
    assert recover_permit2(payload, 84532, witness) == wallet.address


def test_upto_via_sdk_when_enabled(wallet: Wallet) -> None:
    requirement = v2_requirement(scheme="upto", amount="50000", extra={"facilitatorAddress": OTHER_PAY_TO})
    challenge = parsed(v2_response(requirement))
    header = build_payment_header(challenge, select(challenge, enable_upto=True), wallet, time.time())
    payload = header.payload_dict["payload"]
    assert header.payload_dict["accepted"] == requirement
    assert payload["permit2Authorization"]["witness"]["facilitator"].lower() == OTHER_PAY_TO.lower()
    witness = [
        {"name": "to", "type": "address"},
        {"name": "facilitator", "type": "address"},
        {"name": "validAfter", "type": "uint256"},
    ]
    assert recover_permit2(payload, 84532, witness) == wallet.address
