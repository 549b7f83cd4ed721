"""Local chain for the x402 stack: anvil (chain id 84532) plus the TestUSDC EIP-3009 token.

Chain id 84532 is Base Sepolia's, so both the V1 network name `base-sepolia` and the V2 CAIP-2 id
`eip155:84532` resolve to this local chain in every x402 SDK - without any public RPC.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from web3 import Web3
from web3.contract import Contract

from ._proc import NODE_MODULES, STACK_DIR, ManagedProcess, StackStartupError, free_port, wait_until

CHAIN_ID = 84532
NETWORK_V2 = f"eip155:{CHAIN_ID}"
NETWORK_V1 = "base-sepolia"
TOKEN_NAME = "USDC"
TOKEN_VERSION = "2"
TOKEN_DECIMALS = 6
# Multicall3's canonical address; the x402 facilitator batches diagnostic reads through it.
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"

CONTRACTS_DIR = STACK_DIR / "contracts"


@dataclass(frozen=True)
class DevAccount:
    """One of anvil's well-known dev accounts (default mnemonic "test test ... junk")."""

    index: int
    key: str

    @cached_property
    def address(self) -> str:
        return str(Account.from_key(self.key).address)


# Public, well-known anvil/hardhat dev keys - never used outside the local chain.
ANVIL_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
DEV_ACCOUNTS: tuple[DevAccount, ...] = tuple(DevAccount(i, k) for i, k in enumerate(ANVIL_KEYS))

# Distinct roles so balances never mix: the facilitator pays gas, the payer pays tokens.
DEPLOYER = DEV_ACCOUNTS[0]
FACILITATOR = DEV_ACCOUNTS[1]
PAYER = DEV_ACCOUNTS[2]
PAY_TO = DEV_ACCOUNTS[3]
# Spare accounts for tests that need a second wallet or a second merchant.
PAYER_2 = DEV_ACCOUNTS[4]
PAY_TO_2 = DEV_ACCOUNTS[5]


def load_artifact(name: str) -> dict[str, Any]:
    """Compiled contract JSON written by contracts/build.mjs (committed, so no compiler at test time)."""
    data: dict[str, Any] = json.loads((CONTRACTS_DIR / f"{name}.json").read_text())
    return data


def anvil_binary() -> list[str]:
    """The native anvil binary from the npm platform package (skips the node wrapper's startup)."""
    for native in sorted((NODE_MODULES / "@foundry-rs").glob("anvil-*/bin/anvil")):
        if native.is_file():
            return [str(native)]
    wrapper = NODE_MODULES / ".bin" / "anvil"
    if wrapper.exists():
        return [str(wrapper)]
    raise StackStartupError(
        f"anvil not found under {NODE_MODULES}; run `cd tests/stack && npm ci` (or `make npm`)"
    )


