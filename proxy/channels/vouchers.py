"""The next cumulative voucher of an open channel, built from what the holder already knows.

The SDK's `create_payment_payload` rebuilds the channel's config and recomputes its id (an EIP-712 hash
with checksummed addresses) and the EIP-712 domain on every voucher: ~0.8 ms of CPU per request here,
most of a channel request's cost in the proxy (bench/channel_requests.py). For a channel that is open
(a row of ours, a deposit on chain, the SDK's context in our table) none of that changes, so:

- the payload's `channelConfig` is built once per channel (the SDK's `build_channel_config`), and its
  dict kept;
- the voucher's EIP-712 digest is `keccak(0x1901 || domainSeparator || keccak(typeHash || channelId ||
  maxClaimableAmount))` with the domain separator and type hash computed once per wallet and network
  from the SDK's own `VOUCHER_TYPES` and domain, signed with the wallet's key by `payments/evm_sign.py`
  (libsecp256k1 via coincurve, as EIP-3009 is signed; the SDK goes through eth-account's typed-data
  encoder and its SignedMessage, ~0.3 ms);
- `VoucherSigner` checks itself when built: its signature of a sample voucher must equal the SDK's
  `sign_voucher` of the same voucher (deterministic signatures, RFC 6979); if it does not (an SDK that
  changed its typed data), every voucher is signed by the SDK's `sign_voucher` instead.

`PaymentHeader` is the PAYMENT-SIGNATURE value for one channel: the SDK's own encoding of its
`PaymentPayload` (the channel's requirements and resource, dumped once by pydantic) with each voucher's
payload spliced in, instead of a pydantic model built and dumped per request; checked byte for byte
against `encode_payment_signature_header` when built (or every header is encoded by the SDK).

The amount rules are the SDK's: the base is the context's `chargedCumulativeAmount`, the voucher is base
+ price; no balance (a deposit would be needed) or base + price above the balance (a top-up) means no
voucher: the holder retires the channel, as it did when the SDK built a deposit payload.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from proxy.payments.evm_sign import keccak256, sign_digest

log = logging.getLogger("x402_proxy.channels")


def _encode_type(types: dict[str, list[dict[str, str]]], primary: str) -> bytes:
    fields = ",".join(f"{f['type']} {f['name']}" for f in types[primary])
    return f"{primary}({fields})".encode()


class VoucherSigner:
    """Vouchers for one wallet on one network (see the module docstring)."""

    def __init__(self, account: Any, sdk_signer: Any, network: str) -> None:
        from eth_account.messages import encode_typed_data
        from x402.mechanisms.evm.batch_settlement.constants import VOUCHER_TYPES
        from x402.mechanisms.evm.batch_settlement.utils import get_batch_settlement_eip712_domain
        from x402.mechanisms.evm.utils import get_evm_chain_id

        self._secret = bytes(account.key)
        self._sdk_signer = sdk_signer
        self._network = network
        fields = VOUCHER_TYPES["Voucher"]
        self._fast = [f["name"] for f in fields] == ["channelId", "maxClaimableAmount"] and all(
            f["type"] in ("bytes32", "uint128", "uint256") for f in fields
        )
        domain = get_batch_settlement_eip712_domain(get_evm_chain_id(network))
        sample = {"channelId": b"\x11" * 32, "maxClaimableAmount": 1}
        signable = encode_typed_data(domain_data=domain, message_types=VOUCHER_TYPES, message_data=sample)
        self._domain_separator = bytes(signable.header)
        self._type_hash = keccak256(_encode_type(VOUCHER_TYPES, "Voucher"))
        if self._fast:
            self._fast = self._digest(b"\x11" * 32, 1) == keccak256(
                b"\x19" + signable.version + signable.header + signable.body
            )
        if self._fast:
            channel = "0x" + "22" * 32
            self._fast = self.sign(channel, 12345).to_dict() == self._sdk_sign(channel, 12345).to_dict()
        if not self._fast:
            log.warning("vouchers: the SDK's typed data changed; each voucher is signed by its sign_voucher")

    def _digest(self, channel_id: bytes, amount: int) -> bytes:
        body = keccak256(self._type_hash + channel_id + amount.to_bytes(32, "big"))
        return keccak256(b"\x19\x01" + self._domain_separator + body)

    def _sdk_sign(self, channel_id: str, amount: int) -> Any:
        from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher

        return sign_voucher(self._sdk_signer, channel_id, amount, self._network)

    def sign(self, channel_id: str, amount: int) -> Any:
        """The SDK's `VoucherFields` for (channel_id, maxClaimableAmount = amount)."""
        if not self._fast:
            return self._sdk_sign(channel_id, amount)
        from x402.mechanisms.evm.batch_settlement.types import VoucherFields

        raw = bytes.fromhex(channel_id.removeprefix("0x"))
        if len(raw) != 32 or not 0 <= amount < 1 << 128:
            raise ValueError(f"not a voucher: channel {channel_id!r}, amount {amount}")
        signature = sign_digest(self._secret, self._digest(raw, amount))
        return VoucherFields(
            channel_id=channel_id, max_claimable_amount=str(amount), signature="0x" + signature.hex()
        )


