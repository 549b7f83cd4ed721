"""Tokens we can price: known USDC deployments plus assets supplied by config.

Knowing an asset gives us its decimals (needed to compare an amount with the budget) and a
fallback EIP-712 domain. The domain in the server's ``extra`` always wins when present: the same
token is named "USD Coin" on Base and "USDC" on Base Sepolia, and a wrong name signs fine but
fails at settlement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.payments.amounts import MAX_ASSET_DECIMALS
from proxy.payments.errors import ConfigValueError
from proxy.payments.networks import NetworkRegistry

EVM_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def is_evm_address(text: str) -> bool:
    return EVM_ADDRESS.fullmatch(text) is not None  # `$` alone would accept a trailing newline


def same_address(a: str, b: str) -> bool:
    """EVM addresses compare case-insensitively (EIP-55 case is only a checksum)."""
    return a.lower() == b.lower()


@dataclass(frozen=True)
class Asset:
    network: str  # CAIP-2
    address: str
    decimals: int
    symbol: str
    eip712_name: str | None = None
    eip712_version: str | None = None
    source: str = "builtin"  # "builtin" | "config"


@dataclass
class AssetConfig:
    """A token supplied by config. `network` may be a V1 name or CAIP-2 id."""

    network: str
    address: str
    decimals: int
    symbol: str
    eip712_name: str | None = None
    eip712_version: str | None = None

    def validate(self) -> None:
        if not is_evm_address(self.address):
            raise ConfigValueError(
                "address", f"must be a 0x-prefixed 40-hex-digit address, got {self.address!r}"
            )
        if not 0 <= self.decimals <= MAX_ASSET_DECIMALS:
            # Budgets are kept in 18-decimal units; more decimals could not be converted exactly.
            raise ConfigValueError("decimals", f"must be 0..{MAX_ASSET_DECIMALS}, got {self.decimals}")
        if not self.symbol or len(self.symbol) > 32:
            raise ConfigValueError("symbol", "must be 1..32 characters")


def _usdc(chain_id: int, address: str, name: str, version: str = "2") -> Asset:
    return Asset(f"eip155:{chain_id}", address, 6, "USDC", name, version)


# Addresses and EIP-712 domains as published by Circle and shipped in the x402 SDKs
# (Python x402 2.25 DEFAULT_ASSETS; x402 1.x TypeScript config for Amoy and Fuji).
BUILTIN_ASSETS: tuple[Asset, ...] = (
    _usdc(8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),
    _usdc(84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),
    _usdc(1, "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48", "USD Coin"),
    _usdc(137, "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin"),
    _usdc(80002, "0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582", "USDC"),
    _usdc(43114, "0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E", "USD Coin"),
    _usdc(43113, "0x5425890298aed601595a70AB815c96711a31Bc65", "USD Coin"),
    _usdc(42161, "0xaf88d065e77c8cC2239327C5EDb3A432268e5831", "USD Coin"),
    _usdc(421614, "0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d", "USD Coin"),
    _usdc(1329, "0xe15fC38F6D8c56aF07bbCBe3BAf5708A2Bf42392", "USDC"),
    _usdc(1328, "0x4fCF1784B31630811181f670Aea7A7bEF803eaED", "USDC"),
    _usdc(143, "0x754704Bc059F8C67012fEd69BC8A327a5aafb603", "USDC"),
    _usdc(10143, "0x534b2f3A21130d7a60830c2Df862319e593943A3", "USDC"),
    _usdc(42220, "0xcebA9300f2b948710d2653dD7B07f33A8B32118C", "USDC"),
    _usdc(11142220, "0x01C5C0122039549AD1493B8220cABEdD739BC44E", "USDC"),
)


class AssetRegistry:
    """(network, address) -> Asset, addresses compared case-insensitively."""

    def __init__(
        self,
        networks: NetworkRegistry,
        configured: Iterable[AssetConfig] = (),
        builtin: Iterable[Asset] = BUILTIN_ASSETS,
    ) -> None:
        self.networks = networks
        self._assets: dict[tuple[str, str], Asset] = {}
        for asset in builtin:
            self._assets[(asset.network, asset.address.lower())] = asset
        for config in configured:
            config.validate()
            network = networks.lookup(config.network)
            if network is None:
                raise ConfigValueError(
                    "network", f"unknown network {config.network!r}; add it under networks first"
                )
            asset = Asset(
                network.caip2,
                config.address,
                config.decimals,
                config.symbol,
                config.eip712_name,
                config.eip712_version,
                source="config",
            )
            # Config wins over a builtin entry for the same address (e.g. a corrected EIP-712 name).
            self._assets[(asset.network, asset.address.lower())] = asset

    def find(self, network_caip2: str, address: str) -> Asset | None:
        return self._assets.get((network_caip2, address.lower()))

    def all(self) -> tuple[Asset, ...]:
        return tuple(self._assets.values())
