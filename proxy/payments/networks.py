"""EVM networks we know: V1 names <-> CAIP-2 ids, chain ids, and whether real money moves there.

The testnet flag gates mainnet spending in the policy, so this table is owned here explicitly
rather than derived from the SDK at import time (a new SDK must not silently widen what we pay on).
Networks not listed can be added from config (``NetworkConfig``), e.g. a local anvil chain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from proxy.payments.errors import ConfigValueError

CAIP2_PATTERN = re.compile(r"^[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}$")
EIP155_PATTERN = re.compile(r"^eip155:([1-9][0-9]{0,19})$")


@dataclass(frozen=True)
class Network:
    caip2: str
    chain_id: int
    testnet: bool
    v1_name: str | None = None
    label: str = ""

    @property
    def name(self) -> str:
        """The friendliest identifier for messages."""
        return self.v1_name or self.caip2


@dataclass
class NetworkConfig:
    """A network supplied by config (e.g. a local chain). `caip2` like ``eip155:31337``."""

    caip2: str
    testnet: bool
    v1_name: str | None = None
    label: str = ""

    def validate(self) -> None:
        if EIP155_PATTERN.match(self.caip2) is None:
            raise ConfigValueError(
                "caip2", f"must be an eip155 CAIP-2 id like 'eip155:31337', got {self.caip2!r}"
            )

    def to_network(self) -> Network:
        self.validate()
        match = EIP155_PATTERN.match(self.caip2)
        assert match is not None
        return Network(self.caip2, int(match.group(1)), self.testnet, self.v1_name or None, self.label)


def _net(v1: str | None, chain_id: int, testnet: bool, label: str) -> Network:
    return Network(f"eip155:{chain_id}", chain_id, testnet, v1, label)


BUILTIN_NETWORKS: tuple[Network, ...] = (
    _net("base", 8453, False, "Base"),
    _net("base-sepolia", 84532, True, "Base Sepolia"),
    _net("ethereum", 1, False, "Ethereum"),
    _net("polygon", 137, False, "Polygon PoS"),
    _net("polygon-amoy", 80002, True, "Polygon Amoy"),
    _net("avalanche", 43114, False, "Avalanche C-Chain"),
    _net("avalanche-fuji", 43113, True, "Avalanche Fuji"),
    _net("abstract", 2741, False, "Abstract"),
    _net("abstract-testnet", 11124, True, "Abstract Testnet"),
    _net("iotex", 4689, False, "IoTeX"),
    _net("sei", 1329, False, "Sei"),
    _net("sei-testnet", 1328, True, "Sei Testnet"),
    _net("peaq", 3338, False, "peaq"),
    _net("story", 1513, False, "Story"),
    _net("educhain", 656476, False, "EDU Chain"),
    _net("skale-base-sepolia", 1444673419, True, "SKALE Base Sepolia"),
    _net("megaeth", 4326, False, "MegaETH"),
    _net("monad", 143, False, "Monad"),
    _net("monad-testnet", 10143, True, "Monad Testnet"),
    _net("stable", 988, False, "Stable"),
    _net("stable-testnet", 2201, True, "Stable Testnet"),
    _net("celo", 42220, False, "Celo"),
    _net("flare", 14, False, "Flare"),
    _net(None, 42161, False, "Arbitrum One"),
    _net(None, 421614, True, "Arbitrum Sepolia"),
    _net(None, 10, False, "OP Mainnet"),
    _net(None, 11155420, True, "OP Sepolia"),
    _net(None, 11155111, True, "Ethereum Sepolia"),
    _net(None, 11142220, True, "Celo Sepolia"),
)


class NetworkRegistry:
    """Lookup by V1 name or CAIP-2 id (case-insensitive)."""

    def __init__(self, networks: Iterable[Network] = BUILTIN_NETWORKS, extra: Iterable[NetworkConfig] = ()):
        self._by_key: dict[str, Network] = {}
        for network in networks:
            self._add(network)
        for config in extra:
            # Config may redefine a builtin id (e.g. mark a fork as testnet); it then wins.
            self._add(config.to_network())

    def _add(self, network: Network) -> None:
        self._by_key[network.caip2.lower()] = network
        if network.v1_name:
            self._by_key[network.v1_name.lower()] = network

    def lookup(self, name: str) -> Network | None:
        return self._by_key.get(name.strip().lower())

    def __iter__(self) -> Iterator[Network]:
        seen: set[str] = set()
        for network in self._by_key.values():
            if network.caip2 not in seen:
                seen.add(network.caip2)
                yield network


def to_caip2(name: str, registry: NetworkRegistry) -> str:
    """Normalize a V1 name or CAIP-2 id; unknown names come back unchanged (policy will refuse them)."""
    network = registry.lookup(name)
    if network is not None:
        return network.caip2
    return name.strip()
