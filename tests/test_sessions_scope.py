"""Scope matching: the attack matrix the seed tools' startsWith failed, plus properties."""

from __future__ import annotations

import re

import pytest
import yarl
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from proxy.sessions.model import SessionValueError
from proxy.sessions.scope import (
    NormalizedURL,
    Scope,
    ScopeError,
    SessionRule,
    default_scope,
    normalize_url,
    path_in_normal_form,
    remove_dot_segments,
    scope_for,
)

BASE = "https://api.x.com"


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://api.x.com", "https://api.x.com/"),
        ("HTTPS://API.X.COM/v1", "https://api.x.com/v1"),
        ("https://api.x.com./v1", "https://api.x.com/v1"),
        ("https://api.x.com:443/v1", "https://api.x.com/v1"),
        ("http://api.x.com:80/", "http://api.x.com/"),
        ("https://api.x.com:0443/", "https://api.x.com/"),
        ("https://api.x.com:/v1", "https://api.x.com/v1"),
        ("https://api.x.com:8443/v1", "https://api.x.com:8443/v1"),
        ("https://api.x.com/v1#frag", "https://api.x.com/v1"),
        ("https://api.x.com/v1?", "https://api.x.com/v1"),
        ("https://api.x.com/v1?b=2&a=1", "https://api.x.com/v1?b=2&a=1"),
        ("https://api.x.com?a=1", "https://api.x.com/?a=1"),
        ("https://api.x.com/%7euser/%41%2d", "https://api.x.com/~user/A-"),
        ("https://api.x.com/a%2fb/%3a", "https://api.x.com/a%2Fb/%3A"),
        ("https://api.x.com/v1/../admin", "https://api.x.com/admin"),
        ("https://api.x.com/v1/%2e%2e/admin", "https://api.x.com/admin"),
        ("https://api.x.com/v1/%2E%2e/admin", "https://api.x.com/admin"),
        ("https://api.x.com/v1/./x/.", "https://api.x.com/v1/x/"),
        ("https://api.x.com/../../..", "https://api.x.com/"),
        ("https://api.x.com/a/b/..", "https://api.x.com/a/"),
        ("https://api.x.com/.well-known/x", "https://api.x.com/.well-known/x"),
        ("https://api.x.com/ä{}|", "https://api.x.com/%C3%A4%7B%7D%7C"),
        ("https://bücher.example/", "https://xn--bcher-kva.example/"),
        ("https://BÜCHER.example/", "https://xn--bcher-kva.example/"),
        ("https://xn--BCHER-kva.example/", "https://xn--bcher-kva.example/"),
        ("https://\uff41\uff50\uff49.x.com/", "https://api.x.com/"),  # fullwidth "api" (UTS #46)
        ("http://[0:0:0:0:0:0:0:1]:8080/x", "http://[::1]:8080/x"),
        ("http://127.0.0.1:80/", "http://127.0.0.1/"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_url(raw).to_url() == expected


@pytest.mark.parametrize(
    "raw",
    [
        "ftp://api.x.com/",
        "api.x.com/v1",
        "/v1",
        "https:///v1",
        "https://user@api.x.com/",
        "https://user:pw@api.x.com/",
        "https://api.x.com@evil.net/",
        "https://api.x.com%2eevil.net/",
        "https://api%2ex%2ecom/",
        "https://api.x.com\\@evil.net/",
        "https://api.x.com\\.evil.net/",
        "https://api.x.com/v1\\..\\admin",
        "https://api.x.com/%zz",
        "https://api.x.com/%4",
        "https://api.x.com:99999/",
        "https://api.x.com:-1/",
        "https://api.x.com:+443/",
        "https://api.x.com:0/",
        "https://api.x.com..",
        "https://./",
        "https://a..b/",
        "https://api.x.com /",
        "https://api.x.com/\tv1",
        "https://api.x.com/v1\n",
        " https://api.x.com/",
        "https://api.x.com\x00.evil.net/",
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://010.0.0.1/",
        # IPv4-mapped IPv6 is one more spelling of an IPv4 address (proxy/hosts.py); it used to
        # normalise to "http://[::ffff:102:304]/", an origin of its own beside http://1.2.3.4/.
        "http://[::FFFF:1.2.3.4]/",
        "http://[::1/",
        "http://[fe80::1%25eth0]/",
        "http://[::1]x/",
        "https://api.x.com\uff0fevil.net/",  # fullwidth solidus maps to "/" under UTS #46
    ],
)
def test_rejected(raw: str) -> None:
    with pytest.raises(ScopeError):
        normalize_url(raw)
    assert not Scope.from_url(BASE).covers(raw)


def test_ideographic_full_stop_is_a_dot() -> None:
    assert normalize_url("https://api.x.com。evil.net/").host == "api.x.com.evil.net"
    assert not Scope.from_url(BASE).covers("https://api.x.com。evil.net/")


# --- the attack matrix --------------------------------------------------------------------------


ROOT = Scope.from_url(BASE)
V1 = Scope.from_url(f"{BASE}/v1")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.x.com.evil.net/",
        "https://api.x.com.evil.net/v1",
        "https://evil.net/api.x.com/",
        "https://evilapi.x.com/",
        "https://x.com/",
        "https://sub.api.x.com/",
        "http://api.x.com/",
        "https://api.x.com:8443/",
        "https://api.x.com:80/",
        "ws://api.x.com/",
        "https://user@api.x.com/",
        "https://api.x.com@evil.net/",
        "https://api.x.com%2eevil.net/",
        "https://api.x.com%2Eevil.net/v1",
        "https://api.x.com\\@evil.net/",
        "https://api.x.com。evil.net/",
        "https://api.x.co/",
        "https://api.x.com.:8443/",
    ],
)
def test_other_origins_never_covered(url: str) -> None:
    assert not ROOT.covers(url)
    assert not V1.covers(url)


