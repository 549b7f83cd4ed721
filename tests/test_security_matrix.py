"""The security matrix (docs/security.md): attacks not already covered end to end elsewhere.

Everything runs for real: a paying proxy subprocess with its admin API, the local x402 stack (chain,
facilitator), and a hostile origin of our own (tests/support/malicious_server.py) that records what
*arrived*. Credential tests assert on what the upstream received, money tests on the chain.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.payments.challenge import MAX_SIGNING_WINDOW
from proxy.payments.signer import CLOCK_SKEW_ALLOWANCE
from tests.stack import PAY_TO_2, Stack
from tests.support import raw
from tests.support.admin import AdminProxy
from tests.support.certs import UpstreamCA
from tests.support.malicious_server import COOKIE_NAME, LEASE_HEADER, Hit, HostileOrigin, bind_twin_ports
from tests.support.paying_proxy import ledger, stack_config

HOME_HOST = "127.0.0.2"  # sells the sessions
OTHER_HOST = "127.0.0.3"
PREFIX_HOST = "127.0.0.20"  # its text starts with HOME_HOST's
MISMATCH_HOST = "127.0.0.4"  # not in the origin's certificate
ERROR = "X-402-Proxy-Error"
SESSION = "X-402-Proxy-Session"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60


@dataclass
class Hostile:
    origin: HostileOrigin
    port: int  # every host listens here, HTTP and HTTPS on the same port
    twin: int  # HOME_HOST only; str(port) is a prefix of str(twin)

    def url(self, scheme: str, host: str = HOME_HOST, path: str = "/", port: int | None = None) -> str:
        return f"{scheme}://{host}:{port or self.port}{path}"


@pytest.fixture(scope="module")
def hostile(
    x402_stack: Stack, upstream_ca: UpstreamCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hostile]:
    cert = upstream_ca.issue(
        tmp_path_factory.mktemp("hostile"), [HOME_HOST, OTHER_HOST, PREFIX_HOST, "localhost"]
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert_path, cert.key_path)
    origin = HostileOrigin(x402_stack, tls, switch_pay_to=PAY_TO_2.address).start()
    port, twin, sockets = bind_twin_ports([HOME_HOST, OTHER_HOST, PREFIX_HOST, MISMATCH_HOST], HOME_HOST)
    for sock in sockets:
        origin.add_front(sock)
    origin.protect("https", port, "/paid/s")
    origin.protect("http", port, "/paid/p")
    yield Hostile(origin, port, twin)
    origin.stop()


@pytest.fixture(scope="module")
def proxy(
    x402_stack: Stack, upstream_ca: UpstreamCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdminProxy]:
    config = stack_config(
        x402_stack,
        policy='daily_budget = "5"\nper_host_daily_budget = "5"',
        upstream_ca=upstream_ca.cert_path,
    )
    home = tmp_path_factory.mktemp("security") / "home"
    process = AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": x402_stack.payer_key}).start()
    yield process
    process.stop()


def get(proxy: AdminProxy, url: str, **kwargs: Any) -> requests.Response:
    """A fresh client each time (no cookie jar carried over), trusting the proxy's CA."""
    proxies = {"http": proxy.url, "https": proxy.url}
    return requests.get(url, proxies=proxies, verify=str(proxy.home / "ca.pem"), timeout=TIMEOUT, **kwargs)


