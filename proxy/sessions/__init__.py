"""Sessions: pay once, then replay a credential for requests in a URL scope.

Pure building blocks (no I/O, no event loop): URL scopes and rules (``scope``), the scope index
(``index``), the session record (``model``) and credential capture/replay (``credentials``). The
signed session token lives in ``proxy.tokens``. See ``docs/sessions.md``.
"""

from proxy.sessions.index import SessionIndex
from proxy.sessions.model import (
    CREDENTIAL_KINDS,
    LABEL_MAX,
    TTL_DEFAULT,
    TTL_MAX,
    TTL_MIN,
    Session,
    SessionCredentials,
    SessionState,
    SessionValueError,
    StoredCookie,
    validate_label,
    validate_ttl,
)
from proxy.sessions.scope import (
    NormalizedURL,
    Scope,
    ScopeError,
    ScopeKind,
    SessionRule,
    default_scope,
    normalize_url,
    scope_for,
)

__all__ = [
    "CREDENTIAL_KINDS",
    "LABEL_MAX",
    "TTL_DEFAULT",
    "TTL_MAX",
    "TTL_MIN",
    "NormalizedURL",
    "Scope",
    "ScopeError",
    "ScopeKind",
    "Session",
    "SessionCredentials",
    "SessionIndex",
    "SessionRule",
    "SessionState",
    "SessionValueError",
    "StoredCookie",
    "default_scope",
    "normalize_url",
    "scope_for",
    "validate_label",
    "validate_ttl",
]
