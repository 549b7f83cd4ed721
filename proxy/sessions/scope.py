"""URL normalisation and session scopes: which requests a session's credentials may go to.

Everything here fails closed: a URL we cannot normalise unambiguously raises ``ScopeError``
(callers treat that as "no session applies"), and ``Scope.covers`` answers False for it. The seed
tools matched scopes with a naive ``startsWith``; the attack matrix in
``tests/test_sessions_scope.py`` lists the tricks this module must not fall for.

Normal form (RFC 3986 section 6.2.2 syntax-based normalisation, plus a few stricter rules):

- scheme lower-cased, ``http``/``https`` only; an authority is required;
- userinfo (``user@host``) is rejected: a credential in the URL is never matched;
- host in the proxy's one canonical form (``proxy.hosts.canonical_host``): lower-cased; non-ASCII
  hosts mapped with UTS #46 and IDNA-encoded (punycode), so ``bücher.example`` and
  ``xn--bcher-kva.example`` are one host; one trailing dot removed; ``%`` and ``\\`` in the host
  rejected (no percent-decoding tricks such as ``%2e``); IPv4 must be the canonical dotted quad
  (``127.1``/``0x7f.0.0.1``/``[::ffff:127.0.0.1]`` are rejected rather than guessed); IPv6 is
  bracketed and compressed (``[0:0::1]`` -> ``[::1]``), zone ids rejected;
- the port is always explicit in the origin tuple (80/443 when absent);
- path: ``%xx`` of unreserved characters decoded, other escapes upper-cased, characters not
  allowed in a path percent-encoded as UTF-8, then dot segments removed (RFC 3986 5.2.4), so
  ``/v1/%2e%2e/admin`` is ``/admin``; empty path -> ``/``; ``\\`` in the path is rejected
  (some servers treat it as ``/``); ``%2F`` stays encoded and is NOT a segment separator;
- query kept verbatim (an empty query ``?`` is the same as none); fragment dropped;
- any whitespace or control character anywhere is rejected.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple
from urllib.parse import unquote

from proxy.hosts import HostError, canonical_host
from proxy.payments.amounts import AmountError, parse_decimal
from proxy.sessions.limits import SessionValueError, validate_ttl

ScopeKind = Literal["prefix", "exact"]
SCOPE_KINDS: tuple[ScopeKind, ...] = ("prefix", "exact")
DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986 appendix B, minus the optional parts we require.
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$", re.DOTALL)
_BAD_CHARS_RE = re.compile(r"[\x00-\x20\x7f]")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar minus pct-encoded, plus "/": what may appear literally in a normalised path.
_PATH_LITERAL = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
_HEX = frozenset("0123456789abcdefABCDEF")
# Paths that need no work (the common case): only literal path characters, no "%", and no
# segment starting with "." (every dot segment does, since the path starts with "/").
_SIMPLE_PATH_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


class ScopeError(ValueError):
    """A URL cannot be normalised (unsupported scheme, userinfo, bad host, bad escape...)."""


class NormalizedURL(NamedTuple):
    """A URL in normal form. ``port`` is always explicit; ``query`` is None when absent or empty."""

    scheme: str
    host: str  # lower-case ASCII; IPv6 in brackets
    port: int
    path: str  # starts with "/"
    query: str | None

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def origin_str(self) -> str:
        """RFC 6454 serialisation: the default port is omitted (``https://api.x.com``)."""
        if DEFAULT_PORTS[self.scheme] == self.port:
            return f"{self.scheme}://{self.host}"
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def netloc(self) -> str:
        """Host as a client writes it in ``Host``/SIWX ``domain`` (default port omitted)."""
        return self.origin_str.split("://", 1)[1]

    def to_url(self) -> str:
        query = "" if self.query is None else f"?{self.query}"
        return f"{self.origin_str}{self.path}{query}"

    def __str__(self) -> str:
        return self.to_url()


def normalize_url(url: str) -> NormalizedURL:
    """Parse and normalise an absolute http(s) URL; raise ``ScopeError`` if that is not possible."""
    if not isinstance(url, str):
        raise ScopeError("URL must be a string")
    if len(url) > 16384:
        raise ScopeError("URL too long")
    if _BAD_CHARS_RE.search(url):
        raise ScopeError("URL contains whitespace or control characters")
    match = _URL_RE.match(url)
    if match is None:
        raise ScopeError("not an absolute URL with an authority")
    scheme_raw, authority, path_raw, query = match.groups()
    scheme = scheme_raw.lower()
    if scheme not in DEFAULT_PORTS:
        raise ScopeError(f"unsupported scheme {scheme!r}")
    host, port = _split_authority(authority, scheme)
    return NormalizedURL(scheme, host, port, normalize_path(path_raw), query or None)


def _split_authority(authority: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        # Never match a URL carrying credentials: "https://api.x.com@evil.net" goes to evil.net,
        # and "https://user@api.x.com" is not something we attach a session to either.
        raise ScopeError("userinfo in URL is not allowed")
    if "\\" in authority or "%" in authority:
        raise ScopeError("backslash or percent-escape in host")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ScopeError("unterminated IPv6 literal")
        host = _host(authority[: end + 1])
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ScopeError("garbage after IPv6 literal")
        port_text = rest[1:] if rest else ""
    else:
        host_text, sep, port_text = authority.rpartition(":")
        if not sep:
            host_text, port_text = authority, ""
        if ":" in host_text:
            raise ScopeError("an IPv6 host must be in brackets")
        host = _host(host_text)
    return host, _parse_port(port_text, scheme)


def _parse_port(text: str, scheme: str) -> int:
    if text == "":
        return DEFAULT_PORTS[scheme]
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ScopeError(f"bad port {text!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise ScopeError(f"port out of range: {port}")
    return port


def _host(text: str) -> str:
    """The canonical host (``proxy.hosts``), IPv6 in brackets as a URL writes it."""
    try:
        host = canonical_host(text)
    except HostError as exc:
        raise ScopeError(str(exc)) from None
    return f"[{host}]" if ":" in host else host


def normalize_path(raw: str) -> str:
    """Percent-encoding normalisation, then RFC 3986 5.2.4 dot-segment removal. "" -> "/"."""
    if raw == "":
        return "/"
    if not raw.startswith("/"):
        raise ScopeError("path must start with '/'")
    if "/." not in raw and _SIMPLE_PATH_RE.match(raw):
        return raw
    if "\\" in raw:
        raise ScopeError("backslash in path")
    return remove_dot_segments(_normalize_escapes(raw))


def _normalize_escapes(raw: str) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            hexpair = raw[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(c in _HEX for c in hexpair):
                raise ScopeError("malformed percent-escape in path")
            decoded = chr(int(hexpair, 16))
            out.append(decoded if decoded in _UNRESERVED else f"%{hexpair.upper()}")
            i += 3
            continue
        if ch in _PATH_LITERAL:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path (segment formulation; same results as the spec's loop)."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." -> "/a/": the trailing slash survives, as in the spec
    return "/" + "/".join(out)


_SEPARATORS_RE = re.compile(r"[/\\]")


def path_in_normal_form(raw: str) -> bool:
    """Can a server read this raw path only as its normal form? Credentials go nowhere else.

    Scopes are decided on the normal form (dot segments resolved), but the raw path is what is sent,
    and servers differ: Starlette and aiohttp route ``/t/%2E%2E/v1`` to a ``/t/{rest}`` handler, some
    decode ``%2F``/``%5C`` before resolving ``..``, Tomcat drops ``;params`` (``..;/``). So the raw path
    must equal its normal form, and no segment may turn into ``.`` or ``..`` when percent-decoded
    (repeatedly), split at ``/`` and ``\\``, or cut at ``;`` or NUL.
    """
    try:
        if normalize_path(raw) != raw:
            return False
    except ScopeError:
        return False
    if "%" not in raw and (";" not in raw or "." not in raw):
        return True  # normal, and nothing that decodes or cuts into a dot segment: the usual path
    for segment in raw.split("/"):
        decoded = segment
        for _ in range(3):  # a server may decode more than once
            decoded = unquote(decoded, errors="replace")
        for piece in _SEPARATORS_RE.split(decoded):
            if piece.split(";", 1)[0].split("\x00", 1)[0].strip() in (".", ".."):
                return False
    return True


def path_covers(scope_path: str, path: str) -> bool:
    """Prefix rule on segment boundaries: "/v1" covers "/v1", "/v1/", "/v1/x" but not "/v10";
    "/v1/" covers "/v1/" and everything below it but not "/v1"."""
    if scope_path.endswith("/"):
        return path.startswith(scope_path)
    return path == scope_path or path.startswith(scope_path + "/")


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a session's credentials may be sent. Build with ``Scope.from_url`` or ``default_scope``."""

    kind: ScopeKind
    origin: tuple[str, str, int]  # (scheme, host, port), port explicit
    path: str  # normalised
    query: str | None = None  # exact scopes only; None = no query

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise ScopeError(f"scope kind must be 'prefix' or 'exact', got {self.kind!r}")
        if self.kind == "prefix" and self.query is not None:
            raise ScopeError("a prefix scope has no query")
        scheme, host, port = self.origin
        url = NormalizedURL(scheme, host, port, self.path, self.query)
        # Re-normalising must be the identity, otherwise the scope was built from raw parts.
        if normalize_url(url.to_url()) != url:
            raise ScopeError("scope parts are not normalised; use Scope.from_url")

    @property
    def key(self) -> str:
        """Stable, hashable text form, e.g. ``"prefix https://api.x.com/v1"`` (computed: not stored,
        to keep sessions small)."""
        return f"{self.kind} {self.to_url()}"

    @classmethod
    def from_url(cls, url: str | NormalizedURL, kind: ScopeKind = "prefix") -> Scope:
        n = url if isinstance(url, NormalizedURL) else normalize_url(url)
        return cls(kind, n.origin, n.path, n.query if kind == "exact" else None)

    @property
    def origin_str(self) -> str:
        return self.normalized().origin_str

    def normalized(self) -> NormalizedURL:
        return NormalizedURL(*self.origin, self.path, self.query)

    def to_url(self) -> str:
        return self.normalized().to_url()

    def covers(self, url: str | NormalizedURL) -> bool:
        """Same origin, and the path (and query, for exact) matches. Unparseable URL -> False."""
        if isinstance(url, NormalizedURL):
            n = url
        else:
            try:
                n = normalize_url(url)
            except ScopeError:
                return False
        if (n.scheme, n.host, n.port) != self.origin:
            return False
        if self.kind == "exact":
            return n.path == self.path and n.query == self.query
        return path_covers(self.path, n.path)

    def __str__(self) -> str:
        return self.key


def default_scope(url: str | NormalizedURL) -> Scope:
    """Scope of an automatic session: prefix at the paid URL's path, query dropped."""
    return Scope.from_url(url, "prefix")


# --- session rules -------------------------------------------------------------------------------


class _CompiledPattern(NamedTuple):
    scheme: str
    host: str  # exact host, or the suffix after "*." for a wildcard
    wildcard_host: bool
    port: int
    path: re.Pattern[str]


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> _CompiledPattern:
    """Compile a URL glob: ``scheme://host[:port]/path-glob``.

    ``*`` in the path matches any run of characters, "/" included (``/v1/*`` matches ``/v1/`` and
    everything below; ``/v1*`` would also match ``/v10`` - write what you mean). The host is
    literal or a leading ``*.`` label (``*.x.com`` matches ``a.x.com``, ``a.b.x.com``, not
    ``x.com``). Scheme, host and port are compared as components, never as text, so a glob can
    never reach across the origin (``https://*.x.com/*`` cannot match ``https://evil.net/.x.com/``).
    Queries and fragments are not allowed in patterns; the request's query is ignored.
    """
    if "?" in pattern or "#" in pattern:
        raise ScopeError("session rule patterns cannot contain a query or fragment")
    wildcard = False
    probe = pattern
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)\*\.", pattern)
    if match:
        wildcard = True
        probe = match.group(1) + pattern[match.end() :]
    scheme_end = probe.find("://") + 3
    path_start = probe.find("/", scheme_end)
    authority_part = probe if path_start < 0 else probe[:path_start]
    path_glob = "/" if path_start < 0 else probe[path_start:]
    if "*" in authority_part:
        raise ScopeError("only a leading '*.' label may be a wildcard in a pattern's host")
    if remove_dot_segments(path_glob) != path_glob:
        raise ScopeError("dot segments in a pattern's path")
    n = normalize_url(authority_part + "/")
    pieces = [_glob_piece(part) for part in path_glob.split("*")]
    regex = re.compile(".*".join(pieces), re.DOTALL)
    return _CompiledPattern(n.scheme, n.host, wildcard, n.port, regex)


def _glob_piece(text: str) -> str:
    # Literal parts of the path glob get the same normalisation as request paths (case of
    # escapes, unreserved decoding), but not dot-segment removal, which needs the whole path.
    return re.escape(_normalize_escapes(text)) if text else ""


def _origin_matches(p: _CompiledPattern, url: NormalizedURL) -> bool:
    if url.scheme != p.scheme or url.port != p.port:
        return False
    return url.host.endswith("." + p.host) if p.wildcard_host else url.host == p.host


def pattern_matches(pattern: str, url: NormalizedURL) -> bool:
    p = compile_pattern(pattern)
    return _origin_matches(p, url) and p.path.fullmatch(url.path) is not None


@dataclass
class SessionRule:
    """A ``[[sessions.rules]]`` entry: how to scope and limit sessions opened for matching URLs."""

    pattern: str  # URL glob, e.g. "https://api.x.com/v1/*"
    scope_kind: ScopeKind = "prefix"
    # Widen (or pin) the scope, e.g. "https://api.x.com/v1/". Must cover the paid URL, else the
    # rule is skipped for that URL.
    scope_url: str | None = None
    ttl_seconds: int | None = None
    max_session_payment: str | None = None  # decimal in asset units, like the policy caps
    # Payments for matching URLs above this price wait for a person (proxy/payments/approvals.py).
    ask_above: str | None = None

    def validate(self) -> None:
        try:
            compiled = compile_pattern(self.pattern)
        except ScopeError as exc:
            raise SessionValueError("pattern", f"bad pattern {self.pattern!r}: {exc}") from None
        if self.scope_kind not in SCOPE_KINDS:
            raise SessionValueError("scope_kind", "must be 'prefix' or 'exact'")
        if self.scope_url is not None:
            try:
                target = normalize_url(self.scope_url)
            except ScopeError as exc:
                raise SessionValueError("scope_url", f"bad URL {self.scope_url!r}: {exc}") from None
            if not _origin_matches(compiled, target):
                raise SessionValueError("scope_url", "must be on the origin of the rule's pattern")
            if self.scope_kind == "prefix" and target.query is not None:
                raise SessionValueError("scope_url", "a prefix scope cannot have a query")
        if self.ttl_seconds is not None:
            validate_ttl(self.ttl_seconds, field="ttl_seconds")
        for name in ("max_session_payment", "ask_above"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_decimal(value, what=name)
                except AmountError as exc:
                    raise SessionValueError(name, str(exc)) from None

    def matches(self, url: NormalizedURL) -> bool:
        try:
            return pattern_matches(self.pattern, url)
        except ScopeError:
            return False  # an unvalidated bad rule never matches


def scope_for(url: str | NormalizedURL, rules: list[SessionRule]) -> tuple[Scope, SessionRule | None]:
    """The scope a new session for ``url`` gets, and the rule that decided it (None = default).

    Rules are tried in order and the first that matches wins. A rule whose ``scope_url`` does not
    cover ``url`` is skipped (later rules may still apply): a session must always cover the
    request that opened it. Raises ``ScopeError`` if ``url`` itself cannot be normalised.
    """
    n = url if isinstance(url, NormalizedURL) else normalize_url(url)
    for rule in rules:
        if not rule.matches(n):
            continue
        if rule.scope_url is None:
            return Scope.from_url(n, rule.scope_kind), rule
        try:
            scope = Scope.from_url(rule.scope_url, rule.scope_kind)
        except ScopeError:
            continue
        if scope.covers(n):
            return scope, rule
    return default_scope(n), None