@pytest.mark.parametrize(
    ("url", "covered"),
    [
        ("https://api.x.com/v1", True),
        ("https://api.x.com/v1/", True),
        ("https://api.x.com/v1/x", True),
        ("https://api.x.com/v1/x/y?z=1#f", True),
        ("https://API.X.COM./v1/x", True),
        ("https://api.x.com:443/v1", True),
        ("https://api.x.com/v1?x=1", True),
        ("https://api.x.com/%76%31/x", True),  # %76%31 = "v1"
        ("https://api.x.com/v1//x", True),
        ("https://api.x.com/v1/a/../b", True),
        ("https://api.x.com/v10", False),
        ("https://api.x.com/v1x", False),
        ("https://api.x.com/v1.json", False),
        ("https://api.x.com/v1%2Fx", False),  # %2F is not a separator: segment "v1%2Fx"
        ("https://api.x.com/v1%2fx", False),
        ("https://api.x.com/V1", False),  # paths are case-sensitive
        ("https://api.x.com/", False),
        ("https://api.x.com/v1/../admin", False),
        ("https://api.x.com/v1/%2e%2e/admin", False),
        ("https://api.x.com/v1/x/../../admin", False),
        ("https://api.x.com/v2/../v1", True),
        ("https://api.x.com/admin/..%2Fv1", False),  # "..%2Fv1" is one segment, not a dot segment
    ],
)
def test_prefix_segment_boundary(url: str, covered: bool) -> None:
    assert V1.covers(url) is covered


def test_trailing_slash_scope_covers_below_only() -> None:
    s = Scope.from_url(f"{BASE}/v1/")
    assert s.covers(f"{BASE}/v1/")
    assert s.covers(f"{BASE}/v1/x")
    assert s.covers(f"{BASE}/v1/x/y")
    assert not s.covers(f"{BASE}/v1")
    assert not s.covers(f"{BASE}/v10")
    assert ROOT.path == "/"
    assert ROOT.covers(f"{BASE}/anything/at/all?q")


def test_exact_scope() -> None:
    plain = Scope.from_url(f"{BASE}/v1/x", "exact")
    with_query = Scope.from_url(f"{BASE}/v1/x?a=1&b=2", "exact")
    assert plain.covers(f"{BASE}/v1/x")
    assert plain.covers(f"{BASE}/v1/x#frag")
    assert plain.covers(f"{BASE}/v1/x?")
    assert plain.covers("HTTPS://api.X.com:443/v1/%78")
    assert not plain.covers(f"{BASE}/v1/x?a=1")
    assert not plain.covers(f"{BASE}/v1/x/")
    assert not plain.covers(f"{BASE}/v1/x/y")
    assert with_query.covers(f"{BASE}/v1/x?a=1&b=2")
    assert not with_query.covers(f"{BASE}/v1/x?b=2&a=1")  # query compared verbatim
    assert not with_query.covers(f"{BASE}/v1/x")
    assert with_query.query == "a=1&b=2"


