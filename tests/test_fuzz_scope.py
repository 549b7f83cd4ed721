"""Fuzzing session scopes (proxy/sessions/scope.py) and the session index (index.py).

tests/test_sessions_scope.py already checks idempotence, origin separation and the segment rule on
a small URL alphabet. Here URLs are assembled from adversarial parts (userinfo, host-suffix and
look-alike hosts, IDN and punycode, full-width dots, percent-encoded and dot segments, odd ports,
``/v1`` next to ``/v10``) and every ``covers`` answer is checked against two outside views:

- where the request would really go: yarl, the URL parser aiohttp connects with (scheme, host,
  port, no credentials);
- what path the server would see: segments split on literal "/", fully percent-decoded, dot
  segments resolved (an independent model of "same path").

Properties: a URL is never matched out of scope; a benign spelling of an in-scope URL is matched;
the index returns exactly the covering sessions; rules never widen a session beyond its URL's origin.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import unquote

import yarl
from hypothesis import event, example, given
from hypothesis import strategies as st

from proxy.sessions.index import SessionIndex
from proxy.sessions.model import SessionValueError
from proxy.sessions.scope import Scope, ScopeError, SessionRule, normalize_url, pattern_matches, scope_for
from tests.fuzz_profiles import PURE


@dataclass(frozen=True)
class Target:
    """A scope under attack, with its meaning spelled out independently of scope.py."""

    url: str
    kind: str
    origin: tuple[str, str, int]  # what the request must connect to
    segments: tuple[str, ...]  # decoded path segments of the scope
    query: str | None = None

    @property
    def scope(self) -> Scope:
        return Scope.from_url(self.url, "exact" if self.kind == "exact" else "prefix")


TARGETS = [
    Target("https://api.x.com/v1", "prefix", ("https", "api.x.com", 443), ("v1",)),
    Target("https://api.x.com/v1/", "prefix", ("https", "api.x.com", 443), ("v1", "")),
    Target("https://api.x.com/v1/item?id=1", "exact", ("https", "api.x.com", 443), ("v1", "item"), "id=1"),
    Target(
        "https://xn--bcher-kva.example:8443/v1", "prefix", ("https", "xn--bcher-kva.example", 8443), ("v1",)
    ),
    Target("http://[::1]:8080/v1", "prefix", ("http", "::1", 8080), ("v1",)),
    Target("http://127.0.0.1/", "prefix", ("http", "127.0.0.1", 80), ("",)),
]

# Each part: (spelling, benign). A URL is "benign" when every part is a harmless re-spelling of the
# scope's own origin; out-of-scope parts are adversarial.
SCHEMES = {
    "https": [
        ("https", True),
        ("HTTPS", True),
        ("hTtPs", True),
        ("http", False),
        ("wss", False),
        ("ftp", False),
    ],
    "http": [("http", True), ("HTTP", True), ("https", False), ("ws", False)],
}
SEPARATORS = [("://", True), ("://", True), (":/", False), (":\\\\", False), (":///", False)]
USERINFO = [("", True)] * 6 + [("user@", False), ("user:pw@", False), ("@", False), ("HOST@", False)]
HOST_ATTACKS = [
    "{h}.evil.net",
    "evil{h}",
    "{h}%2eevil.net",
    "{h}\\@evil.net",
    "{h}\u3002evil.net",
    "{h}@evil.net",
    "evil.net#@{h}",
    "evil.net?@{h}",
    "evil.net\\{h}",
    "{h}:443@evil.net",
    "{h}%00",
    "{h}..",
    "x{h}",
]
IDN_SPELLINGS = ["bücher.example", "BÜCHER.example", "xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE"]
PORTS = [":99999", ":0", ":+443", ":44 3", ":\u0664\u0664\u0663", ":", ":1", ":08443", ":8080", ":80", ":443"]
SEGMENTS = [
    "v1",
    "v10",
    "V1",
    "v1.json",
    "v1x",
    "%76%31",
    "%761",
    "v%31",
    "%2576%2531",
    "..",
    ".",
    "%2e",
    "%2E%2e",
    ".%2e",
    "v1%2F..",
    "v1%2f",
    "v1;x",
    "v1%00",
    "%zz",
    "%",
    "",
    "item",
    "~",
    "%7e",
    "é",
    "%C3%A9",
    "%E9",
    "admin",
    "a b",
    "v1\\..",
]
QUERIES = ["", "?", "?id=1", "?id=1#x", "#frag", "?id=%31", "?id=1&", "?ID=1"]


def host_spellings(host: str) -> list[tuple[str, bool]]:
    shown = f"[{host}]" if ":" in host else host
    if host.startswith("xn--bcher"):
        benign = [(h, True) for h in IDN_SPELLINGS] + [(h + ".", True) for h in IDN_SPELLINGS[:2]]
    else:
        benign = [(shown, True), (shown.upper(), True)]
        if not shown.startswith("[") and not shown[0].isdigit():
            benign += [(shown + ".", True), (shown.replace(".", "\uff0e"), True)]  # full-width dot: UTS 46
    attacks = [(a.format(h=shown), False) for a in HOST_ATTACKS]
    if shown == "[::1]":
        attacks += [
            ("[0:0::1]", True),
            ("[::1%25eth0]", False),
            ("[::1", False),
            ("[::ffff:127.0.0.1]", False),
        ]
    if shown == "127.0.0.1":
        attacks += [("127.1", False), ("0x7f.0.0.1", False), ("2130706433", False), ("127.0.0.01", False)]
    return benign + attacks


@dataclass(frozen=True)
class Candidate:
    url: str
    benign_origin: bool
    raw_path: str
    query: str | None


PARTS = ("scheme", "separator", "userinfo", "host", "port")
ATTACKED = st.sets(st.sampled_from(PARTS), max_size=2)
SEGMENT_LISTS = st.lists(st.sampled_from(SEGMENTS), max_size=5)
QUERY_TEXTS = st.sampled_from(QUERIES)
Part = tuple[st.SearchStrategy[str], st.SearchStrategy[str], dict[str, bool]]


@functools.cache
def part_strategies(target: Target) -> dict[str, Part]:
    """Per URL part: (benign spellings, any spelling, spelling -> benign). Built once per target,
    because making strategies costs more than drawing from them."""
    scheme, host, port = target.origin
    default = {"http": 80, "https": 443}[scheme]
    usual = "" if port == default else f":{port}"
    choices = {
        "scheme": SCHEMES[scheme],
        "separator": SEPARATORS,
        "userinfo": USERINFO,
        "host": host_spellings(host),
        "port": [(p, port_number(p, default) == port) for p in dict.fromkeys([usual, f":{port}", *PORTS])],
    }
    return {
        part: (
            st.sampled_from([text for text, ok in spelled if ok]),
            st.sampled_from([text for text, _ in spelled]),
            dict(spelled),
        )
        for part, spelled in choices.items()
    }


@st.composite
def candidates(draw: st.DrawFn, target: Target) -> Candidate:
    parts = part_strategies(target)
    # Mostly one or two parts under attack at a time: a URL with five bad parts teaches little.
    attacked = draw(ATTACKED)
    spelled: dict[str, str] = {}
    for part in PARTS:
        benign, anything, _ = parts[part]
        spelled[part] = draw(anything if part in attacked else benign)
    segments = draw(SEGMENT_LISTS)
    if draw(st.booleans()):
        segments = list(target.segments) + segments  # start inside the scope, then wander
    raw_path = "".join("/" + s for s in segments)
    query_text = draw(QUERY_TEXTS)
    url = "".join(spelled[part] for part in PARTS) + raw_path + query_text
    query = query_text.split("#", 1)[0][1:] or None if query_text.startswith("?") else None
    benign = all(parts[part][2][spelled[part]] for part in PARTS)
    return Candidate(url, benign, raw_path, query)


def port_number(text: str, default: int) -> int | None:
    """RFC 3986: an empty port (":" included) is the default; digits are decimal (leading zeros too)."""
    digits = text[1:]
    if digits == "":
        return default
    return int(digits) if digits.isascii() and digits.isdigit() else None


def served_segments(raw_path: str) -> tuple[str, ...] | None:
    """The path as the origin server would resolve it; None if it has an undecodable escape."""
    out: list[str] = []
    parts = raw_path.split("/")[1:] if raw_path else [""]
    for part in parts:
        if "%" in part.replace("%25", "") and unquote(part) == part:
            return None
        segment = unquote(part, errors="surrogateescape")
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if parts[-1] in (".", "..") or unquote(parts[-1]) in (".", ".."):
        out.append("")
    return tuple(out) or ("",)


def in_target_path(target: Target, segments: tuple[str, ...], query: str | None) -> bool:
    if target.kind == "exact":
        return segments == target.segments and query == target.query
    directory = target.segments[:-1] if target.segments[-1] == "" else target.segments
    if target.segments[-1] == "":  # "/v1/" covers what lies strictly below "/v1"
        return segments[: len(directory)] == directory and len(segments) > len(directory)
    return segments[: len(directory)] == directory


def connects_to(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) aiohttp would connect to, per yarl; None if yarl refuses the URL."""
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError, UnicodeError):
        return None
    if parsed.user is not None or parsed.password is not None or parsed.raw_host is None:
        return ("credentials-or-no-host", "", 0)
    return (parsed.scheme, parsed.raw_host.lower().rstrip("."), parsed.port or 0)


