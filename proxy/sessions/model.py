"""The session record: what was paid, where its credentials may go, and for how long. Pure data.

Limits (`limits.py`) match the seed tools' schema: TTL 60 s .. 30 days (default 3600 s), label <= 100
chars. A session's state is derived, never stored: ``ended`` if ``ended_at`` is set, else ``expired``
once ``now >= expires_at``, else ``active``. Ending a session wipes its credentials (the seed
tools kept the token of an ended session usable).
"""

from __future__ import annotations

import base64
import binascii
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

# The limits and validators live in limits.py, which scope.py imports instead of this module:
# model -> scope -> limits, no circle. Re-exported here for the modules that import them from here.
from proxy.sessions.limits import LABEL_MAX as LABEL_MAX
from proxy.sessions.limits import TTL_DEFAULT as TTL_DEFAULT
from proxy.sessions.limits import TTL_MAX as TTL_MAX
from proxy.sessions.limits import TTL_MIN as TTL_MIN
from proxy.sessions.limits import SessionValueError as SessionValueError
from proxy.sessions.limits import validate_label as validate_label
from proxy.sessions.limits import validate_ttl as validate_ttl
from proxy.sessions.scope import Scope

SessionState = Literal["active", "ended", "expired"]
CredentialKind = Literal["cookies", "token_headers", "session_token", "siwx"]
CREDENTIAL_KINDS: frozenset[str] = frozenset({"cookies", "token_headers", "session_token", "siwx"})


class StoredCookie(NamedTuple):
    """A cookie from ``Set-Cookie``. ``domain`` None = host-only; ``expires`` None = session cookie."""

    name: str
    value: str
    domain: str | None
    path: str
    expires: float | None
    secure: bool


_SIGNATURE_BYTES = 65


def _encode_token(packed: bytes) -> str:
    payload, signature = packed[:-_SIGNATURE_BYTES], packed[-_SIGNATURE_BYTES:]
    return f"{base64.urlsafe_b64encode(payload).rstrip(b'=').decode('ascii')}.0x{signature.hex()}"


def _pack_token(token: str | None) -> bytes | str | None:
    """Our own tokens as claim bytes + signature bytes; anything else is kept verbatim."""
    if token is None:
        return None
    claim, sep, signature = token.partition(".0x")
    try:
        packed = base64.urlsafe_b64decode(claim + "=" * (-len(claim) % 4)) + bytes.fromhex(signature)
    except (binascii.Error, ValueError):
        return token
    if not sep or len(signature) != 2 * _SIGNATURE_BYTES or _encode_token(packed) != token:
        return token
    return packed