def test_idn_equivalence() -> None:
    s = Scope.from_url("https://bücher.example/v1")
    assert s.covers("https://xn--bcher-kva.example/v1/x")
    assert s.covers("https://BÜCHER.example./v1")
    assert not s.covers("https://bucher.example/v1")


def test_ipv6_equivalence() -> None:
    s = Scope.from_url("http://[::1]:8080/")
    assert s.covers("http://[0:0::1]:8080/x")
    assert not s.covers("http://[::2]:8080/x")
    assert not s.covers("http://[::1]/x")


def test_scope_key_to_url_and_validation() -> None:
    assert V1.key == "prefix https://api.x.com/v1"
    assert Scope.from_url(f"{BASE}/a?q=1", "exact").key == "exact https://api.x.com/a?q=1"
    assert Scope.from_url("https://api.x.com:8443/a?q", "prefix").to_url() == "https://api.x.com:8443/a"
    assert V1.origin == ("https", "api.x.com", 443)
    assert {V1, Scope.from_url("https://API.x.com/v1")} == {V1}
    assert Scope.from_url(V1.to_url()) == V1
    with pytest.raises(ScopeError):
        Scope("prefix", ("https", "API.x.com", 443), "/v1")
    with pytest.raises(ScopeError):
        Scope("prefix", ("https", "api.x.com", 443), "/v1/../x")
    with pytest.raises(ScopeError):
        Scope("prefix", ("https", "api.x.com", 443), "/v1", "q=1")
    with pytest.raises(ScopeError):
        Scope("sideways", ("https", "api.x.com", 443), "/v1")  # type: ignore[arg-type]


def test_default_scope_drops_query() -> None:
    s = default_scope(f"{BASE}/v1/chat?model=x")
    assert (s.kind, s.path, s.query) == ("prefix", "/v1/chat", None)
    assert s.covers(f"{BASE}/v1/chat?model=y")
    assert s.covers(f"{BASE}/v1/chat/stream")
    assert not s.covers(f"{BASE}/v1/chatter")


# --- rules --------------------------------------------------------------------------------------


def test_rules_first_match_and_widening() -> None:
    rules = [
        SessionRule(pattern="https://api.x.com/v1/*", scope_url="https://api.x.com/v1/", ttl_seconds=600),
        SessionRule(pattern="https://api.x.com/*", scope_kind="exact"),
    ]
    for r in rules:
        r.validate()
    scope, rule = scope_for(f"{BASE}/v1/chat?x=1", rules)
    assert rule is rules[0] and scope == Scope.from_url(f"{BASE}/v1/")
    scope, rule = scope_for(f"{BASE}/v2/chat?x=1", rules)
    assert rule is rules[1] and scope == Scope.from_url(f"{BASE}/v2/chat?x=1", "exact")
    scope, rule = scope_for("https://other.net/v1/chat", rules)
    assert rule is None and scope == default_scope("https://other.net/v1/chat")


