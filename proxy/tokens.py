"""Signed session tokens, in the seed tools' wire format, binding what was paid and where.

    X-Session-Token:  base64url(canonical JSON claim) "." 0x<65-byte signature, hex>
    X-Session-Wallet: <signer address>
    PAYMENT-SESSION:  <session id>

The signature is EIP-191 ``personal_sign`` (eth-account ``encode_defunct``) over the claim's
canonical JSON bytes - exactly the bytes the first part decodes to, so a verifier never
re-serialises anything. Canonical JSON: keys sorted, no whitespace, UTF-8 (no ``\\u`` escapes for
non-ASCII), integers for times. base64url is unpadded (RFC 7515 style).

No server knows these headers unless it chose to; ``docs/sessions.md`` tells API providers how to
verify them. Verification rejects, with ``InvalidSessionToken.reason``:

    malformed          not two parts, bad base64url/JSON, non-canonical bytes, wrong fields/types
    unsupported        unknown claim version
    bad_signature      signature does not parse, or does not recover to the claim's address
                       (a tampered claim, or a claim signed by another key, lands here)
    wrong_signer       the token is validly signed, but by another wallet than the expected one
    session_mismatch   claim session id != the PAYMENT-SESSION the caller expected
    not_yet_valid      now < issued_at - leeway
    expired            now >= expires_at + leeway
    out_of_scope       the request URL is not covered by the claim's scope
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from proxy.payments.wallet import Wallet
from proxy.sessions.model import Session
from proxy.sessions.scope import Scope, ScopeError, ScopeKind, normalize_url

if TYPE_CHECKING:  # eth-account loads when a token is first signed or verified (after the start)
    from eth_account.signers.local import LocalAccount

TOKEN_VERSION = 1
HEADER_TOKEN = "X-Session-Token"  # noqa: S105 (a header name)
HEADER_WALLET = "X-Session-Wallet"
HEADER_SESSION = "PAYMENT-SESSION"
MAX_TOKEN_LENGTH = 8192
# Clock skew tolerated on both ends of the validity window. Proxy and provider clocks are
# independent; 30 s is what JWT libraries commonly allow and is small next to the 60 s min TTL.
DEFAULT_LEEWAY_SECONDS = 30.0

Reason = Literal[
    "malformed",
    "unsupported",
    "bad_signature",
    "wrong_signer",
    "session_mismatch",
    "not_yet_valid",
    "expired",
    "out_of_scope",
]

_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SIG_RE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
_AMOUNT_RE = re.compile(r"^(0|[1-9][0-9]{0,77})$")
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class InvalidSessionToken(ValueError):
    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SessionClaim:
    """What the token asserts. JSON keys are the field names."""

    session_id: str
    address: str  # the wallet that paid and signs (0x, 40 hex)
    origin: str  # RFC 6454 serialisation, e.g. "https://api.x.com" (default port omitted)
    scope: ScopeKind
    path: str  # normalised scope path
    query: str | None  # exact scopes only
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds
    tx_hash: str | None  # settlement transaction, None if the server did not report one
    amount: str  # atomic units, decimal string
    asset: str
    network: str  # CAIP-2 (V2) or V1 network name, as in the payment
    pay_to: str | None  # recipient of the payment
    version: int = TOKEN_VERSION

    @classmethod
    def for_session(cls, session: Session, *, address: str, tx_hash: str | None) -> SessionClaim:
        scope = session.scope
        return cls(
            session_id=session.id,
            address=address,
            origin=scope.origin_str,
            scope=scope.kind,
            path=scope.path,
            query=scope.query,
            issued_at=int(session.created_at),
            expires_at=int(session.expires_at),
            tx_hash=tx_hash,
            amount=str(session.amount_paid),
            asset=session.asset or "",
            network=session.network or "",
            pay_to=session.pay_to,
        )

    def to_scope(self) -> Scope:
        query = f"?{self.query}" if self.query is not None else ""
        return Scope.from_url(f"{self.origin}{self.path}{query}", self.scope)

    def canonical_json(self) -> bytes:
        return canonical_json(asdict(self))


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidSessionToken("malformed", "claim is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSessionToken("malformed", "claim is not base64url") from None


def make_session_token(claim: SessionClaim, account: LocalAccount | Wallet) -> str:
    """Sign ``claim`` with the paying wallet (a `Wallet` signs it itself; an eth-account account, as
    tests and benches hold one, through eth-account). The claim's address must be the account's."""
    if claim.address.lower() != str(account.address).lower():
        raise ValueError("claim address is not the signing account's address")
    _check_claim(claim)
    payload = claim.canonical_json()
    if isinstance(account, Wallet):
        return f"{_b64url_encode(payload)}.0x{account.sign_message(payload).hex()}"
    from eth_account.messages import encode_defunct

    signed = account.sign_message(encode_defunct(primitive=payload))
    return f"{_b64url_encode(payload)}.0x{bytes(signed.signature).hex()}"


def session_token_headers(token: str, wallet: str, session_id: str) -> dict[str, str]:
    return {HEADER_TOKEN: token, HEADER_WALLET: wallet, HEADER_SESSION: session_id}


def decode_session_token(token: str) -> tuple[SessionClaim, bytes, str]:
    """Parse without verifying: (claim, signed bytes, signature). Raises ``InvalidSessionToken``."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidSessionToken("malformed", "token missing or too long")
    parts = token.split(".")
    if len(parts) != 2:
        raise InvalidSessionToken("malformed", "expected <claim>.<signature>")
    payload = _b64url_decode(parts[0])
    signature = parts[1]
    if not _SIG_RE.fullmatch(signature):
        raise InvalidSessionToken("bad_signature", "signature is not 0x + 65 bytes hex")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidSessionToken("malformed", "claim is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise InvalidSessionToken("malformed", "claim is not a JSON object")
    if data.get("version") != TOKEN_VERSION:
        raise InvalidSessionToken("unsupported", f"claim version {data.get('version')!r}")
    claim = _claim_from_dict(data)
    # One byte string per claim: anything but our own serialisation is refused, so two different
    # encodings of "the same" claim can never both carry a valid signature.
    if claim.canonical_json() != payload:
        raise InvalidSessionToken("malformed", "claim is not canonical JSON")
    return claim, payload, signature


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "session_id": (str,),
    "address": (str,),
    "origin": (str,),
    "scope": (str,),
    "path": (str,),
    "query": (str, type(None)),
    "issued_at": (int,),
    "expires_at": (int,),
    "tx_hash": (str, type(None)),
    "amount": (str,),
    "asset": (str,),
    "network": (str,),
    "pay_to": (str, type(None)),
    "version": (int,),
}


