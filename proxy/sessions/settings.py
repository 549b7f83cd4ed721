"""The `[sessions]` config section."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.sessions.model import CREDENTIAL_KINDS, SessionValueError, validate_ttl
from proxy.sessions.scope import SessionRule


@dataclass
class SessionSettings:
    # Open a session when a paid request succeeds, and attach its credentials to later in-scope requests.
    enabled: bool = True
    default_ttl: int = 3600
    # Which credentials a session sends (default: all that apply): siwx, cookies, token_headers, session_token
    credential_kinds: list[str] = field(default_factory=lambda: sorted(CREDENTIAL_KINDS))
    # Response headers captured from the paid answer and replayed as they are (server-issued leases).
    token_headers: list[str] = field(default_factory=lambda: ["x-x402-lease"])
    # An in-scope request that still gets a 402 may pay again (policy and session cap permitting).
    renew_on_reject: bool = True
    # Seconds between writes of call counts and last-used times (they may lag by this after a crash).
    flush_interval: float = 5.0
    # First matching rule decides scope, TTL and per-session cap for new sessions.
    rules: list[SessionRule] = field(default_factory=list)

    def validate(self) -> None:
        unknown = set(self.credential_kinds) - set(CREDENTIAL_KINDS)
        if unknown:
            raise SessionValueError(
                "credential_kinds", f"unknown kinds {sorted(unknown)}; allowed: {sorted(CREDENTIAL_KINDS)}"
            )
        validate_ttl(self.default_ttl, field="default_ttl")
        if not 0.1 <= self.flush_interval <= 3600:
            raise SessionValueError("flush_interval", "must be between 0.1 and 3600 seconds")
