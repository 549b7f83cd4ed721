"""x402 `batch-settlement` end to end on the local chain, with the SDK's own client (no proxy).

The real PyPI SDK on every side (client `BatchSettlementEvmScheme`, server `BatchSettlementEvmScheme`
with its channel manager, facilitator `BatchSettlementEvmFacilitator`), our contracts at the SDK's
addresses on a real anvil (tests/stack/channels.py), loopback only. What is asserted is what the
chain says: token balances, channel (balance, totalClaimed), the receiver's claimed/settled account.

Each test opens its own channel (its own `salt`, so its own channelId) and measures deltas.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3 import Web3
from web3.exceptions import ContractCustomError
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402HttpxClient
from x402.http.utils import decode_payment_required_header, decode_payment_response_header
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementClientContext,
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    ClientChannelStorage,
    FileChannelStorageOptions,
    FileClientChannelStorage,
    InMemoryClientChannelStorage,
    RefundOptions,
)
from x402.mechanisms.evm.batch_settlement.client.refund import _RefundResponse
from x402.mechanisms.evm.batch_settlement.constants import BATCH_SETTLEMENT_ADDRESS
from x402.mechanisms.evm.batch_settlement.errors import ERR_CHANNEL_BUSY, ERR_CUMULATIVE_AMOUNT_MISMATCH
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC
from x402.schemas import PaymentRequired

from tests.stack import fixtures as _stack_fixtures
from tests.stack.channels import ChannelStack

x402_channel_stack = _stack_fixtures.x402_channel_stack  # the session fixture, registered here

NETWORK = "eip155:84532"
# Spend cap per payment: the SDK client sizes a deposit at most deposit_multiplier (5) x this cap.
CAP = "2000"


@dataclass
class Payer:
    """One SDK client: its scheme (channel state in `storage`) and an x402 httpx client."""

    scheme: BatchSettlementEvmScheme
    storage: ClientChannelStorage
    client: x402Client
    salt: str

    def channel_id(self, stack: ChannelStack, path: str = "/paid/ch") -> str:
        reqs = probe_requirements(stack, path)
        return str(compute_id(self.scheme, reqs))

    def context(self, stack: ChannelStack) -> BatchSettlementClientContext | None:
        return self.storage.get(self.channel_id(stack))


def make_payer(
    stack: ChannelStack, *, salt: str | None = None, storage: ClientChannelStorage | None = None
) -> Payer:
    signer = EthAccountSignerWithRPC(stack.payer, stack.rpc_url)  # read_contract: on-chain recovery
    store = storage if storage is not None else InMemoryClientChannelStorage()
    salt = salt or "0x" + secrets.token_hex(32)
    scheme = BatchSettlementEvmScheme(signer, BatchSettlementEvmSchemeOptions(storage=store, salt=salt))
    client = x402Client()
    client.register(NETWORK, scheme)
    client.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": stack.token, "max_amount_per_payment": CAP}]}
    )
    return Payer(scheme=scheme, storage=store, client=client, salt=salt)


def probe_requirements(stack: ChannelStack, path: str) -> Any:
    r = httpx.get(f"{stack.server}{path}", timeout=30, trust_env=False)
    assert r.status_code == 402
    required = decode_payment_required_header(r.headers["payment-required"])
    return next(a for a in required.accepts if a.scheme == "batch-settlement")


def compute_id(scheme: BatchSettlementEvmScheme, requirements: Any) -> str:
    from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id

    return compute_channel_id(scheme.build_channel_config(requirements), NETWORK)


def loopback_fetch(url: str, headers: dict[str, str]) -> _RefundResponse:
    """The refund flow's HTTP call, without inheriting proxy settings from the environment."""
    r = httpx.get(url, headers=headers, timeout=60, trust_env=False)
    return _RefundResponse(status=r.status_code, headers=dict(r.headers))


async def pay(payer: Payer, url: str, n: int) -> list[httpx.Response]:
    out = []
    async with x402HttpxClient(payer.client, trust_env=False, timeout=60) as http:
        for _ in range(n):
            out.append(await http.get(url))
    return out


