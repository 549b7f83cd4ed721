"""proxy/channels/vouchers.py signs what the SDK's own `sign_voucher` signs, signature for signature (the
end-to-end proof is every voucher the SDK's resource server accepts in tests/test_channels_proxy.py and
tests/test_channels_end_paths.py, all signed by it)."""

from __future__ import annotations

import secrets

from eth_account import Account
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.signers import EthAccountSigner

from proxy.channels.vouchers import VoucherSigner


def test_vouchers_equal_the_sdks_and_take_the_fast_path() -> None:
    account = Account.create()
    sdk = EthAccountSigner(account)
    for network in ("eip155:84532", "eip155:8453"):
        signer = VoucherSigner(account, sdk, network)
        assert signer._fast  # the self-check passed: not the SDK fallback
        for amount in (0, 1, 1000, 10**18, (1 << 128) - 1):
            channel = "0x" + secrets.token_hex(32)
            assert signer.sign(channel, amount).to_dict() == sign_voucher(sdk, channel, amount, network).to_dict()


def test_payment_header_is_the_sdks_encoding_byte_for_byte() -> None:
    """PaymentHeader splices each voucher's payload into the SDK's own dump of the channel's
    PaymentPayload: the value must equal encode_payment_signature_header's, for real payloads."""
    from x402.http.utils import encode_payment_signature_header
    from x402.schemas import PaymentPayload, PaymentRequirements, ResourceInfo

    from proxy.channels.vouchers import PaymentHeader, voucher_payload

    account = Account.create()
    sdk = EthAccountSigner(account)
    network = "eip155:84532"
    signer = VoucherSigner(account, sdk, network)
    requirements = PaymentRequirements(
        scheme="batch-settlement",
        network=network,
        asset="0x" + "ab" * 20,
        amount="1000",
        pay_to="0x" + "cd" * 20,
        max_timeout_seconds=60,
        extra={"receiverAuthorizer": "0x" + "ef" * 20, "withdrawDelay": 900, "note": "ünïcode"},
    )
    config = {"payer": account.address, "salt": "0x" + "00" * 31 + "01", "withdrawDelay": 900}
    for resource in (None, ResourceInfo(url="http://127.0.0.1:1/paid/ch", description="ch", mime_type="")):
        header = PaymentHeader(requirements, resource)
        assert header._parts is not None  # the self-check passed: not the SDK fallback
        for amount in (1, 1000, 10**18):
            inner = voucher_payload(config, signer.sign("0x" + secrets.token_hex(32), amount))
            expected = encode_payment_signature_header(
                PaymentPayload(x402_version=2, payload=inner, accepted=requirements, resource=resource)
            )
            assert header.encode(inner) == expected
        # The config's JSON is kept per config dict: another channel's config is encoded afresh.
        other = {"payer": account.address, "salt": "0x" + "00" * 31 + "02", "note": "ünïcode"}
        for cfg in (other, config):
            inner = voucher_payload(cfg, signer.sign("0x" + secrets.token_hex(32), 7))
            expected = encode_payment_signature_header(
                PaymentPayload(x402_version=2, payload=inner, accepted=requirements, resource=resource)
            )
            assert header.encode(inner) == expected