def curl_status(proxy: AdminProxy, url: str) -> int:
    """curl with --path-as-is: dot segments and escapes reach the proxy exactly as written."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            proxy.url,
            "--noproxy",
            "",
            "--cacert",
            str(proxy.home / "ca.pem"),
            "--max-time",
            "30",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return int(result.stdout or "0")


@pytest.fixture(scope="module")
def sold(proxy: AdminProxy, hostile: Hostile) -> dict[str, str]:
    """Two sessions bought for real: https .../paid/s and http .../paid/p on HOME_HOST. Returns scheme -> id."""
    ids = {}
    for scheme, path in (("https", "/paid/s"), ("http", "/paid/p")):
        response = get(proxy, hostile.url(scheme, path=path))
        assert response.status_code == 200, (response.text[:300], proxy.log_text()[-2000:])
        assert response.json() == {"access": "paid"} and PAYMENT in response.headers
        ids[scheme] = response.headers[SESSION]
    assert len(hostile.origin.sales) == 2
    return ids


def assert_clean(hits: list[Hit], origin: HostileOrigin) -> None:
    """No credential header, and no secret the origin issued, anywhere in what arrived."""
    for hit in hits:
        assert not hit.credential_headers(), (hit.origin, hit.raw_path, hit.credential_headers())
        text = json.dumps(hit.headers) + hit.raw_path
        for secret in origin.issued_secrets():
            assert secret not in text, (hit.origin, hit.raw_path)


def assert_carries_session(hit: Hit, origin: HostileOrigin, sale_index: int) -> None:
    """Positive control: an in-scope request does carry every kind of credential."""
    sale = origin.sales[sale_index]
    names = hit.credential_headers()
    assert f"{COOKIE_NAME}={sale.cookie}" in names.get("cookie", ""), names
    assert names.get(LEASE_HEADER.lower()) == sale.lease
    assert {"x-session-token", "x-session-wallet", "payment-session", "sign-in-with-x"} <= set(names), names


# -- credentials never leave their origin -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "path", "sale"), [("https", "/paid/s/in-scope", 0), ("http", "/paid/p/in-scope", 1)]
)
def test_in_scope_request_carries_the_session(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], scheme: str, path: str, sale: int
) -> None:
    start = len(hostile.origin.hits)
    response = get(proxy, hostile.url(scheme, path=path))
    assert response.status_code == 200 and response.headers[SESSION] == sold[scheme]
    [hit] = hostile.origin.hits_since(start)
    assert hit.origin == hostile.url(scheme, path="").rstrip("/")
    assert_carries_session(hit, hostile.origin, sale)


# (description, url template, where it must arrive): {p} = the shared port, {t} = the twin port.
CROSS_ORIGIN_PROBES = [
    ("host whose text extends the session host", "https://127.0.0.20:{p}/paid/s/x", "https://127.0.0.20:{p}"),
    ("another host, same port", "https://127.0.0.3:{p}/paid/s/x", "https://127.0.0.3:{p}"),
    ("port whose text extends the session port", "https://127.0.0.2:{t}/paid/s/x", "https://127.0.0.2:{t}"),
    ("scheme downgrade, same host and port", "http://127.0.0.2:{p}/paid/s/x", "http://127.0.0.2:{p}"),
    ("segment boundary /paid/s vs /paid/sx", "https://127.0.0.2:{p}/paid/sx", "https://127.0.0.2:{p}"),
    ("encoded slash is not a separator", "https://127.0.0.2:{p}/paid/s%2Fx", "https://127.0.0.2:{p}"),
    ("dot segments out of the scope", "https://127.0.0.2:{p}/paid/s/../../x", "https://127.0.0.2:{p}"),
    (
        "encoded dot segments out of the scope",
        "https://127.0.0.2:{p}/paid/s/%2e%2e/%2E%2e/x",
        "https://127.0.0.2:{p}",
    ),
]


@pytest.mark.parametrize(
    ("what", "template", "arrives"), CROSS_ORIGIN_PROBES, ids=[p[0] for p in CROSS_ORIGIN_PROBES]
)
def test_credentials_stay_in_scope(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], what: str, template: str, arrives: str
) -> None:
    start = len(hostile.origin.hits)
    url = template.format(p=hostile.port, t=hostile.twin)
    assert curl_status(proxy, url) == 200, what
    hits = hostile.origin.hits_since(start)
    assert [h.origin for h in hits] == [arrives.format(p=hostile.port, t=hostile.twin)], hits
    assert_clean(hits, hostile.origin)


# Paths whose normal form is inside a session's scope but that a server may route elsewhere: Starlette
# and aiohttp do not remove dot segments, some servers decode %2F or %5C before resolving them, Tomcat
# drops ";params", a server that merges slashes resolves "//.." differently. {s} = the session's path.
AMBIGUOUS_PATHS = [
    ("encoded dot segments into the scope", "/tenant-c/%2E%2E/{s}/x"),
    ("dot segments into the scope", "/tenant-c/../{s}/x"),
    ("encoded slash after dot-dot", "/{s}/..%2F..%2Ftenant-c/x"),
    ("encoded backslash after dot-dot", "/{s}/..%5C..%5Ctenant-c/x"),
    ("path parameter on dot-dot", "/{s}/..;/..;/tenant-c/x"),
    ("empty segment before dot-dot", "/{s}//../tenant-c"),
]


@pytest.mark.parametrize(("scheme", "session_path"), [("https", "paid/s"), ("http", "paid/p")])
@pytest.mark.parametrize(("what", "template"), AMBIGUOUS_PATHS, ids=[p[0] for p in AMBIGUOUS_PATHS])
def test_no_credential_on_a_path_the_server_may_read_differently(
    proxy: AdminProxy,
    hostile: Hostile,
    sold: dict[str, str],
    scheme: str,
    session_path: str,
    what: str,
    template: str,
) -> None:
    """Scope is decided on the dot-segment-resolved path, but the raw path is what is forwarded: a raw
    path not already in normal form goes without any session credential (fail closed). Was: all four
    kinds of credential went along, e.g. to a `/tenant-c/{rest}` handler for `/tenant-c/%2E%2E/paid/s/x`."""
    start = len(hostile.origin.hits)
    path = template.format(s=session_path)
    assert curl_status(proxy, hostile.url(scheme, path=path)) == 200, what
    hits = hostile.origin.hits_since(start)
    assert [h.raw_path for h in hits] == [path], hits  # forwarded as written
    assert_clean(hits, hostile.origin)


@pytest.mark.parametrize("path", ["/paid/s/..%2F..%2Ftenant-c/x", "/paid/s/..;/..;/tenant-c/x"])
@pytest.mark.parametrize("route", ["fetch", "/sessions"])
def test_admin_refuses_a_path_the_server_may_read_differently(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], route: str, path: str
) -> None:
    """The admin API's URL parser resolves plain and %2E dot segments itself (what it sends is what we
    scope); what it leaves (..%2F, ..;) is refused: no credential goes with it, and no session opens on
    it. Was: `fetch` sent the session's credentials along (200)."""
    start = len(hostile.origin.hits)
    url = hostile.url("https", path=path)
    if route == "fetch":
        response = proxy.call("POST", f"/sessions/{sold['https']}/fetch", json={"url": url})
    else:
        response = proxy.call("POST", "/sessions", json={"endpoint": url})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["code"] == "invalid_url", response.json()
    assert hostile.origin.hits_since(start) == []