def deposits_settled(stack: ChannelStack) -> int:
    counts: dict[str, int] = stack.facilitator_stats()["counts"]
    return counts.get("settle batch-settlement:deposit ok", 0)


# ------------------------------------------------------------------------------------------------


def test_contracts_sit_at_the_sdk_addresses(x402_channel_stack: ChannelStack) -> None:
    stack = x402_channel_stack
    code = stack.chain.w3.eth.get_code(Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS))
    assert len(code) > 1000
    # The contract's channel id is the SDK's compute_channel_id (EIP-712 over ChannelConfig).
    payer = make_payer(stack)
    reqs = probe_requirements(stack, "/paid/ch")
    config = payer.scheme.build_channel_config(reqs)
    onchain = stack.settlement.functions.getChannelId(
        (
            config.payer,
            config.payer_authorizer,
            config.receiver,
            config.receiver_authorizer,
            config.token,
            config.withdraw_delay,
            bytes.fromhex(config.salt.removeprefix("0x")),
        )
    ).call()
    assert "0x" + onchain.hex().removeprefix("0x") == compute_id(payer.scheme, reqs).lower()
    # The 402 offers both schemes; batch-settlement names the seller's receiverAuthorizer and a floor.
    assert reqs.extra["receiverAuthorizer"]
    assert reqs.extra["minDeposit"] == str(10 * stack.price)
    assert reqs.extra["withdrawDelay"] == 900


async def test_deposit_once_n_vouchers_claim_settle_and_refund(x402_channel_stack: ChannelStack) -> None:
    stack = x402_channel_stack
    n = 5
    claimed, settled = stack.receiver_state()
    if claimed > settled:  # vouchers claimed by earlier tests on this shared stack: settled first, so the
        stack.settle()  # deltas below are this channel's alone
    payer = make_payer(stack)
    payer_before = stack.balance_of(stack.payer_address)
    seller_before = stack.balance_of(stack.pay_to)
    deposits_before = deposits_settled(stack)

    responses = await pay(payer, f"{stack.server}/paid/ch", n)
    assert [r.status_code for r in responses] == [200] * n
    receipts = [decode_payment_response_header(r.headers["payment-response"]) for r in responses]
    assert all(rc.success for rc in receipts)
    # One on-chain transaction for the deposit; every later request rode a voucher (no transaction).
    assert receipts[0].transaction
    assert [rc.transaction for rc in receipts[1:]] == [""] * (n - 1)
    assert deposits_settled(stack) == deposits_before + 1

    channel_id = payer.channel_id(stack)
    deposit = 5 * int(CAP)  # min(max(needed, minDeposit 10 x price), 5 x cap) = 10000
    assert stack.channel_state(channel_id) == (deposit, 0)
    assert stack.balance_of(stack.payer_address) == payer_before - deposit
    ctx = payer.context(stack)
    assert ctx is not None and ctx.charged_cumulative_amount == str(n * stack.price)
    assert ctx.balance == str(deposit)
    server_view = next(c for c in stack.server_channels() if c["channelId"] == channel_id.lower())
    assert server_view["chargedCumulativeAmount"] == str(n * stack.price)
    assert server_view["signedMaxClaimable"] == str(n * stack.price)

    # The seller claims the latest voucher and settles: the money reaches the receiver.
    claimed_before, settled_before = stack.receiver_state()
    result = stack.claim_and_settle()
    assert result["claims"] and result["settle"]
    assert stack.channel_state(channel_id) == (deposit, n * stack.price)
    assert stack.receiver_state() == (claimed_before + n * stack.price, settled_before + n * stack.price)
    assert stack.balance_of(stack.pay_to) == seller_before + n * stack.price

    # The buyer ends the channel: the unused deposit comes back through the SDK's refund flow.
    settle = await asyncio.to_thread(
        payer.scheme.refund, f"{stack.server}/paid/ch", RefundOptions(fetch=loopback_fetch)
    )
    assert settle.success, settle
    assert settle.transaction
    assert stack.channel_state(channel_id) == (n * stack.price, n * stack.price)
    assert stack.refund_nonce(channel_id) == 1
    assert payer.storage.get(channel_id) is None  # a full refund drops the local record

    net_spend = payer_before - stack.balance_of(stack.payer_address)
    assert net_spend == n * stack.price == int(server_view["signedMaxClaimable"])
    assert stack.balance_of(stack.pay_to) - seller_before == net_spend