def intern_siwx(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """SIWX info with its (few, repeating) string values shared between sessions."""
    if info is None:
        return None
    return {sys.intern(k): sys.intern(v) if isinstance(v, str) else v for k, v in info.items()}


class SessionCredentials:
    """Secrets a session replays. Never logged (``repr`` shows kinds only), never in ``describe``.

    The session token is the largest thing a session holds (~770 characters); it is kept decoded
    (claim bytes followed by the 65-byte signature: ~300 bytes less) and re-encoded on access.
    """

    __slots__ = ("_token", "cookies", "siwx", "token_headers")

    def __init__(
        self,
        cookies: list[StoredCookie] | None = None,
        token_headers: dict[str, str] | None = None,
        siwx: dict[str, Any] | None = None,
        session_token: str | None = None,
    ) -> None:
        self.cookies: list[StoredCookie] = [] if cookies is None else cookies
        self.token_headers: dict[str, str] = {} if token_headers is None else token_headers
        # Non-secret SIWX parameters from the 402's sign-in-with-x extension, with the chosen
        # chain: {"domain", "uri", "version", "chainId", "type", "statement"?}.
        self.siwx: dict[str, Any] | None = siwx
        self._token: bytes | str | None = None
        self.session_token = session_token

    @property
    def session_token(self) -> str | None:
        token = self._token
        if token is None or isinstance(token, str):
            return token
        return _encode_token(token)

    @session_token.setter
    def session_token(self, token: str | None) -> None:
        self._token = _pack_token(token)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionCredentials):
            return NotImplemented
        return (self.cookies, self.token_headers, self.siwx, self.session_token) == (
            other.cookies,
            other.token_headers,
            other.siwx,
            other.session_token,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SessionCredentials(kinds={self.kinds()})"

    def kinds(self) -> list[str]:
        kinds = []
        if self.cookies:
            kinds.append("cookies")
        if self.token_headers:
            kinds.append("token_headers")
        if self.session_token:
            kinds.append("session_token")
        if self.siwx:
            kinds.append("siwx")
        return kinds

    def clear(self) -> None:
        self.cookies = []
        self.token_headers = {}
        self.siwx = None
        self.session_token = None

    def to_dict(self) -> dict[str, Any]:
        """Full content, secrets included: for the store only."""
        return {
            "cookies": [list(c) for c in self.cookies],
            "token_headers": dict(self.token_headers),
            "siwx": self.siwx,
            "session_token": self.session_token,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionCredentials:
        return cls(
            cookies=[StoredCookie(*c) for c in data.get("cookies") or []],
            token_headers=dict(data.get("token_headers") or {}),
            siwx=intern_siwx(data.get("siwx")),
            session_token=data.get("session_token"),
        )


def _interned(value: str | None) -> str | None:
    # Assets, networks and addresses repeat across thousands of sessions: share one copy each.
    return sys.intern(value) if isinstance(value, str) else value


def _opt_str(value: int | None) -> str | None:
    return None if value is None else str(value)


@dataclass(slots=True)
class Session:
    id: str
    scope: Scope
    created_at: float
    expires_at: float
    ttl_seconds: int = TTL_DEFAULT
    label: str | None = None
    last_used_at: float | None = None
    call_count: int = 0
    payment_ids: list[int] = field(default_factory=list)  # ledger row ids
    amount_paid: int = 0  # atomic units of `asset`
    asset: str | None = None
    network: str | None = None
    decimals: int | None = None
    pay_to: str | None = None
    payer: str | None = None  # our wallet address (signs the session token and SIWX)
    ended_at: float | None = None
    ended_reason: str | None = None
    credentials: SessionCredentials = field(default_factory=SessionCredentials)
    renewals: int = 0
    rejected_count: int = 0  # times the server answered 401/402/403 despite our credentials
    max_session_payment: int | None = None  # atomic units; None = only the policy caps apply

    def __post_init__(self) -> None:
        self.asset = _interned(self.asset)
        self.network = _interned(self.network)
        self.pay_to = _interned(self.pay_to)
        self.payer = _interned(self.payer)

    @classmethod
    def create(
        cls,
        scope: Scope,
        *,
        now: float,
        ttl_seconds: int = TTL_DEFAULT,
        label: str | None = None,
        **fields: Any,
    ) -> Session:
        ttl = validate_ttl(ttl_seconds)
        return cls(
            id=str(uuid.uuid4()),
            scope=scope,
            created_at=now,
            expires_at=now + ttl,
            ttl_seconds=ttl,
            label=validate_label(label),
            **fields,
        )

    def state(self, now: float) -> SessionState:
        if self.ended_at is not None:
            return "ended"
        if now >= self.expires_at:
            return "expired"
        return "active"

    def is_active(self, now: float) -> bool:
        return self.ended_at is None and now < self.expires_at

    def end(self, now: float, reason: str) -> None:
        """End the session and forget its secrets. Ending twice keeps the first time and reason."""
        if self.ended_at is None:
            self.ended_at = now
            self.ended_reason = reason
        self.credentials.clear()

    def record_payment(self, ledger_id: int, amount: int) -> None:
        self.payment_ids.append(ledger_id)
        self.amount_paid += amount

    def remaining_budget(self) -> int | None:
        """Atomic units this session may still pay (renewals), None when uncapped."""
        if self.max_session_payment is None:
            return None
        return max(0, self.max_session_payment - self.amount_paid)

    def describe(self, now: float) -> dict[str, Any]:
        """JSON-safe status WITHOUT secrets: credential kinds only, never values or signatures."""
        state = self.state(now)
        return {
            "id": self.id,
            "state": state,
            "scope": {"kind": self.scope.kind, "url": self.scope.to_url()},
            "label": self.label,
            "ttl_seconds": self.ttl_seconds,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "expires_in": max(0, int(self.expires_at - now)) if state == "active" else 0,
            "last_used_at": self.last_used_at,
            "call_count": self.call_count,
            "payment_ids": list(self.payment_ids),
            "amount_paid": str(self.amount_paid),  # atomic units as a string: never a float
            "asset": self.asset,
            "network": self.network,
            "decimals": self.decimals,
            "pay_to": self.pay_to,
            "payer": self.payer,
            "ended_at": self.ended_at,
            "ended_reason": self.ended_reason,
            "credentials": self.credentials.kinds(),
            "cookie_count": len(self.credentials.cookies),
            "renewals": self.renewals,
            "rejected_count": self.rejected_count,
            "max_session_payment": _opt_str(self.max_session_payment),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, secrets included, JSON-safe: for the store only (never for output)."""
        return {
            "id": self.id,
            "scope": {"kind": self.scope.kind, "url": self.scope.to_url()},
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "ttl_seconds": self.ttl_seconds,
            "label": self.label,
            "last_used_at": self.last_used_at,
            "call_count": self.call_count,
            "payment_ids": list(self.payment_ids),
            "amount_paid": str(self.amount_paid),
            "asset": self.asset,
            "network": self.network,
            "decimals": self.decimals,
            "pay_to": self.pay_to,
            "payer": self.payer,
            "ended_at": self.ended_at,
            "ended_reason": self.ended_reason,
            "credentials": self.credentials.to_dict(),
            "renewals": self.renewals,
            "rejected_count": self.rejected_count,
            "max_session_payment": _opt_str(self.max_session_payment),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Session:
        cap = data.get("max_session_payment")
        return cls(
            id=str(data["id"]),
            scope=Scope.from_url(data["scope"]["url"], data["scope"]["kind"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            ttl_seconds=int(data["ttl_seconds"]),
            label=data.get("label"),
            last_used_at=data.get("last_used_at"),
            call_count=int(data.get("call_count", 0)),
            payment_ids=[int(i) for i in data.get("payment_ids") or []],
            amount_paid=int(data.get("amount_paid", 0)),
            asset=data.get("asset"),
            network=data.get("network"),
            decimals=data.get("decimals"),
            pay_to=data.get("pay_to"),
            payer=data.get("payer"),
            ended_at=data.get("ended_at"),
            ended_reason=data.get("ended_reason"),
            credentials=SessionCredentials.from_dict(data.get("credentials") or {}),
            renewals=int(data.get("renewals", 0)),
            rejected_count=int(data.get("rejected_count", 0)),
            max_session_payment=None if cap is None else int(cap),
        )