def voucher_payload(config_dict: dict[str, Any], voucher: Any) -> dict[str, Any]:
    """The SDK's `VoucherPayload(...).to_dict()` with the channel's config dict built once."""
    return {"type": "voucher", "channelConfig": config_dict, "voucher": voucher.to_dict()}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class PaymentHeader:
    """PAYMENT-SIGNATURE values of one channel's vouchers (see the module docstring)."""

    _HOLE = {"x402-proxy-voucher-payload": 0}

    def __init__(self, requirements: Any, resource: Any) -> None:
        self._requirements = requirements
        self._resource = resource
        self._config_json: tuple[Any, str] | None = None
        text = self._sdk_json(self._HOLE)
        hole = _compact(self._HOLE)
        before, found, after = text.partition(hole)
        self._parts: tuple[str, str] | None = (before, after) if found and hole not in after else None
        sample = voucher_payload({"sample": "x"}, _SampleVoucher())
        if self._parts is not None and self.encode(sample) != self._sdk_encode(sample):
            self._parts = None
        if self._parts is None:
            log.warning("vouchers: the SDK's payload encoding changed; each header is encoded by the SDK")

    def _sdk_json(self, inner: dict[str, Any]) -> str:
        from x402.schemas import PaymentPayload

        payload = PaymentPayload(
            x402_version=2, payload=inner, accepted=self._requirements, resource=self._resource
        )
        return payload.model_dump_json(by_alias=True, exclude_none=True)

    def _sdk_encode(self, inner: dict[str, Any]) -> str:
        return base64.b64encode(self._sdk_json(inner).encode()).decode()

    def encode(self, inner: dict[str, Any]) -> str:
        """The header value for a voucher's payload (`voucher_payload`)."""
        if self._parts is None:
            return self._sdk_encode(inner)
        before, after = self._parts
        return base64.b64encode((before + self._inner_json(inner) + after).encode()).decode()

    def _inner_json(self, inner: dict[str, Any]) -> str:
        """`_compact(inner)`; the channel's config (the same dict each voucher: `_Live.config`, built once,
        never changed) encoded once: it is most of the payload's JSON."""
        if list(inner) != ["type", "channelConfig", "voucher"] or inner["type"] != "voucher":
            return _compact(inner)
        config = inner["channelConfig"]
        cached = self._config_json
        if cached is None or cached[0] is not config:
            cached = self._config_json = (config, _compact(config))
        voucher = _compact(inner["voucher"])
        return '{"type":"voucher","channelConfig":' + cached[1] + ',"voucher":' + voucher + "}"


class _SampleVoucher:
    def to_dict(self) -> dict[str, Any]:
        return {"channelId": "0x" + "11" * 32, "maxClaimableAmount": "12345", "signature": "0x" + "ab" * 65}
