"""Case-insensitive header access over whatever mapping the engine hands us (dict or CIMultiDict)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
SIGN_IN_WITH_X = "SIGN-IN-WITH-X"

# A request carrying any of these already answers a challenge: the proxy must not pay on top of it.
CLIENT_PAYMENT_HEADERS = (PAYMENT_SIGNATURE, X_PAYMENT, SIGN_IN_WITH_X)


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """First value of `name`, compared case-insensitively; works for plain dicts too."""
    try:
        value = headers.get(name)
    except (TypeError, AttributeError):
        value = None
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def has_any_header(headers: Mapping[str, str], names: Iterable[str]) -> bool:
    wanted = {n.lower() for n in names}
    return any(key.lower() in wanted for key in headers)