# Raw absolute-form requests for the http session (/paid/p): userinfo and host spellings no client would send.
RAW_PROBES = [
    ("session origin as userinfo of another host", "http://127.0.0.2:{p}@127.0.0.3:{p}/paid/p/x"),
    ("userinfo on the session origin itself", "http://user:pw@127.0.0.2:{p}/paid/p/x"),
    ("backslash before @", "http://127.0.0.3:{p}\\@127.0.0.2:{p}/paid/p/x"),
    ("decimal IPv4 for the session host", "http://2130706434:{p}/paid/p/x"),
    ("octal-looking IPv4 for the session host", "http://127.0.0.02:{p}/paid/p/x"),
    ("percent-encoded host", "http://127.0.0.%32:{p}/paid/p/x"),
    ("IDN homograph (Cyrillic o), UTF-8", "http://l\u043ecalhost:{p}/paid/p/x"),
    ("IDN homograph, punycode", "http://xn--lcalhost-nbh:{p}/paid/p/x"),
    ("invalid punycode label", "http://xn--lcalhost-9wg:{p}/paid/p/x"),
]


@pytest.mark.parametrize(("what", "template"), RAW_PROBES, ids=[p[0] for p in RAW_PROBES])
def test_odd_authorities_get_no_credentials(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], what: str, template: str
) -> None:
    start = len(hostile.origin.hits)
    target = template.format(p=hostile.port)
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.2:{hostile.port}\r\nConnection: close\r\n\r\n"
    response = raw.exchange(proxy.address, request.encode())
    status = raw.status_of(response)
    hits = hostile.origin.hits_since(start)
    assert_clean(hits, hostile.origin)
    # Either the proxy refused it itself (named), or it went somewhere and arrived without credentials.
    if hits:
        assert status == 200, response[:300]
    else:
        assert status in (400, 502), response[:300]
        assert b"X-402-Proxy-Error" in response, response[:300]
    print(f"{what}: {status} -> {[h.origin for h in hits]}")


