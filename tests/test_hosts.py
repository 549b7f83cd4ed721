"""The one canonical host (proxy/hosts.py) and the decisions that compare hosts through it.

The end-to-end proof (a real proxy, clients sending the spellings as written) is
tests/test_canonical_hosts.py; these pin the rule itself and the places that use it.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from proxy.hosts import HostError, NonCanonicalHost, canonical_host, ipv4_meaning, normalize_host
from proxy.payments import policy as policy_module
from proxy.payments.networks import NetworkRegistry
from proxy.payments.policy import Policy, PolicyConfig, host_allowed
from proxy.sessions import scope as scope_module
from proxy.sessions.scope import Scope, ScopeError, normalize_url

SPELLINGS_OF_127_0_0_6 = [
    "2130706438",
    "0x7f000006",
    "0X7F000006",
    "127.6",
    "127.0.6",
    "0177.0.0.6",
    "127.0.0.06",
    "0x7f.0.0.6",
    "127.0.0.6.",  # a trailing dot is removed first: this one *is* canonical
    "[::ffff:127.0.0.6]",
    "::ffff:127.0.0.6",
    "[::FFFF:7f00:6]",
    "[0:0:0:0:0:ffff:7f00:0006]",
]


@pytest.mark.parametrize("text", SPELLINGS_OF_127_0_0_6)
def test_every_spelling_of_an_ipv4_address_means_its_dotted_quad(text: str) -> None:
    if text == "127.0.0.6.":
        assert canonical_host(text) == "127.0.0.6"
    else:
        with pytest.raises(NonCanonicalHost) as caught:
            canonical_host(text)
        assert caught.value.canonical == "127.0.0.6"
        assert "write 127.0.0.6" in str(caught.value)
    assert normalize_host(text) == "127.0.0.6"


@pytest.mark.parametrize("text", ["2130706438", "0x7f000006", "127.6", "0177.0.0.6", "127.0.0.06", "0x7f.1"])
def test_the_meaning_is_what_the_c_library_connects_to(text: str) -> None:
    """inet_aton(3) is what getaddrinfo uses for these: our reading of the address must be the same."""
    assert ipv4_meaning(text) == ipaddress.IPv4Address(socket.inet_aton(text))


@pytest.mark.parametrize("text", ["1.2.3.4.5", "x.08", "127.0.0.08", "4294967296", "256.1.1.1", "a.0x"])
def test_numeric_hosts_that_are_no_address_are_refused_too(text: str) -> None:
    with pytest.raises(NonCanonicalHost) as caught:
        canonical_host(text)
    assert caught.value.canonical is None


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("API.X.com.", "api.x.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--BCHER-kva.example", "xn--bcher-kva.example"),
        ("\uff41\uff50\uff49.x.com", "api.x.com"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("::1", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("localhost", "localhost"),
    ],
)
def test_canonical_forms(text: str, canonical: str) -> None:
    assert canonical_host(text) == canonical
    assert normalize_host(text) == canonical


@pytest.mark.parametrize("text", ["", "a..b", "api.x.com%2e", "[fe80::1%eth0]", "[::1", "a b"])
def test_not_hosts(text: str) -> None:
    with pytest.raises(HostError):
        canonical_host(text)


def test_normalize_host_takes_ports_and_never_raises() -> None:
    assert normalize_host("API.x.com.:443") == "api.x.com"
    assert normalize_host("[0:0::1]:8080") == "::1"
    assert normalize_host("127.6:80") == "127.0.0.6"
    assert normalize_host("A..B") == "a..b"  # no host at all: lower-cased, as before


def test_one_normalize_host() -> None:
    """The policy's name is the same function (payer.py and the ledger use it), and the session scope
    builds on canonical_host: there is no second implementation to drift."""
    assert policy_module.normalize_host is normalize_host
    assert not hasattr(scope_module, "normalize_host")


def compiled(**config: list[str]) -> Policy:
    return Policy.compile(PolicyConfig(**config), NetworkRegistry())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "request_host"),
    [
        ("127.0.0.6", "2130706438"),
        ("127.0.0.6", "[::ffff:127.0.0.6]:443"),
        ("0x7f000006", "127.0.0.6"),  # an odd spelling in the config means its address too
        ("::1", "0:0:0:0:0:0:0:1"),
        ("[::1]", "::1"),  # brackets are not a glob character class here
        ("2001:db8::1", "2001:DB8:0::1"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "bücher.example"),  # yarl's url.host decodes punycode
        ("API.x.com", "api.x.com."),
    ],
)
def test_host_deny_matches_every_spelling(entry: str, request_host: str) -> None:
    """Was: the policy compared lower-cased text, so each of these escaped the deny entry."""
    assert not host_allowed(request_host, compiled(host_deny=[entry]))
    assert host_allowed(request_host, compiled(host_allow=[entry]))


def test_host_globs_match_canonical_hosts() -> None:
    assert not host_allowed("API.Evil.NET.", compiled(host_deny=["*.evil.net"]))
    assert host_allowed("bücher.example", compiled(host_allow=["*.example"]))
    assert not host_allowed("x.com", compiled(host_allow=["*.example"]))


def test_sessions_refuse_every_non_canonical_spelling() -> None:
    session = Scope.from_url("http://127.0.0.6/v1")
    for text in SPELLINGS_OF_127_0_0_6:
        if text == "127.0.0.6.":
            continue
        host = text if text.startswith("[") or ":" not in text else f"[{text}]"
        with pytest.raises(ScopeError):
            normalize_url(f"http://{host}/v1/x")
        assert not session.covers(f"http://{host}/v1/x")
    assert normalize_url("http://[0:0::1]:8080/x").host == "[::1]"