async def test_refund_claims_outstanding_vouchers_in_the_same_transaction(
    x402_channel_stack: ChannelStack,
) -> None:
    stack = x402_channel_stack
    n = 3
    payer = make_payer(stack)
    payer_before = stack.balance_of(stack.payer_address)
    seller_before = stack.balance_of(stack.pay_to)
    claimed_before, settled_before = stack.receiver_state()

    assert [r.status_code for r in await pay(payer, f"{stack.server}/paid/ch", n)] == [200] * n
    channel_id = payer.channel_id(stack)
    assert stack.channel_state(channel_id)[1] == 0  # nothing claimed yet

    settle = await asyncio.to_thread(
        payer.scheme.refund, f"{stack.server}/paid/ch", RefundOptions(fetch=loopback_fetch)
    )
    assert settle.success, settle
    # claimWithSignature + refundWithSignature in one multicall: the seller's vouchers are claimed,
    # the rest goes back; the claimed money waits in the receiver's account until settle.
    assert stack.channel_state(channel_id) == (n * stack.price, n * stack.price)
    assert stack.receiver_state() == (claimed_before + n * stack.price, settled_before)
    assert payer_before - stack.balance_of(stack.payer_address) == n * stack.price
    stack.settle()
    assert stack.balance_of(stack.pay_to) - seller_before == n * stack.price


async def test_corrective_402_after_the_client_lost_its_channel_state(
    x402_channel_stack: ChannelStack,
) -> None:
    """A client restarted without its records (salt kept) recovers from the chain, signs a voucher
    below the server's view, gets the corrective 402 (`channelState` + the server's last voucher),
    resyncs and pays on. No second deposit, no double charge."""
    stack = x402_channel_stack
    first = make_payer(stack)
    payer_before = stack.balance_of(stack.payer_address)
    assert [r.status_code for r in await pay(first, f"{stack.server}/paid/ch", 3)] == [200] * 3
    deposits_before = deposits_settled(stack)

    # "Restart": same key and salt, empty storage. By hand first, to see the corrective 402.
    second = make_payer(stack, salt=first.salt)
    channel_id = second.channel_id(stack)
    http = x402HTTPClient(second.client)
    url = f"{stack.server}/paid/ch"
    r0 = httpx.get(url, timeout=30, trust_env=False)
    required = http.get_payment_required_response(r0.headers.get, None)
    assert isinstance(required, PaymentRequired)
    payload = await second.client.create_payment_payload(required)
    # Recovered from channels(channelId): charged = totalClaimed on chain = 0, so the voucher is 1 price.
    assert payload.payload["type"] == "voucher"
    assert payload.payload["voucher"]["maxClaimableAmount"] == str(stack.price)
    r1 = httpx.get(url, headers=http.encode_payment_signature_header(payload), timeout=30, trust_env=False)
    assert r1.status_code == 402
    corrective = decode_payment_required_header(r1.headers["payment-required"])
    assert isinstance(corrective, PaymentRequired)
    assert corrective.error == ERR_CUMULATIVE_AMOUNT_MISMATCH
    offer = next(a for a in corrective.accepts if a.scheme == "batch-settlement")
    assert offer.extra["channelState"]["chargedCumulativeAmount"] == str(3 * stack.price)
    assert offer.extra["voucherState"]["signedMaxClaimable"] == str(3 * stack.price)

    # The SDK verifies the server's voucher signature against our own key and resyncs.
    assert second.scheme.process_corrective_payment_required(corrective)
    ctx = second.storage.get(channel_id)
    assert ctx is not None and ctx.charged_cumulative_amount == str(3 * stack.price)
    retry = await second.client.create_payment_payload(required)
    assert retry.payload["voucher"]["maxClaimableAmount"] == str(4 * stack.price)
    r2 = httpx.get(url, headers=http.encode_payment_signature_header(retry), timeout=30, trust_env=False)
    assert r2.status_code == 200
    await http.process_payment_result(retry, r2.headers.get, r2.status_code)
    ctx = second.storage.get(channel_id)
    assert ctx is not None and ctx.charged_cumulative_amount == str(4 * stack.price)

    # The same recovery, automatic: a third fresh client through the SDK's httpx transport.
    third = make_payer(stack, salt=first.salt)
    assert [r.status_code for r in await pay(third, url, 1)] == [200]
    ctx = third.storage.get(channel_id)
    assert ctx is not None and ctx.charged_cumulative_amount == str(5 * stack.price)
    assert deposits_settled(stack) == deposits_before  # never a second deposit

    settle = await asyncio.to_thread(third.scheme.refund, url, RefundOptions(fetch=loopback_fetch))
    assert settle.success, settle
    assert payer_before - stack.balance_of(stack.payer_address) == 5 * stack.price