TARGET_AND_URL = st.one_of(*(st.tuples(st.just(t), candidates(t)) for t in TARGETS))


@PURE
@given(TARGET_AND_URL)
@example((TARGETS[0], Candidate("https://api.x.com/v1/%2e%2e/admin", True, "/v1/%2e%2e/admin", None)))
@example((TARGETS[0], Candidate("https://api.x.com/v10", True, "/v10", None)))
def test_never_matched_out_of_scope_and_benign_spellings_match(case: tuple[Target, Candidate]) -> None:
    target, candidate = case
    covered = target.scope.covers(candidate.url)
    segments = served_segments(candidate.raw_path)
    in_path = segments is not None and in_target_path(target, segments, candidate.query)
    event(f"covered={covered} benign={candidate.benign_origin} in_path={in_path}")
    if covered:
        assert in_path, f"{candidate.url} is matched but the server would serve {segments}"
        assert candidate.benign_origin, f"{candidate.url} is matched but does not name {target.origin}"
        destination = connects_to(candidate.url)
        assert destination in (None, target.origin), f"{candidate.url} would connect to {destination}"
    elif candidate.benign_origin and in_path and "\\" not in candidate.url and " " not in candidate.url:
        assert not _is_clean(candidate.raw_path), f"{candidate.url} is in scope but not matched"


