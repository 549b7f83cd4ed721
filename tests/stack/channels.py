"""x402 `batch-settlement` channels on the local chain: our contracts at the SDK's addresses, plus a
channel facilitator and resource server (`server_channels.py`).

    with start_channel_stack(workdir) as ch:     # own anvil, TestUSDC, Multicall3, channel contracts
        ch.server                                # "http://127.0.0.1:PORT" (GET /paid/ch, ...)
        ch.channel_state(channel_id)             # (balance, totalClaimed) read from the contract
        ch.claim_and_settle()                    # the seller claims every voucher and settles

No registry ships the channel contracts' bytecode, so `contracts/BatchSettlement.sol` and
`contracts/ERC3009DepositCollector.sol` are ours, written against the ABI in the SDK's
`batch_settlement/abi.py`; `install_channel_contracts` puts their runtime code at the SDK's CREATE2
addresses with `anvil_setCode` (they need no constructor). The stack runs its own anvil: tests that
move chain time or revert snapshots on the shared stack cannot disturb a channel, and the channel
tests cannot disturb them. Roles use dev accounts 6..9, which the shared stack does not use.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.constants import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
)

from ._proc import STACK_DIR, ManagedProcess, free_port, http_ready, wait_all
from .chain import DEV_ACCOUNTS, NETWORK_V2, TOKEN_DECIMALS, Chain, DevAccount, load_artifact, start_chain

CHANNEL_PAYER = DEV_ACCOUNTS[6]
CHANNEL_PAY_TO = DEV_ACCOUNTS[7]
RECEIVER_AUTHORIZER = DEV_ACCOUNTS[8]  # the seller's claim/refund signing key
CHANNEL_FACILITATOR = DEV_ACCOUNTS[9]  # pays the gas of deposits, claims, settles, refunds

DEFAULT_CHANNEL_PRICE = 1000  # 0.001 USDC per request
DEFAULT_CHANNEL_PAYER_FUNDS = 10 * 10**TOKEN_DECIMALS
STARTUP_TIMEOUT = 60.0

# (artifact, address) pairs placed by install_channel_contracts.
CHANNEL_CONTRACTS: tuple[tuple[str, str], ...] = (
    ("BatchSettlement", BATCH_SETTLEMENT_ADDRESS),
    ("ERC3009DepositCollector", ERC3009_DEPOSIT_COLLECTOR_ADDRESS),
)


def install_channel_contracts(chain: Chain) -> None:
    """Place our BatchSettlement and ERC-3009 deposit collector at the SDK's addresses."""
    for name, address in CHANNEL_CONTRACTS:
        code = load_artifact(name)["deployedBytecode"]
        chain.rpc("anvil_setCode", [address, code])
        if chain.w3.eth.get_code(Web3.to_checksum_address(address)).hex().removeprefix(
            "0x"
        ) != code.removeprefix("0x"):
            raise RuntimeError(f"anvil_setCode did not place {name} at {address}")


