"""The limits of a session's parameters and their validators, shared by the session record
(`model.py`) and the scope rules (`scope.py`), which imports nothing else of the session record.

Limits match the seed tools' schema: TTL 60 s .. 30 days (default 3600 s), label <= 100 chars.
"""

from __future__ import annotations

TTL_MIN = 60
TTL_MAX = 30 * 24 * 3600  # 2_592_000
TTL_DEFAULT = 3600
LABEL_MAX = 100


class SessionValueError(ValueError):
    """A session parameter is out of range. ``field`` names it (the config loader points at it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_ttl(ttl: object, *, field: str = "ttl_seconds") -> int:
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise SessionValueError(field, f"{field} must be an integer number of seconds, got {ttl!r}")
    if not TTL_MIN <= ttl <= TTL_MAX:
        raise SessionValueError(field, f"{field} must be {TTL_MIN}..{TTL_MAX} seconds (30 days), got {ttl}")
    return ttl


def validate_label(label: object, *, field: str = "label") -> str | None:
    if label is None:
        return None
    if not isinstance(label, str):
        raise SessionValueError(field, f"{field} must be a string")
    if len(label) > LABEL_MAX:
        raise SessionValueError(field, f"{field} must be at most {LABEL_MAX} characters, got {len(label)}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in label):
        # Labels end up in logs and status output; no control characters (log injection).
        raise SessionValueError(field, f"{field} must not contain control characters")
    return label