def _is_clean(raw_path: str) -> bool:
    """No escape that scope.py deliberately refuses (malformed or NUL) and no whitespace."""
    try:
        normalize_url("https://h" + raw_path)
    except ScopeError:
        return False
    return True


# --- the index: exactly the covering sessions, most specific first ------------------------------

ANY_URL = st.one_of(*(candidates(t) for t in TARGETS)).map(lambda c: c.url)


@PURE
@given(
    st.lists(st.tuples(ANY_URL, st.sampled_from(["prefix", "exact"])), max_size=8),
    st.lists(st.sampled_from(TARGETS).map(lambda t: (t.url, t.kind)), max_size=4),
    st.lists(ANY_URL, min_size=1, max_size=6),
)
def test_index_returns_exactly_the_covering_sessions(
    fuzzed: list[tuple[str, str]], targets: list[tuple[str, str]], queries: list[str]
) -> None:
    index = SessionIndex()
    live: dict[str, Scope] = {}
    for n, (url, kind) in enumerate(fuzzed + targets):
        try:
            scope = Scope.from_url(url, "exact" if kind == "exact" else "prefix")
        except ScopeError:
            continue
        index.add(scope, f"s{n}")
        live[f"s{n}"] = scope
    for url in queries:
        found = list(index.candidates(url))
        assert sorted(found) == sorted(sid for sid, scope in live.items() if scope.covers(url)), url
        assert index.lookup(url) == (found[0] if found else None)
        kinds = [live[sid].kind for sid in found]
        assert kinds == sorted(kinds, key=lambda k: k != "exact"), "an exact scope comes first"
        prefix_lengths = [len(live[sid].path) for sid in found if live[sid].kind == "prefix"]
        assert prefix_lengths == sorted(prefix_lengths, reverse=True), "longer prefixes first"


# --- session rules: patterns and scope widening stay on the request's origin --------------------

PATTERNS = [
    "https://*.x.com/v1/*",
    "https://api.x.com/v1/*",
    "https://api.x.com/*",
    "https://*.example:8443/*",
    "http://[::1]:8080/v1*",
    "https://bücher.example:8443/*",
]
SCOPE_URLS = [None, "https://api.x.com/", "https://api.x.com/v1/", "https://x.com/", "https://evil.net/"]


@PURE
@given(
    st.lists(
        st.builds(
            SessionRule,
            pattern=st.sampled_from(PATTERNS),
            scope_kind=st.sampled_from(["prefix", "exact"]),
            scope_url=st.sampled_from(SCOPE_URLS),
        ),
        max_size=3,
    ),
    ANY_URL,
)
def test_rules_never_reach_beyond_the_paid_urls_origin(rules: list[SessionRule], url: str) -> None:
    valid = []
    for rule in rules:
        try:
            rule.validate()
        except SessionValueError:
            continue
        valid.append(rule)
    try:
        n = normalize_url(url)
    except ScopeError:
        return
    for rule in valid:
        if pattern_matches(rule.pattern, n):
            wildcard = "://*." in rule.pattern
            suffix = normalize_url(rule.pattern.replace("*.", "").split("*")[0]).host
            assert n.host.endswith("." + suffix) if wildcard else n.host == suffix
    scope, _rule = scope_for(n, valid)
    assert scope.covers(n), "a session must cover the request that opened it"
    assert scope.origin == n.origin