async def test_client_state_in_files_survives_a_restart(
    x402_channel_stack: ChannelStack, tmp_path: Path
) -> None:
    stack = x402_channel_stack
    store_dir = tmp_path / "channels"
    first = make_payer(
        stack, storage=FileClientChannelStorage(FileChannelStorageOptions(directory=store_dir))
    )
    payer_before = stack.balance_of(stack.payer_address)
    assert [r.status_code for r in await pay(first, f"{stack.server}/paid/ch", 2)] == [200] * 2
    channel_id = first.channel_id(stack)
    assert (store_dir / "client" / f"{channel_id.lower()}.json").is_file()

    # A new process: new scheme, same directory and salt. The next voucher continues the cumulative
    # sum on the first try (the server's stats count every handled request: 2 + 2, no corrective 402).
    handled_before = stack.server_stats()["handled"].get("/paid/ch", 0)
    again = make_payer(
        stack,
        salt=first.salt,
        storage=FileClientChannelStorage(FileChannelStorageOptions(directory=store_dir)),
    )
    ctx = again.storage.get(channel_id)
    assert ctx is not None and ctx.charged_cumulative_amount == str(2 * stack.price)
    http = x402HTTPClient(again.client)
    r0 = httpx.get(f"{stack.server}/paid/ch", timeout=30, trust_env=False)
    payload = await again.client.create_payment_payload(
        http.get_payment_required_response(r0.headers.get, None)
    )
    assert payload.payload["voucher"]["maxClaimableAmount"] == str(3 * stack.price)
    r1 = httpx.get(
        f"{stack.server}/paid/ch",
        headers=http.encode_payment_signature_header(payload),
        timeout=30,
        trust_env=False,
    )
    assert r1.status_code == 200
    await http.process_payment_result(payload, r1.headers.get, r1.status_code)
    assert stack.server_stats()["handled"]["/paid/ch"] == handled_before + 1

    settle = await asyncio.to_thread(
        again.scheme.refund, f"{stack.server}/paid/ch", RefundOptions(fetch=loopback_fetch)
    )
    assert settle.success, settle
    assert not (store_dir / "client" / f"{channel_id.lower()}.json").exists()
    assert payer_before - stack.balance_of(stack.payer_address) == 3 * stack.price


