"""The `[store]` config section: where the ledger lives, and how its URL is shown without secrets."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

POSTGRES_SCHEMES = ("postgresql", "postgres")
REDACTED = "<redacted>"
# Query parameters whose value is a secret (libpq's `password`, `sslpassword`; anything that says so).
_SECRET_PARAMS = ("password", "secret", "token")


class StoreSettingError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class StoreSettings:
    # Empty: the embedded SQLite ledger, <home>/state.db. Otherwise postgresql://user[:password]@host[:port]/db
    # (libpq's PGPASSWORD and ~/.pgpass work too, and keep the password out of the config).
    url: str = ""

    @property
    def is_postgres(self) -> bool:
        return bool(self.url)

    def validate(self) -> None:
        if not self.url:
            return
        scheme, sep, _ = self.url.partition("://")
        if not sep or scheme.lower() not in POSTGRES_SCHEMES:
            raise StoreSettingError(
                "url",
                f"must be empty (the SQLite ledger in the home directory) or a postgresql:// URL, got "
                f"{redact_url(self.url)}",
            )


def redact_url(url: str) -> str:
    """`url` as it may be shown or logged: no password, no secret query parameter.

    postgresql://user:pass@host:5432/db?sslmode=require&password=x -> postgresql://user@host:5432/db?sslmode=
    require&password=<redacted>. Works on multi-host URLs (host1:5432,host2:5432) and on text that is not a
    URL at all (anything before an `@` is dropped, as it may be a password).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if index != -1:
            cut = min(cut, index)
    authority, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = authority.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        authority = f"{user}@{hosts}" if user else hosts
    elif "@" in tail:
        # An @ past the first / ? #: a password with one of those in it, unescaped. Show nothing before it.
        authority, _, tail = f"{authority}{tail}".rpartition("@")
        cut = min((i for i in (tail.find(m) for m in "/?#") if i != -1), default=len(tail))
        authority, tail = f"{REDACTED}@{tail[:cut]}", tail[cut:]
    tail, hash_mark, fragment = tail.partition("#")
    path, qmark, query = tail.partition("?")
    if qmark:
        pairs = []
        for pair in query.split("&"):
            key, eq, _ = pair.partition("=")
            if eq and any(word in unquote(key).lower() for word in _SECRET_PARAMS):
                pair = f"{key}={REDACTED}"
            pairs.append(pair)
        query = "&".join(pairs)
    shown_url = f"{scheme}{sep}{authority}{path}{qmark}{query}"
    return f"{shown_url}{hash_mark}{REDACTED if fragment else ''}"