@dataclass
class ChannelStack:
    """A chain with the channel contracts, a channel facilitator and a channel resource server."""

    workdir: Path
    chain: Chain
    token: str
    facilitator_url: str
    server: str
    price: int
    payer_key: str
    pay_to: str
    network: str = NETWORK_V2
    _procs: list[ManagedProcess] = field(default_factory=list, repr=False)

    @property
    def rpc_url(self) -> str:
        return self.chain.rpc_url

    @property
    def payer(self) -> LocalAccount:
        account: LocalAccount = Account.from_key(self.payer_key)
        return account

    @property
    def payer_address(self) -> str:
        return str(self.payer.address)

    def balance_of(self, address: str) -> int:
        return self.chain.balance_of(address)

    # -- contract reads ----------------------------------------------------------------------

    @property
    def settlement(self) -> Any:
        return self.chain.w3.eth.contract(address=BATCH_SETTLEMENT_ADDRESS, abi=BATCH_SETTLEMENT_ABI)

    def channel_state(self, channel_id: str) -> tuple[int, int]:
        """(balance, totalClaimed) of a channel, from the contract."""
        balance, total_claimed = self.settlement.functions.channels(_b32(channel_id)).call()
        return int(balance), int(total_claimed)

    def refund_nonce(self, channel_id: str) -> int:
        return int(self.settlement.functions.refundNonce(_b32(channel_id)).call())

    def receiver_state(self, receiver: str | None = None) -> tuple[int, int]:
        """(totalClaimed, totalSettled) of the receiver's account for the token."""
        addr = Web3.to_checksum_address(receiver or self.pay_to)
        claimed, settled = self.settlement.functions.receivers(
            addr, Web3.to_checksum_address(self.token)
        ).call()
        return int(claimed), int(settled)

    # -- the seller's side (server controls) -------------------------------------------------

    def server_channels(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = httpx.get(
            f"{self.server}/__channels", timeout=30, trust_env=False
        ).json()
        return data

    def claim_and_settle(self) -> dict[str, Any]:
        r = httpx.post(f"{self.server}/__claim_settle", timeout=120, trust_env=False)
        data: dict[str, Any] = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"claim_and_settle: {data}")
        return data

    def settle(self) -> dict[str, Any]:
        r = httpx.post(f"{self.server}/__settle", timeout=120, trust_env=False)
        data: dict[str, Any] = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"settle: {data}")
        return data

    def seller_refund(self) -> list[dict[str, Any]]:
        r = httpx.post(f"{self.server}/__refund", timeout=120, trust_env=False)
        data: list[dict[str, Any]] = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"refund: {data}")
        return data

    def server_stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.server}/__stats", timeout=30, trust_env=False).json()
        return data

    def facilitator_stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.facilitator_url}/__stats", timeout=30, trust_env=False
        ).json()
        return data

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self.chain.stop()

    def __enter__(self) -> ChannelStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _b32(value: str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError("expected a bytes32 hex string")
    return raw


def start_channel_stack(
    workdir: Path,
    *,
    price: int = DEFAULT_CHANNEL_PRICE,
    payer: DevAccount = CHANNEL_PAYER,
    pay_to: DevAccount = CHANNEL_PAY_TO,
    payer_funds: int = DEFAULT_CHANNEL_PAYER_FUNDS,
    timeout: float = STARTUP_TIMEOUT,
) -> ChannelStack:
    """anvil -> Multicall3, TestUSDC, channel contracts -> facilitator -> server; waits for each."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    chain = start_chain(workdir)
    procs: list[ManagedProcess] = []
    script = str(STACK_DIR / "server_channels.py")
    try:
        install_channel_contracts(chain)
        chain.mint(payer.address, payer_funds)
        fac_port = free_port()
        facilitator_url = f"http://127.0.0.1:{fac_port}"
        fac = ManagedProcess(
            "channel_facilitator",
            [
                sys.executable,
                script,
                "facilitator",
                "--port",
                str(fac_port),
                "--rpc",
                chain.rpc_url,
                "--key",
                CHANNEL_FACILITATOR.key,
            ],
            workdir / "channel_facilitator.log",
        )
        procs.append(fac)
        wait_all([(fac, http_ready(f"{facilitator_url}/supported"), "serving /supported")], timeout)

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        srv = ManagedProcess(
            "channel_server",
            [
                sys.executable,
                script,
                "server",
                "--port",
                str(port),
                "--facilitator",
                facilitator_url,
                "--asset",
                chain.token_address,
                "--pay-to",
                pay_to.address,
                "--authorizer-key",
                RECEIVER_AUTHORIZER.key,
                "--price",
                str(price),
            ],
            workdir / "channel_server.log",
        )
        procs.append(srv)
        wait_all([(srv, http_ready(f"{url}/free"), "serving /free")], timeout)
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        chain.stop()
        raise
    return ChannelStack(
        workdir=workdir,
        chain=chain,
        token=chain.token_address,
        facilitator_url=facilitator_url,
        server=url,
        price=price,
        payer_key=payer.key,
        pay_to=pay_to.address,
        _procs=procs,
    )


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate()` until true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
