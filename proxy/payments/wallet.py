"""The paying key: loaded from a 0600 key file, an encrypted keystore, or an environment variable.

Rules that protect the key:
- a key file or keystore readable/writable by group or others is refused (we do not fix it: a key
  that was exposed should be rotated, not silently re-protected);
- exactly one source may be configured: two would leave it unclear which wallet pays;
- ``Wallet`` never prints its key, cannot be pickled or copied, and no exception raised here carries
  key material (errors from eth-account are replaced, with their context suppressed).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # eth-account takes ~0.3 s to import: loaded when the key first signs (warm-up)
    from eth_account.signers.local import LocalAccount

DEFAULT_KEY_ENV = "X402_PROXY_PRIVATE_KEY"
DEFAULT_PASSPHRASE_ENV = "X402_PROXY_KEYSTORE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
MAX_SECRET_FILE_BYTES = 64 * 1024

ERC20_BALANCE_OF_ABI: list[dict[str, Any]] = [
    {
        "constant": True,
        "inputs": [{"name": "owner", "type": "address"}],
        "name": "balanceOf",
        "outputs": [{"name": "", "type": "uint256"}],
        "stateMutability": "view",
        "type": "function",
    }
]


class WalletError(Exception):
    """The wallet cannot be loaded or used. Messages name files and modes, never key material."""


@dataclass
class WalletConfig:
    key_file: Path | None = None  # hex private key, mode 0600
    keystore: Path | None = None  # eth-account encrypted JSON keystore
    passphrase_env: str = DEFAULT_PASSPHRASE_ENV  # name of the env var holding the keystore passphrase
    key_env: str = DEFAULT_KEY_ENV  # name of the env var that may hold a hex private key


# The order of secp256k1's group: a private key is an integer in [1, N).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Wallet:
    """An eth-account LocalAccount that keeps its key to itself.

    Built from a raw key (`Wallet.from_key`), it derives its address at once (coincurve and keccak, a few
    ms) and signs EIP-3009 payments and EIP-191 text itself (proxy/payments/evm_sign.py); its eth-account
    LocalAccount (~0.3 s and ~15 MiB to import) is built only when first asked, for Permit2, upto and
    channels.
    """

    __slots__ = ("_account", "_address", "_key", "_lock")

    def __init__(self, account: LocalAccount) -> None:
        self._account: LocalAccount | None = account
        self._address = str(account.address)
        self._key: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_key(cls, key: bytes) -> Wallet:
        wallet = cls.__new__(cls)
        wallet._account = None
        wallet._key = bytes(key)
        wallet._address = checksum_address_of(key)
        wallet._lock = threading.Lock()
        return wallet

    @property
    def address(self) -> str:
        return self._address

    @property
    def account(self) -> LocalAccount:
        """For the signers only. Do not log it."""
        account = self._account
        if account is None:
            with self._lock:  # the warm-up thread and the loop may ask at once
                if self._account is None:
                    from eth_account import Account

                    self._account = Account.from_key(self._key)
                account = self._account
        assert account is not None
        return account

    def sign_message(self, message: bytes) -> bytes:
        """EIP-191 ``personal_sign`` of `message`: 65 bytes r || s || v (v = 27/28), as eth-account's
        ``sign_message(encode_defunct(primitive=message))`` signs it."""
        from proxy.payments.evm_sign import personal_digest, sign_digest

        return sign_digest(self.secret_bytes(), personal_digest(message))

    def sign_text(self, text: str) -> str:
        """``personal_sign`` of UTF-8 `text`, 0x-hex: a SIWX signer (proxy/sessions/credentials.py)."""
        return "0x" + self.sign_message(text.encode("utf-8")).hex()

    def secret_bytes(self) -> bytes:
        """The private key: for signing (proxy/payments/evm_sign.py) and deriving the sessions' at-rest key
        (proxy/store/session_crypto.py); never logged, returned or stored."""
        return self._key if self._key is not None else bytes(self.account.key)

    def __repr__(self) -> str:
        return f"Wallet(address={self.address})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Wallet cannot be pickled or copied")

    def __copy__(self) -> NoReturn:
        raise TypeError("Wallet cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("Wallet cannot be copied")


def load_wallet(cfg: WalletConfig, env: Mapping[str, str]) -> Wallet | None:
    """Load the configured wallet; None when no source is configured (the proxy then never pays)."""
    env_key = env.get(cfg.key_env) if cfg.key_env else None
    sources = [
        name
        for name, present in (
            (f"key_file {cfg.key_file}", cfg.key_file is not None),
            (f"keystore {cfg.keystore}", cfg.keystore is not None),
            (f"environment variable {cfg.key_env}", bool(env_key)),
        )
        if present
    ]
    if len(sources) > 1:
        raise WalletError(f"more than one wallet source configured ({'; '.join(sources)}); keep exactly one")
    if cfg.key_file is not None:
        text = _read_private_file(cfg.key_file).decode("utf-8", errors="replace")
        return Wallet.from_key(_key_from_hex(text, f"key file {cfg.key_file}"))
    if cfg.keystore is not None:
        return Wallet(_account_from_keystore(cfg.keystore, cfg.passphrase_env, env))
    if env_key:
        return Wallet.from_key(_key_from_hex(env_key, f"environment variable {cfg.key_env}"))
    return None


def _read_private_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise WalletError(f"{path} does not exist") from None
    except OSError as exc:
        raise WalletError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # check the file we actually opened, not a path that may change
        if not stat.S_ISREG(info.st_mode):
            raise WalletError(f"{path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise WalletError(
                f"{path} has mode {mode:04o}; it must not be accessible to group or others "
                f"(chmod 600 {path}; if others could read it, move the funds to a new key)"
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise WalletError(f"{path} is owned by uid {info.st_uid}, not by the user running the proxy")
        if info.st_size > MAX_SECRET_FILE_BYTES:
            raise WalletError(f"{path} is {info.st_size} bytes; too large to be a key or keystore")
        chunks = []
        while chunk := os.read(fd, MAX_SECRET_FILE_BYTES + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _key_from_hex(text: str, where: str) -> bytes:
    candidate = text.strip()
    body = candidate[2:] if candidate[:2].lower() == "0x" else candidate
    if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
        raise WalletError(f"{where} does not hold a 32-byte hex private key")
    key = bytes.fromhex(body)
    if not 0 < int.from_bytes(key, "big") < SECP256K1_N:
        raise WalletError(f"{where} does not hold a valid secp256k1 private key")
    return key


def checksum_address_of(key: bytes) -> str:
    """The EIP-55 address of a secp256k1 private key (what eth-account derives, without its import)."""
    from proxy.payments.evm_sign import address_of

    return address_of(key)


def _account_from_keystore(path: Path, passphrase_env: str, env: Mapping[str, str]) -> LocalAccount:
    from eth_account import Account  # a keystore is decrypted at start anyway (scrypt costs more)

    passphrase = env.get(passphrase_env)
    if not passphrase:
        raise WalletError(f"keystore {path} needs its passphrase in environment variable {passphrase_env}")
    raw = _read_private_file(path)
    try:
        document = json.loads(raw)
    except ValueError:
        raise WalletError(f"keystore {path} is not JSON") from None
    try:
        key = Account.decrypt(document, passphrase)
    except ValueError:
        raise WalletError(
            f"keystore {path}: wrong passphrase (from {passphrase_env}) or corrupt file"
        ) from None
    except Exception:
        raise WalletError(f"keystore {path} is not a valid eth-account keystore") from None
    try:
        account: LocalAccount = Account.from_key(key)
    except Exception:
        raise WalletError(f"keystore {path} holds an invalid key") from None
    return account


def create_key_file(path: Path) -> str:
    """Generate a new key into `path` (mode 0600) and return its address. Never overwrites.

    The key is written to a private temporary file, fsynced, then hard-linked into place: link()
    fails if `path` exists, so a funded key can never be replaced, and `path` never holds a
    partially written key.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise WalletError(f"{path} already exists; refusing to overwrite a key")
    from eth_account import Account

    account: LocalAccount = Account.from_key(secrets.token_bytes(32))
    data = ("0x" + bytes(account.key).hex() + "\n").encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise WalletError(f"cannot create {tmp}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise WalletError(f"{path} already exists; refusing to overwrite a key") from None
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return str(account.address)


def encrypt_keystore(wallet: Wallet, passphrase: str, path: Path) -> None:
    """Write `wallet` as an eth-account keystore (scrypt) at `path`, mode 0600, never overwriting."""
    from eth_account import Account

    document = Account.encrypt(wallet.account.key, passphrase)
    data = json.dumps(document).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WalletError(f"{path} already exists; refusing to overwrite a keystore") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


async def token_balance(rpc_url: str, asset: str, owner: str, *, rpc_timeout: float = 5.0) -> int:
    """ERC-20 balanceOf(owner) via JSON-RPC (web3's AsyncWeb3). Raises WalletError on failure."""
    import aiohttp
    from web3 import AsyncHTTPProvider, AsyncWeb3

    # No retries: this is an advisory check on the payment path and must fail fast.
    provider = AsyncHTTPProvider(
        rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=rpc_timeout)},
        exception_retry_configuration=None,
    )
    w3 = AsyncWeb3(provider)
    try:
        contract = w3.eth.contract(address=AsyncWeb3.to_checksum_address(asset), abi=ERC20_BALANCE_OF_ABI)
        balance = await contract.functions.balanceOf(AsyncWeb3.to_checksum_address(owner)).call()
    except Exception as exc:
        raise WalletError(
            f"balanceOf({owner}) on {asset} via {rpc_url} failed: {type(exc).__name__}"
        ) from None
    finally:
        await provider.disconnect()
    if not isinstance(balance, int) or balance < 0:
        raise WalletError(f"balanceOf returned {balance!r}")
    return balance
