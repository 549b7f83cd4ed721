"""secp256k1 signatures the paid path makes, on coincurve (libsecp256k1) and keccak-256 (safe-pysha3).

Why not eth-account here: its typed-data encoder is general (any EIP-712 struct, through eth-abi) and
costs ~0.5 ms a signature and ~15 MiB of imports (with the x402 SDK's EVM package and web3 behind it,
~25 MiB), on every paid request and in every idle proxy. The paid path signs two fixed layouts only:

* the EIP-3009 ``TransferWithAuthorization`` struct (x402 ``exact`` on a token with EIP-3009), whose
  EIP-712 digest is six 32-byte words under a domain of four;
* EIP-191 ``personal_sign`` text (session tokens, SIWX sign-in messages).

The libraries do the cryptography (keccak-256, RFC 6979 deterministic ECDSA with low-s); this module
lays out the bytes. Keccak comes from safe-pysha3 (eth-hash's own `pysha3` backend): one C call per
hash, ~1.5 us against ~8 us through pycryptodome's object per hash (a channel voucher hashes twice).
``tests/test_evm_sign.py`` pins every output to eth-account's, signature for
signature (both are deterministic), and the end-to-end suites have them verified on chain by the
reference facilitators. Anything else (Permit2, upto, keystores) still goes through eth-account and the SDK.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from coincurve import PrivateKey
from sha3 import keccak_256  # type: ignore[import-untyped]  # safe-pysha3 ships no type hints

WORD: Final = 32


def keccak256(data: bytes) -> bytes:
    digest: bytes = keccak_256(data).digest()
    return digest


DOMAIN_TYPE_HASH: Final = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_TYPE_HASH: Final = keccak256(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


def checksum_address(address: str) -> str:
    """EIP-55 mixed-case form of a 0x-prefixed 20-byte hex address."""
    plain = address.removeprefix("0x").removeprefix("0X").lower()
    if len(plain) != 40:
        raise ValueError(f"{address!r} is not a 20-byte address")
    bytes.fromhex(plain)  # ValueError if not hex
    mask = keccak256(plain.encode("ascii")).hex()
    return "0x" + "".join(c.upper() if int(m, 16) >= 8 else c for c, m in zip(plain, mask[:40], strict=True))


def address_of(secret: bytes) -> str:
    """The EIP-55 address of a secp256k1 private key (what eth-account derives)."""
    public = PrivateKey(secret).public_key.format(compressed=False)[1:]
    return checksum_address("0x" + keccak256(public)[-20:].hex())


def _uint(value: int) -> bytes:
    if not 0 <= value < 1 << 256:
        raise ValueError(f"{value} does not fit a uint256")
    return value.to_bytes(WORD, "big")


def _address(value: str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x").removeprefix("0X"))
    if len(raw) != 20:
        raise ValueError(f"{value!r} is not a 20-byte address")
    return raw.rjust(WORD, b"\0")


def _bytes32(value: str) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x"))
    if len(raw) != WORD:
        raise ValueError(f"{value!r} is not 32 bytes")
    return raw


def eip3009_digest(
    *,
    token_name: str,
    token_version: str,
    chain_id: int,
    token: str,
    sender: str,
    to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: str,
) -> bytes:
    """The EIP-712 digest of ``TransferWithAuthorization`` on the token's domain (what the token's
    ``transferWithAuthorization`` recovers the signer from)."""
    domain = keccak256(
        DOMAIN_TYPE_HASH
        + keccak256(token_name.encode("utf-8"))
        + keccak256(token_version.encode("utf-8"))
        + _uint(chain_id)
        + _address(token)
    )
    struct = keccak256(
        TRANSFER_TYPE_HASH
        + _address(sender)
        + _address(to)
        + _uint(value)
        + _uint(valid_after)
        + _uint(valid_before)
        + _bytes32(nonce)
    )
    return keccak256(b"\x19\x01" + domain + struct)


def personal_digest(message: bytes) -> bytes:
    """EIP-191 version 0x45 (``personal_sign``): what eth-account's ``encode_defunct`` hashes."""
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode("ascii") + message)


@lru_cache(maxsize=4)
def _private_key(secret: bytes) -> PrivateKey:
    """Built once per wallet key: coincurve derives the public key (~0.1 ms, more than a signature)
    when a PrivateKey is made. A few entries: a reloaded wallet's old key ages out."""
    return PrivateKey(secret)


def sign_digest(secret: bytes, digest: bytes) -> bytes:
    """65 bytes r || s || v with v = 27 or 28, as Ethereum wallets and eth-account sign."""
    if len(digest) != WORD:
        raise ValueError("a digest is 32 bytes")
    signature = _private_key(secret).sign_recoverable(digest, hasher=None)
    return signature[:64] + bytes([signature[64] + 27])


def sign_text(secret: bytes, text: str) -> str:
    """``personal_sign`` of UTF-8 text, 0x-hex (65 bytes)."""
    return "0x" + sign_digest(secret, personal_digest(text.encode("utf-8"))).hex()