@pytest.mark.parametrize(
    ("what", "target"),
    [
        ("another host", "https://127.0.0.3:{p}/landing"),
        ("scheme downgrade", "http://127.0.0.2:{p}/paid/s/landing"),
        ("host whose text extends the session host", "https://127.0.0.20:{p}/paid/s/landing"),
        ("port whose text extends the session port", "https://127.0.0.2:{t}/paid/s/landing"),
        ("same origin, out of scope", "https://127.0.0.2:{p}/landing"),
    ],
)
def test_redirect_out_of_scope_carries_nothing(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], what: str, target: str
) -> None:
    start = len(hostile.origin.hits)
    landing = target.format(p=hostile.port, t=hostile.twin)
    response = get(proxy, hostile.url("https", path="/paid/s/go"), params={"to": landing})
    assert response.status_code == 200 and response.url == landing, what
    first, *rest = hostile.origin.hits_since(start)
    assert first.raw_path.startswith("/paid/s/go?")
    assert_carries_session(first, hostile.origin, 0)  # the redirecting request was in scope
    assert [h.origin + h.raw_path for h in rest] == [landing]
    assert_clean(rest, hostile.origin)


# -- Sign-In-With-X signs for the requesting origin only -----------------------------------------------------


def siwx_payload(hit: Hit) -> dict[str, Any] | None:
    value = hit.credential_headers().get("sign-in-with-x")
    return json.loads(base64.b64decode(value)) if value else None


def test_siwx_answer_signs_only_the_requesting_origins_resources(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str]
) -> None:
    """An in-scope 402 whose SIWX challenge lists another origin's URLs in `resources`: the fallback
    answer (the server's nonce) signs the requesting origin's only. Was: it signed the whole list."""
    start = len(hostile.origin.hits)
    url = hostile.url("http", path="/paid/p/siwx-challenge")
    response = get(proxy, url)
    assert response.status_code == 200 and response.json() == {"access": "siwx"}, response.text[:300]
    answers = [
        payload
        for hit in hostile.origin.hits_since(start)
        if (payload := siwx_payload(hit)) is not None and payload["nonce"] in hostile.origin.siwx_nonces
    ]
    assert [a["resources"] for a in answers] == [[url]], answers
    assert answers[0]["domain"] == f"{HOME_HOST}:{hostile.port}"


def test_a_renewals_unusable_siwx_offer_keeps_the_sessions_parameters(
    proxy: AdminProxy, hostile: Hostile, x402_stack: Stack
) -> None:
    """A renewal (an in-scope 402, paid) whose SIWX offer is bound to the origin but names a chain nobody
    can sign for: the session keeps the parameters it had, and says so in the log. Was: the offer replaced
    them, and proactive SIWX was off for the rest of the session."""
    hostile.origin.protect("http", hostile.port, "/paid/r")
    bought = get(proxy, hostile.url("http", path="/paid/r"))
    assert bought.status_code == 200 and PAYMENT in bought.headers, bought.text[:300]
    session = bought.headers[SESSION]
    renewed = get(proxy, hostile.url("http", path="/paid/r/renew"))
    assert renewed.status_code == 200 and renewed.json() == {"access": "renewed"}, renewed.text[:300]
    assert renewed.headers[SESSION] == session and PAYMENT in renewed.headers
    start = len(hostile.origin.hits)
    after = get(proxy, hostile.url("http", path="/paid/r/after"))
    assert after.status_code == 200 and after.headers[SESSION] == session
    [hit] = hostile.origin.hits_since(start)
    payload = siwx_payload(hit)
    assert payload is not None and payload["chainId"] == x402_stack.network_v2, hit.credential_headers()
    assert f"session {session} keeps its Sign-In-With-X parameters" in proxy.log_text()