async def test_concurrent_requests_on_one_channel(x402_channel_stack: ChannelStack) -> None:
    """The SDK server holds one request per channel at a time (a pending reservation): overlapping
    vouchers are refused with a 402, never charged. Serialized, every request is paid once."""
    stack = x402_channel_stack
    payer = make_payer(stack)
    payer_before = stack.balance_of(stack.payer_address)
    slow = f"{stack.server}/paid/slow?delay=1.0"
    # Open the channel first (the deposit), so the overlap below is on vouchers only.
    assert [r.status_code for r in await pay(payer, f"{stack.server}/paid/ch", 1)] == [200]

    async with x402HttpxClient(payer.client, trust_env=False, timeout=60) as http:
        racing = await asyncio.gather(*(http.get(slow) for _ in range(3)))
    statuses = sorted(r.status_code for r in racing)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 402}
    refused = [r for r in racing if r.status_code == 402]
    assert refused, "three overlapping vouchers on one channel: the server must refuse some"
    for r in refused:
        error = decode_payment_required_header(r.headers["payment-required"]).error or ""
        assert error in (ERR_CHANNEL_BUSY, ERR_CUMULATIVE_AMOUNT_MISMATCH), error
    paid_racing = statuses.count(200)

    # Serialized (what a client must do per channel): all paid.
    lock = asyncio.Lock()

    async def one(http: httpx.AsyncClient) -> httpx.Response:
        async with lock:
            return await http.get(f"{stack.server}/paid/slow?delay=0.2")

    async with x402HttpxClient(payer.client, trust_env=False, timeout=60) as http:
        serial = await asyncio.gather(*(one(http) for _ in range(3)))
    assert [r.status_code for r in serial] == [200] * 3

    charged = (1 + paid_racing + 3) * stack.price
    channel_id = payer.channel_id(stack)
    server_view = next(c for c in stack.server_channels() if c["channelId"] == channel_id.lower())
    assert server_view["chargedCumulativeAmount"] == str(charged)
    settle = await asyncio.to_thread(
        payer.scheme.refund, f"{stack.server}/paid/ch", RefundOptions(fetch=loopback_fetch)
    )
    assert settle.success, settle
    assert payer_before - stack.balance_of(stack.payer_address) == charged


def test_payer_can_leave_without_the_seller_after_the_withdraw_delay(
    x402_channel_stack: ChannelStack,
) -> None:
    """initiateWithdraw / finalizeWithdraw on our contract: the deposit is never stuck. The seller may
    still claim its vouchers during the delay; the payer gets the unclaimed rest."""
    stack = x402_channel_stack
    payer = make_payer(stack)
    payer_before = stack.balance_of(stack.payer_address)
    assert [r.status_code for r in asyncio.run(pay(payer, f"{stack.server}/paid/ch", 2))] == [200] * 2
    reqs = probe_requirements(stack, "/paid/ch")
    config = payer.scheme.build_channel_config(reqs)
    cfg = (
        config.payer,
        config.payer_authorizer,
        config.receiver,
        config.receiver_authorizer,
        config.token,
        config.withdraw_delay,
        bytes.fromhex(config.salt.removeprefix("0x")),
    )
    channel_id = compute_id(payer.scheme, reqs)
    balance, _ = stack.channel_state(channel_id)
    w3 = stack.chain.w3
    fn = stack.settlement.functions

    def send(call: Any) -> Any:
        tx = call.transact({"from": stack.payer_address})
        return w3.eth.wait_for_transaction_receipt(tx, timeout=30, poll_latency=0.05)

    assert send(fn.initiateWithdraw(cfg, balance))["status"] == 1
    not_yet = "0x" + Web3.keccak(text="WithdrawDelayNotElapsed(uint256)")[:4].hex().removeprefix("0x")
    with pytest.raises(ContractCustomError, match=not_yet):
        fn.finalizeWithdraw(cfg).call({"from": stack.payer_address})
    stack.claim_and_settle()  # the seller claims its 2 vouchers within the delay
    # The chain's clock goes forward by the delay: taken back afterwards (snapshot, revert), or every later
    # test on this session's stack would sign authorizations the chain already finds expired.
    before_delay = stack.chain.snapshot()
    try:
        stack.chain.increase_time(config.withdraw_delay + 1)
        stack.chain.mine()
        assert send(fn.finalizeWithdraw(cfg))["status"] == 1
        assert stack.channel_state(channel_id) == (2 * stack.price, 2 * stack.price)
        assert payer_before - stack.balance_of(stack.payer_address) == 2 * stack.price
    finally:
        assert stack.chain.revert(before_delay)