def test_rule_scope_url_must_cover_else_skipped() -> None:
    narrow = SessionRule(pattern="https://api.x.com/*", scope_url="https://api.x.com/v1/")
    narrow.validate()
    scope, rule = scope_for(f"{BASE}/v2/x", [narrow])
    assert rule is None and scope == default_scope(f"{BASE}/v2/x")
    fallback = SessionRule(pattern="https://api.x.com/*", ttl_seconds=60)
    scope, rule = scope_for(f"{BASE}/v2/x", [narrow, fallback])
    assert rule is fallback and scope == default_scope(f"{BASE}/v2/x")


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        ("https://api.x.com/v1/*", "https://api.x.com/v1/", True),
        ("https://api.x.com/v1/*", "https://api.x.com/v1/a/b", True),
        ("https://api.x.com/v1/*", "https://api.x.com/v1", False),
        ("https://api.x.com/v1/*", "https://api.x.com/v10/a", False),
        ("https://api.x.com/v1/*", "https://api.x.com/v1/../admin", False),
        ("https://api.x.com/v1/*", "http://api.x.com/v1/a", False),
        ("https://api.x.com/v1/*", "https://api.x.com:8443/v1/a", False),
        ("https://api.x.com/v1/*", "https://api.x.com.evil.net/v1/a", False),
        ("https://API.x.com:443/v1/*", "https://api.x.com/v1/a", True),
        ("https://*.x.com/*", "https://a.b.x.com/z", True),
        ("https://*.x.com/*", "https://x.com/z", False),
        ("https://*.x.com/*", "https://evil.net/.x.com/", False),
        ("https://*.x.com/*", "https://evilx.com/", False),
        ("https://api.x.com/*/items", "https://api.x.com/v1/items", True),
        ("https://api.x.com", "https://api.x.com/", True),
        ("https://api.x.com", "https://api.x.com/a", False),
    ],
)
def test_pattern_matching(pattern: str, url: str, matches: bool) -> None:
    rule = SessionRule(pattern=pattern)
    rule.validate()
    assert rule.matches(normalize_url(url)) is matches


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "https://api.x.com/*?q=1"}, "pattern"),
        ({"pattern": "https://a*.x.com/*"}, "pattern"),
        ({"pattern": "ftp://api.x.com/*"}, "pattern"),
        ({"pattern": "https://api.x.com/v1/../*"}, "pattern"),
        ({"pattern": "https://api.x.com/*", "scope_kind": "wide"}, "scope_kind"),
        ({"pattern": "https://api.x.com/*", "scope_url": "https://evil.net/"}, "scope_url"),
        ({"pattern": "https://api.x.com/*", "scope_url": "http://api.x.com/"}, "scope_url"),
        ({"pattern": "https://api.x.com/*", "scope_url": "https://u@api.x.com/"}, "scope_url"),
        ({"pattern": "https://api.x.com/*", "scope_url": "https://api.x.com/?q"}, "scope_url"),
        ({"pattern": "https://api.x.com/*", "ttl_seconds": 59}, "ttl_seconds"),
        ({"pattern": "https://api.x.com/*", "ttl_seconds": 2_592_001}, "ttl_seconds"),
        ({"pattern": "https://api.x.com/*", "max_session_payment": "-1"}, "max_session_payment"),
        ({"pattern": "https://api.x.com/*", "max_session_payment": "lots"}, "max_session_payment"),
    ],
)
def test_rule_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SessionValueError) as info:
        SessionRule(**kwargs).validate()  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_rule_valid_examples() -> None:
    SessionRule(pattern="https://*.x.com/*", scope_url="https://a.x.com/v1/").validate()
    SessionRule(pattern="https://api.x.com/v1/*", max_session_payment="0.50", ttl_seconds=60).validate()
    SessionRule(
        pattern="https://api.x.com/v1/x", scope_kind="exact", scope_url="https://api.x.com/v1/x?a"
    ).validate()


def test_rule_loads_as_config_section() -> None:
    from proxy.config_loader import ConfigError, build

    rule = build(SessionRule, {"pattern": "https://api.x.com/v1/*", "ttl_seconds": 120}, {})
    assert rule.ttl_seconds == 120
    with pytest.raises(ConfigError) as info:
        build(SessionRule, {"pattern": "https://api.x.com/*", "ttl_seconds": 5}, {"ttl_seconds": "file:3"})
    assert info.value.key == "ttl_seconds"


# --- properties ---------------------------------------------------------------------------------

HOSTS = [
    "api.x.com",
    "API.x.com",
    "api.x.com.",
    "api.x.com.evil.net",
    "x.com",
    "bücher.example",
    "[::1]",
    "10.0.0.1",
]
SEGMENTS = [
    "v1",
    "v10",
    "V1",
    "a",
    "",
    ".",
    "..",
    "%2e",
    "%2E%2e",
    "%2F",
    "%2f",
    "%7e",
    "~",
    "é",
    "a b",
    "%41",
    "x%2Fy",
]


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "HTTPS"]))
    host = draw(st.sampled_from(HOSTS))
    port = draw(st.sampled_from(["", ":80", ":443", ":8443"]))
    segs = draw(st.lists(st.sampled_from(SEGMENTS), max_size=5))
    path = "".join("/" + s.replace(" ", "%20") for s in segs)
    query = draw(st.sampled_from(["", "?", "?a=1", "?a=1&b=%2F"]))
    frag = draw(st.sampled_from(["", "#f"]))
    return f"{scheme}://{host}{port}{path}{query}{frag}"


def _segments(path: str) -> list[str]:
    return path.split("/")[1:]


@given(urls())
@example("https://api.x.com/a/./b/../c/%2e%2e/")
def test_normalisation_is_idempotent(url: str) -> None:
    n = normalize_url(url)
    assert normalize_url(n.to_url()) == n
    assert normalize_url(str(n)).to_url() == n.to_url()
    assert n.path.startswith("/")
    assert "/./" not in n.path + "/" and "/../" not in n.path + "/"


