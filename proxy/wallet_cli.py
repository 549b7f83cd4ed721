"""`x402-proxy wallet new|address|balance`: create a key file, show the paying address, read balances.

Output for scripts goes to stdout (the address, one balance per line); hints and errors go to
stderr. Exit codes: 0 success, 1 an RPC could not be read, 2 a usage or configuration problem
(no wallet, no RPC configured, refusing to overwrite a key, unreadable key).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from proxy.config import Config
from proxy.payments.amounts import format_units
from proxy.payments.assets import Asset, AssetRegistry
from proxy.payments.errors import ConfigValueError
from proxy.payments.networks import NetworkRegistry
from proxy.payments.wallet import ERC20_BALANCE_OF_ABI, Wallet, WalletError, create_key_file, load_wallet

DEFAULT_KEY_FILE = "wallet.key"
RPC_TIMEOUT = 10.0

EXIT_OK = 0
EXIT_RPC = 1
EXIT_USAGE = 2


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register `wallet` and its subcommands on the top-level subparsers."""
    wallet = sub.add_parser("wallet", parents=[common], help="the paying wallet")
    wallet_sub = wallet.add_subparsers(dest="wallet_command", required=True)
    new = wallet_sub.add_parser(
        "new", parents=[common], help="create a new key file (0600) and print its address"
    )
    new.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help=f"where to write the key (default <home>/{DEFAULT_KEY_FILE})",
    )
    wallet_sub.add_parser("address", parents=[common], help="print the configured wallet's address")
    wallet_sub.add_parser(
        "balance",
        parents=[common],
        help="print the wallet's token balances on networks that have an [rpc] URL",
    )


def run(
    args: argparse.Namespace,
    config: Config,
    home: Path,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    env = os.environ if env is None else env
    out = out or sys.stdout
    err = err or sys.stderr
    command = args.wallet_command
    if command == "new":
        return _new(args.key_file, home, out, err)
    wallet = _configured_wallet(config, env, err)
    if wallet is None:
        return EXIT_USAGE
    if command == "address":
        print(wallet.address, file=out)
        return EXIT_OK
    return _balance(wallet, config, out, err)


def _new(key_file: Path | None, home: Path, out: TextIO, err: TextIO) -> int:
    from proxy.home import ensure_home

    if key_file is None:
        key_file = ensure_home(home) / DEFAULT_KEY_FILE
    else:
        key_file = key_file.expanduser().resolve()
        if not key_file.parent.is_dir():
            print(f"x402-proxy: directory {key_file.parent} does not exist", file=err)
            return EXIT_USAGE
    try:
        address = create_key_file(key_file)
    except WalletError as exc:
        print(f"x402-proxy: {exc}", file=err)
        return EXIT_USAGE
    print(address, file=out)
    print(
        f'wrote {key_file} (mode 0600). Use it with [wallet] key_file = "{key_file}" '
        f"(or X402_PROXY_WALLET__KEY_FILE={key_file}); fund {address} before paying.",
        file=err,
    )
    return EXIT_OK


def _configured_wallet(config: Config, env: Mapping[str, str], err: TextIO) -> Wallet | None:
    try:
        wallet = load_wallet(config.wallet, env)
    except WalletError as exc:
        print(f"x402-proxy: wallet: {exc}", file=err)
        return None
    if wallet is None:
        print(
            "x402-proxy: no wallet configured; set [wallet] key_file or keystore, or the environment "
            f"variable {config.wallet.key_env} (create a key with `x402-proxy wallet new`)",
            file=err,
        )
    return wallet


@dataclass(frozen=True)
class _Target:
    asset: Asset
    network_label: str
    rpc_url: str


def _targets(config: Config) -> list[_Target]:
    """Known assets (built-in and [[assets]]) on every network that has an [rpc] URL."""
    networks = NetworkRegistry(extra=config.networks)
    assets = AssetRegistry(networks, config.assets)
    urls: dict[str, tuple[str, str]] = {}
    for name, url in config.rpc.items():
        network = networks.lookup(name)
        if network is None:
            raise ConfigValueError("rpc", f"unknown network {name!r} in [rpc]")
        urls[network.caip2] = (network.name, url)
    targets: list[_Target] = []
    for asset in assets.all():
        if asset.network in urls:
            label, url = urls[asset.network]
            targets.append(_Target(asset, label, url))
    # Configured assets first (what the user added on purpose), then by network and symbol.
    targets.sort(key=lambda t: (t.asset.source != "config", t.network_label, t.asset.symbol))
    return targets


def _balance(wallet: Wallet, config: Config, out: TextIO, err: TextIO) -> int:
    try:
        targets = _targets(config)
    except ConfigValueError as exc:
        print(f"x402-proxy: {exc}", file=err)
        return EXIT_USAGE
    if not targets:
        print(
            "x402-proxy: no [rpc] URL for any network with a known asset; add e.g. "
            '[rpc] "eip155:84532" = "https://sepolia.base.org"',
            file=err,
        )
        return EXIT_USAGE
    print(f"wallet {wallet.address}", file=err)
    status = EXIT_OK
    for target in targets:
        asset = target.asset
        try:
            amount = _read_balance(target.rpc_url, asset.address, wallet.address)
        except WalletError as exc:
            print(f"x402-proxy: {target.network_label} {asset.symbol}: {exc}", file=err)
            status = EXIT_RPC
            continue
        if amount is None:
            # A built-in token that does not exist on this chain (e.g. a local fork): nothing to show.
            print(f"{target.network_label} {asset.symbol} {asset.address}: no contract on this RPC", file=err)
            continue
        print(
            f"{target.network_label}\t{format_units(amount, asset.decimals)} {asset.symbol}\t{asset.address}",
            file=out,
        )
    return status


def _read_balance(rpc_url: str, asset: str, owner: str) -> int | None:
    """balanceOf(owner) on `asset`; None when no contract is deployed at `asset` on that chain."""
    from web3 import HTTPProvider, Web3

    w3 = Web3(
        HTTPProvider(rpc_url, request_kwargs={"timeout": RPC_TIMEOUT}, exception_retry_configuration=None)
    )
    try:
        token = Web3.to_checksum_address(asset)
        if not w3.eth.get_code(token):
            return None
        contract = w3.eth.contract(address=token, abi=ERC20_BALANCE_OF_ABI)
        balance = contract.functions.balanceOf(Web3.to_checksum_address(owner)).call()
    except Exception as exc:
        # Name the failure without echoing provider internals (URLs may carry API keys in paths).
        raise WalletError(f"balanceOf via the configured RPC failed: {type(exc).__name__}") from None
    if not isinstance(balance, int) or balance < 0:
        raise WalletError(f"balanceOf returned {balance!r}")
    return int(balance)
