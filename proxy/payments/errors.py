"""Exceptions shared by the payments modules."""

from __future__ import annotations


class ConfigValueError(ValueError):
    """A config value is invalid. `field` names the key so the config loader can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
