"""proxy/payments/evm_sign.py signs what eth-account and the x402 SDK sign, byte for byte.

Both sides are deterministic (RFC 6979 nonces, low-s), so equal inputs must give equal signatures; the
e2e suites then have these signatures verified on chain by the reference facilitators.
"""

from __future__ import annotations

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER, is_valid_payment_id
from x402.mechanisms.evm.eip712 import build_typed_data_for_signing
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload, TypedDataField

from proxy.payments import evm_sign, signer
from proxy.payments.signer import AuthorizationWindow, build_payment_header
from proxy.payments.wallet import Wallet
from proxy.tokens import SessionClaim, make_session_token
from tests.test_payments_fixtures import BASE_SEPOLIA_USDC, PAY_TO, v2_requirement, v2_response
from tests.test_payments_signer import NOW, parsed, select

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
keys = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda k: k.to_bytes(32, "big"))
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uint256 = st.integers(min_value=0, max_value=2**256 - 1)
names = st.text(min_size=0, max_size=40)


def sdk_signature(
    account: LocalAccount,
    authorization: ExactEIP3009Authorization,
    chain: int,
    token: str,
    token_name: str,
    token_version: str,
) -> bytes:
    """What the SDK signs for `authorization`: its typed data, eth-account's signer."""
    domain, types, primary, message = build_typed_data_for_signing(
        authorization, chain, to_checksum_address(token), token_name, token_version
    )
    fields = {n: [TypedDataField(name=f["name"], type=f["type"]) for f in spec] for n, spec in types.items()}
    return bytes(EthAccountSigner(account).sign_typed_data(domain, fields, primary, message))


@settings(max_examples=60, deadline=None)
@given(key=keys)
def test_address_of_a_key_is_eth_accounts(key: bytes) -> None:
    assert evm_sign.address_of(key) == Account.from_key(key).address


@settings(max_examples=200, deadline=None)
@given(raw=addresses)
def test_checksum_address_is_eip55(raw: str) -> None:
    assert evm_sign.checksum_address(raw) == to_checksum_address(raw)
    assert evm_sign.checksum_address(raw.upper().replace("0X", "0x")) == to_checksum_address(raw)


@settings(max_examples=60, deadline=None)
@given(
    key=keys,
    to=addresses,
    token=addresses,
    value=uint256,
    after=st.integers(min_value=0, max_value=2**64),
    before=st.integers(min_value=0, max_value=2**64),
    nonce=st.binary(min_size=32, max_size=32),
    chain=st.integers(min_value=1, max_value=2**53),
    token_name=names,
    token_version=names,
)
def test_eip3009_signature_is_the_sdks(
    key: bytes,
    to: str,
    token: str,
    value: int,
    after: int,
    before: int,
    nonce: bytes,
    chain: int,
    token_name: str,
    token_version: str,
) -> None:
    account = Account.from_key(key)
    authorization = ExactEIP3009Authorization(
        from_address=account.address,
        to=to_checksum_address(to),
        value=str(value),
        valid_after=str(after),
        valid_before=str(before),
        nonce="0x" + nonce.hex(),
    )
    expected = sdk_signature(account, authorization, chain, token, token_name, token_version)

    digest = evm_sign.eip3009_digest(
        token_name=token_name,
        token_version=token_version,
        chain_id=chain,
        token=token,
        sender=account.address,
        to=to,
        value=value,
        valid_after=after,
        valid_before=before,
        nonce="0x" + nonce.hex(),
    )
    assert evm_sign.sign_digest(key, digest) == bytes(expected)


@settings(max_examples=60, deadline=None)
@given(key=keys, message=st.binary(max_size=600))
def test_personal_sign_is_eth_accounts(key: bytes, message: bytes) -> None:
    expected = Account.from_key(key).sign_message(encode_defunct(primitive=message)).signature
    assert Wallet.from_key(key).sign_message(message) == bytes(expected)
    text = message.decode("utf-8", "replace")
    expected_text = Account.from_key(key).sign_message(encode_defunct(text=text)).signature
    assert evm_sign.sign_text(key, text) == "0x" + bytes(expected_text).hex()


def test_a_session_token_signed_by_the_wallet_is_the_one_eth_account_signs() -> None:
    key = bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
    wallet, account = Wallet.from_key(key), Account.from_key(key)
    claim = SessionClaim(
        session_id="s_1",
        address=wallet.address,
        origin="http://127.0.0.1:1",
        scope="prefix",
        path="/x",
        query=None,
        issued_at=1_800_000_000,
        expires_at=1_800_003_600,
        tx_hash=None,
        amount="10000",
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        network="eip155:84532",
        pay_to="0x" + "22" * 20,
    )
    assert make_session_token(claim, wallet) == make_session_token(claim, account)


def test_the_exact_payload_has_the_sdks_shape_and_signature() -> None:
    """The whole inner payload of a real header, as the SDK's ExactEIP3009Payload writes it."""
    key = bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d")
    wallet, account = Wallet.from_key(key), Account.from_key(key)
    challenge = parsed(v2_response(v2_requirement(amount="1234")))
    window = AuthorizationWindow("0x" + "ab" * 32, 100, 2_000_000_000)
    header = build_payment_header(challenge, select(challenge), wallet, NOW, None, window)

    authorization = ExactEIP3009Authorization(
        from_address=account.address,
        to=to_checksum_address(PAY_TO),
        value="1234",
        valid_after="100",
        valid_before="2000000000",
        nonce="0x" + "ab" * 32,
    )
    signature = sdk_signature(account, authorization, 84532, BASE_SEPOLIA_USDC, "USDC", "2")
    expected = ExactEIP3009Payload(authorization=authorization, signature="0x" + signature.hex()).to_dict()
    assert header.payload_dict["payload"] == expected
    assert header.nonce == "0x" + "ab" * 32 and header.valid_before == 2_000_000_000


def test_payment_identifier_name_and_ids_are_the_sdks() -> None:
    assert signer.PAYMENT_IDENTIFIER == PAYMENT_IDENTIFIER
    ids = {signer.new_payment_id() for _ in range(50)}
    assert len(ids) == 50 and all(is_valid_payment_id(i) and i.startswith("pay_") for i in ids)


def test_bad_inputs_are_refused_not_signed() -> None:
    key = bytes(31) + b"\x01"
    for bad in ("0x1234", "0x" + "zz" * 20):
        try:
            evm_sign.checksum_address(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    try:
        evm_sign.sign_digest(key, b"short")
    except ValueError:
        pass
    else:
        raise AssertionError("a short digest was signed")
    try:
        evm_sign.eip3009_digest(
            token_name="T",
            token_version="1",
            chain_id=1,
            token="0x" + "11" * 20,
            sender="0x" + "22" * 20,
            to="0x" + "33" * 20,
            value=2**256,
            valid_after=0,
            valid_before=1,
            nonce="0x" + "00" * 32,
        )
    except ValueError:
        pass
    else:
        raise AssertionError("a value over uint256 was signed")
