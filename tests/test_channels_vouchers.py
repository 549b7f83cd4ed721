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
