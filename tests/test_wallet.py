import copy
import json
import os
import pickle
import stat
import traceback
from pathlib import Path

import pytest
from aiohttp import web
from eth_account import Account

from proxy.payments.wallet import (
    Wallet,
    WalletConfig,
    WalletError,
    create_key_file,
    encrypt_keystore,
    load_wallet,
    token_balance,
)

# Anvil's well-known development key #0 (public knowledge; never funded on a real chain).
DEV_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
DEV_ADDRESS = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def write_key(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def everything_said(exc: BaseException) -> str:
    """All text an exception could show: message, repr, chained causes, formatted traceback."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    return "\n".join(parts)


def test_key_file_0600_loads(tmp_path: Path) -> None:
    path = write_key(tmp_path / "key", DEV_KEY + "\n", 0o600)
    wallet = load_wallet(WalletConfig(key_file=path), {})
    assert wallet is not None and wallet.address == DEV_ADDRESS


def test_key_without_0x_prefix_and_0400_mode(tmp_path: Path) -> None:
    path = write_key(tmp_path / "key", DEV_KEY[2:], 0o400)
    wallet = load_wallet(WalletConfig(key_file=path), {})
    assert wallet is not None and wallet.address == DEV_ADDRESS


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_key_file_readable_by_others_is_refused_naming_file_and_mode(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "key", DEV_KEY, mode)
    with pytest.raises(WalletError) as info:
        load_wallet(WalletConfig(key_file=path), {})
    message = str(info.value)
    assert str(path) in message and f"{mode:04o}" in message
    assert DEV_KEY[2:] not in everything_said(info.value)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(WalletError, match="does not exist"):
        load_wallet(WalletConfig(key_file=tmp_path / "nope"), {})


@pytest.mark.parametrize(
    "content",
    [
        "0x" + "g" * 64,  # not hex
        DEV_KEY[:-2],  # too short
        "0x" + "0" * 64,  # zero is not a valid secp256k1 key
        "0x" + "f" * 64,  # above the curve order
        DEV_KEY + DEV_KEY[2:],  # two keys glued
    ],
)
def test_invalid_key_material_never_appears_in_errors(tmp_path: Path, content: str) -> None:
    path = write_key(tmp_path / "key", content, 0o600)
    with pytest.raises(WalletError) as info:
        load_wallet(WalletConfig(key_file=path), {})
    said = everything_said(info.value)
    assert content not in said and content[2:] not in said
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_env_key_and_ambiguous_sources(tmp_path: Path) -> None:
    wallet = load_wallet(WalletConfig(), {"X402_PROXY_PRIVATE_KEY": DEV_KEY})
    assert wallet is not None and wallet.address == DEV_ADDRESS
    assert load_wallet(WalletConfig(), {}) is None
    path = write_key(tmp_path / "key", DEV_KEY, 0o600)
    with pytest.raises(WalletError, match="more than one wallet source") as info:
        load_wallet(WalletConfig(key_file=path), {"X402_PROXY_PRIVATE_KEY": DEV_KEY})
    assert DEV_KEY[2:] not in everything_said(info.value)


def test_bad_env_key_is_not_echoed() -> None:
    bad = "0x" + "z" * 64
    with pytest.raises(WalletError) as info:
        load_wallet(WalletConfig(), {"X402_PROXY_PRIVATE_KEY": bad})
    assert "z" * 64 not in everything_said(info.value)
    assert "X402_PROXY_PRIVATE_KEY" in str(info.value)


def test_wallet_repr_str_pickle_copy_never_reveal_the_key() -> None:
    wallet = Wallet(Account.from_key(DEV_KEY))
    for text in (repr(wallet), str(wallet), f"{wallet}", f"{wallet!r}"):
        assert DEV_KEY[2:] not in text.lower()
        assert DEV_ADDRESS in text
    with pytest.raises(TypeError):
        pickle.dumps(wallet)
    with pytest.raises(TypeError):
        copy.copy(wallet)
    with pytest.raises(TypeError):
        copy.deepcopy(wallet)
    assert not hasattr(wallet, "__dict__")


def test_keystore_roundtrip_and_wrong_passphrase(tmp_path: Path) -> None:
    wallet = Wallet(Account.from_key(DEV_KEY))
    path = tmp_path / "keystore.json"
    encrypt_keystore(wallet, "correct horse", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DEV_KEY[2:] not in path.read_text()
    cfg = WalletConfig(keystore=path, passphrase_env="PASS")
    loaded = load_wallet(cfg, {"PASS": "correct horse"})
    assert loaded is not None and loaded.address == DEV_ADDRESS
    with pytest.raises(WalletError, match="wrong passphrase") as info:
        load_wallet(cfg, {"PASS": "battery staple"})
    assert "battery staple" not in str(info.value)
    with pytest.raises(WalletError, match="PASS"):
        load_wallet(cfg, {})
    with pytest.raises(WalletError, match="already exists"):
        encrypt_keystore(wallet, "again", path)


def test_keystore_permissions_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "keystore.json"
    path.write_text(json.dumps({"not": "a keystore"}))
    os.chmod(path, 0o644)
    cfg = WalletConfig(keystore=path, passphrase_env="PASS")
    with pytest.raises(WalletError, match="0644"):
        load_wallet(cfg, {"PASS": "x"})
    os.chmod(path, 0o600)
    with pytest.raises(WalletError, match="keystore"):
        load_wallet(cfg, {"PASS": "x"})
    path.write_text("not json")
    with pytest.raises(WalletError, match="not JSON"):
        load_wallet(cfg, {"PASS": "x"})


def test_create_key_file_is_0600_and_never_overwrites(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the key file
    try:
        path = tmp_path / "wallet.key"
        address = create_key_file(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wallet = load_wallet(WalletConfig(key_file=path), {})
    assert wallet is not None and wallet.address == address
    before = path.read_bytes()
    with pytest.raises(WalletError, match="already exists"):
        create_key_file(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["wallet.key"]  # no temp files left behind


async def test_token_balance_reads_balance_of_over_json_rpc() -> None:
    """A tiny JSON-RPC endpoint: checks the eth_call web3 sends and answers a uint256."""
    owner = DEV_ADDRESS
    token = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    seen: list[dict[str, object]] = []

    async def rpc(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        method = body["method"]
        if method == "eth_chainId":
            result = hex(84532)
        elif method == "eth_call":
            call = body["params"][0]
            assert call["to"].lower() == token.lower()
            assert call["data"].startswith("0x70a08231")  # balanceOf(address)
            assert call["data"].lower().endswith(owner[2:].lower())
            result = "0x" + (1_234_567).to_bytes(32, "big").hex()
        else:
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32601, "message": "no"}}
            )
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})

    app = web.Application()
    app.router.add_post("/", rpc)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        assert await token_balance(f"http://127.0.0.1:{port}/", token, owner) == 1_234_567
        assert any(call["method"] == "eth_call" for call in seen)
        with pytest.raises(WalletError, match="failed"):
            await token_balance("http://127.0.0.1:9/", token, owner, rpc_timeout=1.0)
    finally:
        await runner.cleanup()


def test_a_raw_key_gives_eth_accounts_address_without_loading_its_account() -> None:
    """The address of a key-file or env wallet is derived at once (coincurve + keccak), the eth-account
    LocalAccount only when first used: both must name the same account."""
    import secrets as _secrets

    from eth_account import Account as _Account

    from proxy.payments.wallet import SECP256K1_N, Wallet, checksum_address_of

    keys = [_secrets.token_bytes(32) for _ in range(40)] + [
        (1).to_bytes(32, "big"),
        (SECP256K1_N - 1).to_bytes(32, "big"),
    ]
    for key in keys:
        expected = _Account.from_key(key).address
        assert checksum_address_of(key) == expected
        wallet = Wallet.from_key(key)
        assert wallet.address == expected and wallet._account is None  # not derived yet
        assert wallet.account.address == expected and bytes(wallet.account.key) == key
        assert wallet.secret_bytes() == key


@pytest.mark.parametrize(
    "value", ["0" * 64, "f" * 64, "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141"]
)
def test_a_key_outside_the_curve_order_is_refused_at_load(value: str) -> None:
    from proxy.payments.wallet import WalletConfig, WalletError, load_wallet

    with pytest.raises(WalletError, match="not hold a valid secp256k1 private key") as raised:
        load_wallet(WalletConfig(), {"X402_PROXY_PRIVATE_KEY": value})
    assert value not in str(raised.value)