@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes(text: str) -> None:
    for candidate in (text, BASE + text, BASE + "/" + text, "https://" + text):
        try:
            n = normalize_url(candidate)
        except ScopeError:
            continue
        assert normalize_url(n.to_url()) == n


@given(urls(), urls(), st.sampled_from(["prefix", "exact"]))
def test_covers_never_crosses_origins(scope_url: str, url: str, kind: str) -> None:
    scope = Scope.from_url(scope_url, kind)  # type: ignore[arg-type]
    if scope.covers(url):
        assert normalize_url(url).origin == scope.origin


@given(urls(), st.text(max_size=40))
@example(BASE, ".evil.net/")
@example(BASE, "%2eevil.net/")
@example(BASE, "@evil.net/")
@example(f"{BASE}/v1", "0")
def test_appending_text_never_reaches_another_origin(scope_url: str, suffix: str) -> None:
    # The seed tools' bug was string prefix matching; nothing appended to a scope URL may move it.
    scope = Scope.from_url(scope_url)
    if scope.covers(scope_url + suffix):
        assert normalize_url(scope_url + suffix).origin == scope.origin


@given(urls(), urls())
def test_prefix_covers_iff_segments_start_with_scope_segments(scope_url: str, url: str) -> None:
    scope = Scope.from_url(scope_url, "prefix")
    n = normalize_url(url)
    scope_segs, url_segs = _segments(scope.path), _segments(n.path)
    if scope.path.endswith("/"):
        directory = scope_segs[:-1]  # "/v1/" covers what lies strictly below "/v1"
        expected = url_segs[: len(directory)] == directory and len(url_segs) > len(directory)
    else:
        expected = url_segs[: len(scope_segs)] == scope_segs
    assert scope.covers(n) is (expected and n.origin == scope.origin)


def _rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, written as the spec's loop (a reference for the implementation)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            m = re.match(r"^/?[^/]*", inp)
            assert m is not None
            out += m.group(0)
            inp = inp[m.end() :]
    return out


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "c.d", "..."]), min_size=1, max_size=8))
def test_dot_segment_removal_matches_rfc(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    assert remove_dot_segments(path) == (_rfc_remove_dot_segments(path) or "/")


@settings(max_examples=300)
@given(urls())
def test_host_and_port_agree_with_yarl(url: str) -> None:
    # aiohttp (yarl) is what the proxy connects with: when we accept a URL, we must be naming the
    # host and port it will actually connect to.
    n = normalize_url(url)
    y = yarl.URL(url)
    assume(y.raw_host is not None)
    assert y.raw_host is not None
    host = y.raw_host.rstrip(".").lower()
    assert (n.host.strip("[]"), n.port) == (host, y.port)


def test_normalized_url_is_hashable_and_compact() -> None:
    n = normalize_url(f"{BASE}/v1?q")
    assert isinstance(n, NormalizedURL) and hash(n) == hash(normalize_url(f"{BASE}:443/v1?q"))
    assert n.origin_str == BASE and n.netloc == "api.x.com"
    assert normalize_url("https://api.x.com:8443/").netloc == "api.x.com:8443"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/v1/x", True),
        ("/", True),
        ("/.well-known/x", True),
        ("/v1/a.b/c..d/", True),
        ("/v1/a%2Fb", True),  # one segment, however a server reads %2F: no dot segment appears
        ("/v1/x;jsessionid=1", True),
        ("/v1//x", True),
        ("/v1/x%0D%0A", True),
        ("/t/../v1/x", False),
        ("/t/%2E%2E/v1/x", False),
        ("/t/%2e./v1/x", False),
        ("/v1/./x", False),
        ("/v1/x/..%2F..%2Fadmin", False),
        ("/v1/x/..%5C..%5Cadmin", False),
        ("/v1/x/..;/..;/admin", False),
        ("/v1/x/.;a/b", False),
        ("/v1/x/%252e%252e/admin", False),  # decoded twice by some stacks
        ("/v1/x/..%00/admin", False),
        ("/v1//../admin", False),
        ("/v1/%7euser", False),  # not in normal form (~ is unreserved): fail closed
        ("/v1/%2fx", False),  # lower-case escape: not in normal form
        ("/v1/a|b", False),  # a character the normal form percent-encodes
        ("/v1\\x", False),
    ],
)
def test_path_in_normal_form(raw: str, normal: bool) -> None:
    """Credentials go only with a raw path a server cannot read as another path than the one scoped."""
    assert path_in_normal_form(raw) is normal
