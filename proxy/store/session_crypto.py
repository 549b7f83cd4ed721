"""Sessions' secrets at rest in a shared database: AES-256-GCM with a key derived from the wallet's key.

A session row holds what the proxy replays to the server (cookies, lease headers, the signed token, the
SIWX statement). In the SQLite file those sit in a 0600 file in a 0700 home. In PostgreSQL they sit on
a server other people administer and back up, so the whole session document is sealed before it leaves
the replica: AES-256-GCM, a fresh 96-bit nonce per write, the session id as associated data (a sealed
document copied onto another row does not open). The key is HKDF-SHA256 of the wallet's private key
with a fixed label: every replica of a fleet pays from one wallet, so every replica derives the same
key and no extra secret has to be distributed, and a database dump without the wallet opens nothing.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.store.base import StoreError

SEALED_PREFIX = "x402-sealed-v1:"
_INFO = b"x402-proxy session documents v1"
_NONCE_BYTES = 12


class SessionCipher:
    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SessionCipher(<key>)"

    @classmethod
    def from_secret(cls, secret: bytes) -> SessionCipher:
        if len(secret) < 16:
            raise ValueError("the session key's secret is too short")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)
        return cls(key)

    def seal(self, session_id: str, document: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, document.encode("utf-8"), session_id.encode("utf-8"))
        return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, session_id: str, stored: str) -> str:
        if not stored.startswith(SEALED_PREFIX):
            return stored  # written without a key
        raw = base64.b64decode(stored[len(SEALED_PREFIX) :])
        try:
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], session_id.encode("utf-8"))
        except InvalidTag:
            raise StoreError(
                f"session {session_id} cannot be opened with this wallet's key (written by another wallet?)",
                "corrupt",
            ) from None
        return plain.decode("utf-8")


def open_document(cipher: SessionCipher | None, session_id: str, stored: str) -> str:
    if stored.startswith(SEALED_PREFIX):
        if cipher is None:
            raise StoreError(f"session {session_id} is sealed and this replica has no wallet key", "corrupt")
        return cipher.open(session_id, stored)
    return stored