# -- request smuggling and header injection -------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 5, 6",
        "Content-Length: +5",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding:\tchunked\r\nContent-Length: 5",
    ],
)
def test_ambiguous_framing_never_reaches_the_upstream(
    proxy: AdminProxy, hostile: Hostile, framing: str
) -> None:
    start = len(hostile.origin.hits)
    smuggled = f"GET {hostile.url('http', OTHER_HOST, '/smuggled')} HTTP/1.1\r\nHost: x\r\n\r\n"
    request = f"POST {hostile.url('http', OTHER_HOST, '/front')} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n0\r\n\r\n{smuggled}"
    response = raw.exchange(proxy.address, request.encode())
    assert hostile.origin.hits_since(start) == [], "an ambiguous request reached the upstream"
    assert raw.status_of(response) >= 400 and b"X-402-Proxy-Error" in response, response[:300]
    assert get(proxy, hostile.url("http", OTHER_HOST, "/after")).status_code == 200


def test_unknown_transfer_coding_is_a_client_error(proxy: AdminProxy, hostile: Hostile) -> None:
    request = (
        f"POST {hostile.url('http', OTHER_HOST, '/front')} HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
    )
    response = raw.exchange(proxy.address, request.encode())
    assert raw.status_of(response) in (400, 501), response[:300]