def _claim_from_dict(data: dict[str, Any]) -> SessionClaim:
    if set(data) != set(_FIELD_TYPES):
        raise InvalidSessionToken("malformed", "claim fields differ from version 1")
    for name, types in _FIELD_TYPES.items():
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InvalidSessionToken("malformed", f"claim field {name} has the wrong type")
    claim = SessionClaim(**data)
    _check_claim(claim)
    return claim


def _check_claim(claim: SessionClaim) -> None:
    if not _SESSION_ID_RE.fullmatch(claim.session_id):
        raise InvalidSessionToken("malformed", "bad session id")
    if not _ADDRESS_RE.fullmatch(claim.address):
        raise InvalidSessionToken("malformed", "bad address")
    if not _AMOUNT_RE.fullmatch(claim.amount):
        raise InvalidSessionToken("malformed", "amount must be a decimal integer string")
    if claim.scope not in ("prefix", "exact") or (claim.scope == "prefix" and claim.query is not None):
        raise InvalidSessionToken("malformed", "bad scope")
    if claim.expires_at <= claim.issued_at:
        raise InvalidSessionToken("malformed", "expires_at must be after issued_at")
    try:
        scope = claim.to_scope()
    except ScopeError as exc:
        raise InvalidSessionToken("malformed", f"bad scope: {exc}") from None
    if scope.origin_str != claim.origin or scope.path != claim.path or scope.query != claim.query:
        raise InvalidSessionToken("malformed", "scope is not in normal form")


def verify_session_token(
    token: str,
    *,
    url: str | None = None,
    wallet: str | None = None,
    now: float | None = None,
    session_id: str | None = None,
    leeway: float = DEFAULT_LEEWAY_SECONDS,
) -> SessionClaim:
    """Verify signature, signer, validity window and (optionally) scope, wallet and session id."""
    claim, payload, signature = decode_session_token(token)
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        signer = Account.recover_message(encode_defunct(primitive=payload), signature=signature)
    except Exception:  # eth-account raises several types for bad v/r/s
        raise InvalidSessionToken("bad_signature", "signature does not recover") from None
    if str(signer).lower() != claim.address.lower():
        raise InvalidSessionToken("bad_signature", "signature is not by the claim's address")
    if wallet is not None and wallet.lower() != claim.address.lower():
        raise InvalidSessionToken("wrong_signer", "claim address is not the expected wallet")
    if session_id is not None and session_id != claim.session_id:
        raise InvalidSessionToken("session_mismatch", "claim is for another session")
    at = time.time() if now is None else now
    if at < claim.issued_at - leeway:
        raise InvalidSessionToken("not_yet_valid", "issued in the future")
    if at >= claim.expires_at + leeway:
        raise InvalidSessionToken("expired", "session expired")
    if url is not None:
        try:
            target = normalize_url(url)
        except ScopeError as exc:
            raise InvalidSessionToken("out_of_scope", f"request URL not usable: {exc}") from None
        if not claim.to_scope().covers(target):
            raise InvalidSessionToken("out_of_scope", "request URL is outside the session's scope")
    return claim
