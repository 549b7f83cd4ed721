"""`x402-proxy wallet new|address|balance`, run as a user would (a subprocess), against the local chain."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from eth_account import Account

from tests.stack import Stack
from tests.stack._proc import free_port
from tests.support.paying_proxy import stack_config
from tests.support.proxy_process import ProxyProcess

KEY_ENV = "X402_PROXY_PRIVATE_KEY"


def cli(home: Path, config: str = "", env: dict[str, str] | None = None) -> ProxyProcess:
    """A ProxyProcess used only for its `cli()`: same home/config/env plumbing as the proxy itself."""
    process = ProxyProcess(home, config, env)
    if env is None or KEY_ENV not in env:
        process.env.pop(KEY_ENV, None)
    return process


def key_file_address(path: Path) -> str:
    return str(Account.from_key(path.read_text().strip()).address)


def test_new_writes_private_key_file_and_never_overwrites(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tool = cli(home)
    result = tool.cli("wallet", "new")
    address = result.stdout.strip()
    key_file = home / "wallet.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert address == key_file_address(key_file)
    assert address.startswith("0x") and len(address) == 42
    assert str(key_file) in result.stderr  # tells the user how to use it
    body = key_file.read_text().strip().removeprefix("0x")
    assert body.lower() not in (result.stdout + result.stderr).lower()  # the key itself is never printed

    content = key_file.read_bytes()
    again = tool.cli("wallet", "new", check=False)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
    assert again.stdout == ""
    assert key_file.read_bytes() == content
    assert [p.name for p in home.iterdir() if p.name.startswith(".wallet.key")] == []  # no temp leftovers


def test_new_at_a_given_path_then_address_from_config(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "agent.key"
    key_file.parent.mkdir()
    created = cli(tmp_path / "home").cli("wallet", "new", "--key-file", str(key_file))
    address = created.stdout.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (tmp_path / "home" / "wallet.key").exists()

    configured = cli(tmp_path / "home2", f'[wallet]\nkey_file = "{key_file}"\n')
    shown = configured.cli("wallet", "address")
    assert shown.stdout.strip() == address

    missing_dir = cli(tmp_path / "home3").cli("wallet", "new", "--key-file", str(tmp_path / "nope" / "k"), check=False)
    assert missing_dir.returncode == 2 and "does not exist" in missing_dir.stderr


def test_address_from_environment(tmp_path: Path) -> None:
    account = Account.create()
    key = "0x" + bytes(account.key).hex()
    result = cli(tmp_path / "home", env={KEY_ENV: key}).cli("wallet", "address")
    assert result.stdout.strip() == account.address
    assert key[2:] not in result.stdout + result.stderr


def test_address_without_wallet_is_a_clear_error(tmp_path: Path) -> None:
    result = cli(tmp_path / "home").cli("wallet", "address", check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no wallet configured" in result.stderr
    assert "wallet new" in result.stderr


def test_address_with_unsafe_key_file_mode(tmp_path: Path) -> None:
    key_file = tmp_path / "loose.key"
    key_file.write_text("0x" + bytes(Account.create().key).hex() + "\n")
    os.chmod(key_file, 0o644)
    result = cli(tmp_path / "home", f'[wallet]\nkey_file = "{key_file}"\n').cli("wallet", "address", check=False)
    assert result.returncode == 2
    assert "0644" in result.stderr and "chmod 600" in result.stderr
    assert result.stdout == ""


def test_balance_of_funded_payer_equals_chain(x402_stack: Stack, tmp_path: Path) -> None:
    tool = cli(tmp_path / "home", stack_config(x402_stack), {KEY_ENV: x402_stack.payer_key})
    result = tool.cli("wallet", "balance")
    on_chain = x402_stack.balance_of(x402_stack.payer_address)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    mine = [line for line in lines if line[2].lower() == x402_stack.token.lower()]
    assert len(mine) == 1, result.stdout + result.stderr
    network, amount, _ = mine[0]
    assert network == "base-sepolia"
    value, symbol = amount.split(" ")
    assert symbol == "TUSDC"
    whole, _, fraction = value.partition(".")
    assert int(whole) * 10**6 + int(fraction.ljust(6, "0") or 0) == on_chain
    assert x402_stack.payer_address in result.stderr
    # The built-in Base Sepolia USDC does not exist on the local chain: noted, not an error.
    assert "no contract on this RPC" in result.stderr


def test_balance_of_new_wallet_is_zero(x402_stack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    address = cli(home).cli("wallet", "new").stdout.strip()
    config = stack_config(x402_stack, extra=f'[wallet]\nkey_file = "{home / "wallet.key"}"\n')
    result = cli(home, config).cli("wallet", "balance")
    assert f"0 TUSDC\t{x402_stack.token}" in result.stdout
    x402_stack.mint(address, 1_234_500)
    result = cli(home, config).cli("wallet", "balance")
    assert f"1.2345 TUSDC\t{x402_stack.token}" in result.stdout


def test_balance_errors(x402_stack: Stack, tmp_path: Path) -> None:
    env = {KEY_ENV: x402_stack.payer_key}
    no_rpc = cli(tmp_path / "a", "", env).cli("wallet", "balance", check=False)
    assert no_rpc.returncode == 2 and "[rpc]" in no_rpc.stderr

    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = stack_config(x402_stack).replace(x402_stack.rpc_url, dead)
    failed = cli(tmp_path / "b", unreachable, env).cli("wallet", "balance", check=False)
    assert failed.returncode == 1
    assert "balanceOf" in failed.stderr
    assert failed.stdout == ""

    no_wallet = cli(tmp_path / "c", stack_config(x402_stack)).cli("wallet", "balance", check=False)
    assert no_wallet.returncode == 2 and "no wallet configured" in no_wallet.stderr