def test_tunnel_to_invalid_idna_host_is_answered_by_name(proxy: AdminProxy) -> None:
    """CONNECT is accepted first (interception answers 200 before dialling); the request inside the
    tunnel must then get a named answer, not an internal error."""
    with raw.connect(proxy.address) as sock:
        sock.sendall(b"CONNECT xn--lcalhost-9wg:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.read_response(sock).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
        ctx.check_hostname = False  # the leaf's name is not what this test is about
        with ctx.wrap_socket(sock, server_hostname="xn--lcalhost-9wg") as tls:
            tls.sendall(b"GET /x HTTP/1.1\r\nHost: xn--lcalhost-9wg\r\nConnection: close\r\n\r\n")
            response = raw.read_response(tls)
    assert raw.status_of(response) in (400, 502), response[:300]
    assert b"X-402-Proxy-Error" in response and b"internal_error" not in response, response[:300]


@pytest.mark.parametrize(
    ("route", "body", "code"),
    [
        (
            "/sessions",
            {"endpoint": "http://127.0.0.3:{p}/x", "label": "a\r\nX-Injected: 1"},
            "invalid_parameter",
        ),
        ("/sessions", {"endpoint": "http://127.0.0.3:{p}\r\nX-Injected: 1/x"}, "invalid_url"),
        (
            "/sessions",
            {"endpoint": "http://127.0.0.3:{p}/x", "headers": {"X-A": "a\r\nX-Injected: 1"}},
            "invalid_header",
        ),
        (
            "/sessions",
            {"endpoint": "http://127.0.0.3:{p}/x", "headers": {"X-Injected: 1\r\nX-A": "a"}},
            "invalid_header",
        ),
        (
            "fetch",
            {"url": "https://127.0.0.2:{p}/paid/s/x", "headers": {"X-A": "a\r\nX-Injected: 1"}},
            "invalid_header",
        ),
        (
            "fetch",
            {"url": "https://127.0.0.2:{p}/paid/s/x", "headers": {"X-A": "a\nX-Injected: 1"}},
            "invalid_header",
        ),
        ("fetch", {"url": "https://127.0.0.2:{p}/paid/s/x\r\nX-Injected: 1"}, "invalid_url"),
    ],
)
def test_crlf_through_admin_inputs_is_refused(
    proxy: AdminProxy, hostile: Hostile, sold: dict[str, str], route: str, body: dict[str, Any], code: str
) -> None:
    start = len(hostile.origin.hits)
    filled = json.loads(json.dumps(body).replace("{p}", str(hostile.port)))
    path = f"/sessions/{sold['https']}/fetch" if route == "fetch" else route
    response = proxy.call("POST", path, json=filled)
    assert response.status_code == 400, (response.text[:300], hostile.origin.hits_since(start))
    assert response.json()["code"] == code, response.json()
    assert hostile.origin.hits_since(start) == []


@pytest.mark.parametrize(
    "path", ["/x\r\nX-Injected: 1", "/x HTTP/1.1\r\nX-Injected: 1", "/x\nX-Injected: 1", "/x\rX-Injected: 1"]
)
def test_crlf_in_admin_endpoint_splits_nothing(proxy: AdminProxy, hostile: Hostile, path: str) -> None:
    """Observed: the URL parser drops raw CR/LF and encodes the space, so the line stays one request line.
    Whatever the parser does, no header may be injected and no second request may appear."""
    start = len(hostile.origin.hits)
    response = proxy.call("POST", "/sessions", json={"endpoint": hostile.url("http", OTHER_HOST, path)})
    assert response.status_code in (200, 400), response.text[:300]
    hits = hostile.origin.hits_since(start)
    assert len(hits) == (1 if response.status_code == 200 else 0)
    for hit in hits:
        assert "x-injected" not in {name.lower() for name, _ in hit.headers}
        assert "\r" not in hit.raw_path and "\n" not in hit.raw_path
        assert response.json()["session"] is None


def test_encoded_crlf_is_forwarded_encoded(proxy: AdminProxy, hostile: Hostile, sold: dict[str, str]) -> None:
    """%0D%0A in a URL is data, not a line break: it arrives still encoded and injects nothing."""
    start = len(hostile.origin.hits)
    url = hostile.url("https", path="/paid/s/x%0D%0AX-Injected:%201")
    response = proxy.call("POST", f"/sessions/{sold['https']}/fetch", json={"url": url})
    assert response.status_code == 200, response.text[:300]
    [hit] = hostile.origin.hits_since(start)
    assert hit.raw_path == "/paid/s/x%0D%0AX-Injected:%201"
    assert "x-injected" not in {name.lower() for name, _ in hit.headers}


# -- upstream certificates ----------------------------------------------------------------------------------


def test_certificate_for_another_host_is_502_with_reason(proxy: AdminProxy, hostile: Hostile) -> None:
    start = len(hostile.origin.hits)
    response = get(proxy, hostile.url("https", MISMATCH_HOST, "/paid/s"))
    assert response.status_code == 502
    assert response.headers[ERROR] == "upstream_tls_error"
    assert "certificate" in response.text.lower() and MISMATCH_HOST in response.text, response.text
    assert hostile.origin.hits_since(start) == []  # not one request went over the unverified connection


# -- malicious 402s ------------------------------------------------------------------------------------------


@dataclass
class Money:
    """Balances that must not move when the proxy refuses, read from the chain."""

    stack: Stack
    before: dict[str, int]

    @classmethod
    def read(cls, stack: Stack) -> Money:
        accounts = (stack.payer_address, stack.pay_to, PAY_TO_2.address)
        return cls(stack, {a: stack.balance_of(a) for a in accounts})

    def moved(self) -> dict[str, int]:
        return {
            a: self.stack.balance_of(a) - b for a, b in self.before.items() if self.stack.balance_of(a) != b
        }


def signatures(hits: list[Hit]) -> list[dict[str, Any]]:
    return [
        json.loads(base64.b64decode(h.credential_headers()["payment-signature"]))
        for h in hits
        if "payment-signature" in h.credential_headers()
    ]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("huge-amount", "over_max_per_payment"),
        ("amount-over-uint256", "malformed_challenge"),
        ("amount-exponent", "malformed_challenge"),
        ("negative-amount", "malformed_challenge"),
        ("fractional-amount", "malformed_challenge"),
        ("timeout-ten-years", "malformed_challenge"),
        ("timeout-negative", "malformed_challenge"),
        ("unknown-network", "network_not_allowed"),
        ("mainnet-network", "network_not_allowed"),
        ("non-evm-network", "network_not_allowed"),
        # 10 000 full entries are a ~2 MB header: over the upstream client's head limit before parsing.
        ("ten-thousand-accepts", "upstream_bad_response"),
    ],
)
def test_malicious_challenge_is_refused_and_nothing_moves(
    proxy: AdminProxy, hostile: Hostile, x402_stack: Stack, name: str, code: str
) -> None:
    rows, settled, start = len(ledger(proxy)), len(hostile.origin.settlements), len(hostile.origin.hits)
    money = Money.read(x402_stack)
    response = get(proxy, hostile.url("http", OTHER_HOST, f"/hostile/{name}"))
    assert response.status_code == (502 if code == "upstream_bad_response" else 402), response.text[:300]
    assert response.headers.get(ERROR) == code, dict(response.headers)
    assert PAYMENT not in response.headers
    hits = hostile.origin.hits_since(start)
    assert len(hits) == 1 and signatures(hits) == []  # nothing signed was sent
    assert len(hostile.origin.settlements) == settled
    assert len(ledger(proxy)) == rows
    assert money.moved() == {}