class Chain:
    """A running anvil node with TestUSDC deployed (see `start_chain`)."""

    def __init__(self, proc: ManagedProcess, rpc_url: str) -> None:
        self.proc = proc
        self.rpc_url = rpc_url
        self.chain_id = CHAIN_ID
        self.w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
        self._token: Contract | None = None
        # Deployer transactions share one nonce sequence; tests may mint from several threads.
        self._tx_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 15.0) -> None:
        def probe() -> bool:
            r = httpx.post(
                self.rpc_url,
                json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                timeout=1.0,
                trust_env=False,
            )
            return int(r.json()["result"], 16) == CHAIN_ID

        wait_until(self.proc, probe, timeout=timeout, what="answering JSON-RPC")

    def stop(self) -> None:
        self.proc.stop()

    # -- contracts -----------------------------------------------------------------------------

    def deploy_token(self) -> str:
        """Deploy TestUSDC from DEPLOYER and return its checksummed address."""
        art = load_artifact("TestUSDC")
        factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        with self._tx_lock:
            tx = factory.constructor().transact({"from": DEPLOYER.address})
            receipt = self.w3.eth.wait_for_transaction_receipt(tx, timeout=30, poll_latency=0.05)
        if receipt["status"] != 1:
            raise StackStartupError(f"TestUSDC deployment failed: {receipt}")
        address = str(receipt["contractAddress"])
        self._token = self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=art["abi"])
        return address

    def install_multicall(self) -> None:
        """Put a Multicall3-compatible contract at the canonical address (anvil has none)."""
        code = load_artifact("LocalMulticall")["deployedBytecode"]
        self.rpc("anvil_setCode", [MULTICALL3_ADDRESS, code])

    @property
    def token(self) -> Contract:
        if self._token is None:
            raise RuntimeError("token not deployed yet")
        return self._token

    @property
    def token_address(self) -> str:
        return str(self.token.address)

    # -- token helpers -------------------------------------------------------------------------

    def mint(self, address: str, amount: int) -> str:
        """Mint `amount` atomic units (6 decimals) to `address`; returns the tx hash."""
        with self._tx_lock:
            tx = self.token.functions.mint(Web3.to_checksum_address(address), int(amount)).transact(
                {"from": DEPLOYER.address}
            )
            receipt = self.w3.eth.wait_for_transaction_receipt(tx, timeout=30, poll_latency=0.05)
        if receipt["status"] != 1:
            raise RuntimeError(f"mint failed: {receipt}")
        return "0x" + bytes(tx).hex()

    def balance_of(self, address: str) -> int:
        return int(self.token.functions.balanceOf(Web3.to_checksum_address(address)).call())

    def authorization_state(self, authorizer: str, nonce: str | bytes) -> bool:
        """Whether an EIP-3009 nonce has been used (or cancelled) on-chain."""
        raw = bytes.fromhex(nonce.removeprefix("0x")) if isinstance(nonce, str) else nonce
        return bool(self.token.functions.authorizationState(Web3.to_checksum_address(authorizer), raw).call())

    def eth_balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))

    # -- raw RPC and time ----------------------------------------------------------------------

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        r = httpx.post(
            self.rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []},
            timeout=30.0,
            trust_env=False,
        )
        r.raise_for_status()
        body = r.json()
        if "error" in body:
            raise RuntimeError(f"{method}: {body['error']}")
        return body.get("result")

    def latest_timestamp(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def set_next_block_timestamp(self, timestamp: int) -> None:
        """Fix the next block's timestamp (must be > the latest block's)."""
        self.rpc("evm_setNextBlockTimestamp", [int(timestamp)])

    def increase_time(self, seconds: int) -> None:
        """Shift chain time forward for all following blocks.

        The facilitator checks validBefore against wall-clock time, the token against block time:
        moving chain time lets a test make an authorization expire on-chain only.
        """
        self.rpc("evm_increaseTime", [int(seconds)])

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", [hex(blocks)])

    def set_automine(self, enabled: bool) -> None:
        """Turn automine off to keep settlement transactions pending (e.g. to test timeouts)."""
        self.rpc("evm_setAutomine", [enabled])

    def snapshot(self) -> str:
        return str(self.rpc("evm_snapshot"))

    def revert(self, snapshot_id: str) -> bool:
        return bool(self.rpc("evm_revert", [snapshot_id]))


def spawn_anvil(workdir: Path, port: int | None = None) -> Chain:
    """Start anvil (not yet waited for); the caller runs `wait_ready()`."""
    port = port or free_port()
    argv = [
        *anvil_binary(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chain-id",
        str(CHAIN_ID),
        "--quiet",
    ]
    proc = ManagedProcess("anvil", argv, workdir / "anvil.log")
    return Chain(proc, f"http://127.0.0.1:{port}")


def start_chain(workdir: Path, port: int | None = None) -> Chain:
    """Start anvil, deploy TestUSDC and the Multicall3 stand-in; returns a ready Chain."""
    chain = spawn_anvil(workdir, port)
    try:
        chain.wait_ready()
        chain.install_multicall()
        chain.deploy_token()
    except BaseException:
        chain.stop()
        raise
    return chain