def test_thirty_day_timeout_is_paid_with_a_short_authorization(
    proxy: AdminProxy, hostile: Hostile, x402_stack: Stack
) -> None:
    """A long maxTimeoutSeconds is legal; the authorization we sign is still valid for at most an hour."""
    start = len(hostile.origin.hits)
    money = Money.read(x402_stack)
    signed_at = time.time()
    response = get(proxy, hostile.url("http", OTHER_HOST, "/hostile/timeout-thirty-days"))
    assert response.status_code == 200, (response.text[:300], dict(response.headers))
    [payment] = signatures(hostile.origin.hits_since(start))
    valid_before = int(payment["payload"]["authorization"]["validBefore"])
    # The clamped window plus the documented clock-skew allowance: 65 minutes, not 30 days.
    assert valid_before <= signed_at + MAX_SIGNING_WINDOW + CLOCK_SKEW_ALLOWANCE + 5, valid_before - signed_at
    assert money.moved() == {x402_stack.payer_address: -x402_stack.price, x402_stack.pay_to: x402_stack.price}


def test_zero_amount_is_refused_and_nothing_is_signed(
    proxy: AdminProxy, hostile: Hostile, x402_stack: Stack
) -> None:
    """A 0-amount requirement is under every cap, but a zero-value authorization buys nothing (and the
    facilitator would pay gas to settle it): the policy refuses it before anything is signed."""
    rows, settled, start = len(ledger(proxy)), len(hostile.origin.settlements), len(hostile.origin.hits)
    money = Money.read(x402_stack)
    response = get(proxy, hostile.url("http", OTHER_HOST, "/hostile/zero-amount"))
    assert response.status_code == 402, response.text[:300]
    assert response.headers.get(ERROR) == "zero_amount", dict(response.headers)
    assert PAYMENT not in response.headers
    hits = hostile.origin.hits_since(start)
    assert len(hits) == 1 and signatures(hits) == []  # no PAYMENT-SIGNATURE reached the origin
    assert len(hostile.origin.settlements) == settled
    assert len(ledger(proxy)) == rows  # no row: nothing was signed, nothing is pending
    assert money.moved() == {}


def test_pay_to_switched_on_the_paid_retry_gets_no_second_payment(
    proxy: AdminProxy, hostile: Hostile, x402_stack: Stack
) -> None:
    """The server takes the first payment, then asks again naming another payTo: one payment, not two."""
    start, settled = len(hostile.origin.hits), len(hostile.origin.settlements)
    money = Money.read(x402_stack)
    response = get(proxy, hostile.url("http", OTHER_HOST, "/switch"))
    assert response.status_code == 402
    assert response.headers[ERROR] == "payment_rejected", dict(response.headers)
    challenge = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert challenge["accepts"][0]["payTo"] == PAY_TO_2.address  # the client sees the switched demand
    sent = signatures(hostile.origin.hits_since(start))
    assert [p["accepted"]["payTo"] for p in sent] == [x402_stack.pay_to]
    assert len(hostile.origin.settlements) == settled + 1
    assert money.moved() == {x402_stack.payer_address: -x402_stack.price, x402_stack.pay_to: x402_stack.price}
    assert ledger(proxy)[-1]["state"] == "rejected"


# -- files on disk --------------------------------------------------------------------------------------------


def test_home_and_secret_files_are_private(proxy: AdminProxy, sold: dict[str, str]) -> None:
    """After real payments and sessions: the home is 0700 and nothing in it is readable by others."""
    assert stat.S_IMODE(os.stat(proxy.home).st_mode) == 0o700
    modes = {}
    for path in sorted(proxy.home.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        modes[str(path.relative_to(proxy.home))] = oct(mode)
        if path.name in ("ca.pem", "ca-bundle.pem"):
            # Certificates only, public by design (clients must trust them): no key may be in them.
            assert b"PRIVATE KEY" not in path.read_bytes()
            continue
        assert mode & 0o077 == 0, (path, oct(mode))
    for name in ("ca-key.pem", "state.db", "admin-token"):
        assert name in modes and modes[name] == oct(0o600), modes
    print(modes)


# -- secrets never leave -----------------------------------------------------------------------------------------


def test_secrets_absent_from_logs_config_check_and_admin_answers(
    x402_stack: Stack, hostile: Hostile, upstream_ca: UpstreamCA, tmp_path: Path
) -> None:
    key, token, password = x402_stack.payer_key, "admin-token-" + "s" * 24, "proxy-pass-Wq9z!x"
    config = stack_config(
        x402_stack,
        policy='daily_budget = "5"\nper_host_daily_budget = "5"',
        upstream_ca=upstream_ca.cert_path,
        extra=f'[proxy.auth]\nusername = "agent"\npassword = "{password}"\n[log]\nlevel = "debug"\n',
    )
    env = {"X402_PROXY_PRIVATE_KEY": key, "X402_PROXY_ADMIN_TOKEN": token}
    process = AdminProxy(tmp_path / "home", config, env).start()
    answers: list[str] = list(process.startup_lines)
    try:
        authed = process.url.replace("http://", f"http://agent:{password.replace('!', '%21')}@")
        paid = requests.get(
            hostile.url("http", OTHER_HOST, "/hostile/timeout-thirty-days"),
            proxies={"http": authed},
            timeout=TIMEOUT,
        )
        assert paid.status_code == 200, paid.text[:300]
        answers.append(json.dumps(dict(paid.headers)) + paid.text)
        started = process.call("POST", "/sessions", json={"endpoint": hostile.url("https", path="/paid/s")})
        assert started.status_code == 201 and started.json()["session"], started.text[:500]
        session_id = started.json()["session"]["id"]
        calls = [
            ("GET", p, None)
            for p in (
                "/healthz",
                "/readyz",
                "/budget",
                "/payments",
                "/sessions",
                "/metrics",
                "/ca.pem",
                "/openapi.json",
                f"/sessions/{session_id}",
            )
        ]
        calls += [
            ("POST", f"/sessions/{session_id}/fetch", {"url": hostile.url("https", path="/paid/s/x")}),
            ("POST", "/sessions", {"endpoint": "http://127.0.0.1:1/x", "timeout_ms": 1000}),
            ("GET", "/sessions/not-a-session", None),
            ("DELETE", f"/sessions/{session_id}", None),
        ]
        answers.append(json.dumps(dict(started.headers)) + started.text)
        for method, path, body in calls:
            response = process.call(method, path, json=body) if body else process.call(method, path)
            assert response.status_code < 500 or path == "/sessions", (path, response.text[:300])
            answers.append(json.dumps(dict(response.headers)) + response.text)
        checked = process.cli("config", "check")
        answers += [checked.stdout, checked.stderr]
    finally:
        process.stop()
    answers.append(process.log_text())
    everything = "\n".join(answers)
    # We did look at the right text: the wallet was used and config check printed the secrets redacted.
    assert "paying from wallet" in everything and "<redacted>" in checked.stdout
    body = key.removeprefix("0x")
    for secret in (body.lower(), body.upper(), token, password, password.replace("!", "%21")):
        assert secret not in everything, secret[:6]
