"""Fuzzing the HTTP front door: a real proxy process fed malformed request heads over raw sockets.

Every generated head (request lines, header names and values with CR/LF/NUL, huge tokens, bad
CONNECT targets, garbage bytes) must get a clean answer: a 4xx, a deliberate proxy error (5xx only
with ``X-402-Proxy-Error``, never a bare 500), an upstream's normal answer, or a close - never a
traceback and never a hang. Right after each one a good request must succeed, and at the end the
proxy must still be running with no unhandled exception in its log.

Loopback only: every URL authority and CONNECT target the fuzzer writes is a loopback literal or
one the proxy must refuse before using it; ``assert_loopback_only`` checks each payload before it
is sent, so no generated request can make the proxy resolve or reach another address.
"""

from __future__ import annotations

import re
import socket
import time

from hypothesis import assume, given
from hypothesis import strategies as st

from tests.fuzz_profiles import sized
from tests.support import raw
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream

HANG_LIMIT = 8.0  # seconds; the test config's upstream idle timeout is 3 s
LOG_ALARMS = ("Traceback", "Error handling request", "Unhandled exception", "CONNECT handling failed")
BAD_AUTHORITY_CHARS = set("/\\@ \t?#")

# --- loopback guard ------------------------------------------------------------------------------

_URL_AUTHORITY = re.compile(rb"://([^/?#\s]*)")
_CONNECT_TARGET = re.compile(rb"CONNECT[ \t]+(\S*)", re.IGNORECASE)
LOOPBACK_HOSTS = (b"127.0.0.2", b"127.0.0.1", b"[::1]")


def _harmless_authority(authority: bytes) -> bool:
    host = authority.rsplit(b"@", 1)[-1]
    if host.startswith(b"["):
        return host.split(b"]", 1)[0] + b"]" == b"[::1]"
    return host.split(b":", 1)[0] in (*LOOPBACK_HOSTS, b"")


def assert_loopback_only(payload: bytes) -> None:
    """Refuse to send anything naming a host other than a loopback literal (see module docstring)."""
    for match in _URL_AUTHORITY.finditer(payload):
        assert _harmless_authority(match.group(1)), payload[:200]
    for match in _CONNECT_TARGET.finditer(payload):
        target = match.group(1)
        refused_early = any(chr(c) in BAD_AUTHORITY_CHARS for c in target) or not target
        assert refused_early or _harmless_authority(target), payload[:200]


def loopback_only(payload: bytes) -> bool:
    try:
        assert_loopback_only(payload)
    except AssertionError:
        return False
    return True


# --- strategies ----------------------------------------------------------------------------------

NASTY = ["\r", "\n", "\r\n", "\x00", "\x7f", " ", "\t", ":", "\xff", "é", "\r\n ", "\r\n\r\n"]
HUGE = [20_000, 70_000]


def nasty_text(max_size: int = 30) -> st.SearchStrategy[str]:
    return st.lists(
        st.sampled_from(NASTY) | st.text(alphabet=st.characters(codec="latin-1"), max_size=6),
        max_size=max_size // 3,
    ).map("".join)


def token(usual: list[str]) -> st.SearchStrategy[str]:
    """A usual value, a nasty one, or a huge one."""
    return st.one_of(
        st.sampled_from(usual),
        st.sampled_from(usual),
        nasty_text(),
        st.builds(lambda n, c: c * n, st.sampled_from(HUGE), st.sampled_from(["a", "%", "/"])),
    )


HEADER_NAMES = [
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Upgrade",
    "Expect",
    "Via",
    "Proxy-Authorization",
    "X-Fuzz",
    "Te",
    "Content-Type",
]
HEADER_VALUES = [
    "x",
    "0",
    "-1",
    "abc",
    "5, 5",
    "chunked",
    "gzip, chunked",
    "chunked, gzip",
    "close",
    "keep-alive, X-Fuzz",
    "websocket",
    "100-continue",
    "1.1 x402-proxy",
    "Basic Zm9vOmJhcg==",
    "",
]
HEADERS = st.lists(
    st.tuples(token(HEADER_NAMES), st.sampled_from([":", ": ", " : ", ":\t", ""]), token(HEADER_VALUES)),
    max_size=5,
)


def render_headers(headers: list[tuple[str, str, str]]) -> str:
    return "".join(f"{name}{sep}{value}\r\n" for name, sep, value in headers)


@st.composite
def request_heads(draw: st.DrawFn, upstream_authority: str) -> bytes:
    method = draw(token(["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "get", "PRI", "G ET"]))
    scheme = draw(st.sampled_from(["http", "http", "https", "ws", "HTTP", "ftp", ""]))
    authority = draw(
        st.sampled_from(
            [upstream_authority] * 4
            + [
                "127.0.0.2:99999",
                "127.0.0.2:0",
                "127.0.0.2:abc",
                "[::1",
                "[::1]x",
                "",
                "127.0.0.2:-1",
                "[::1]:1",
            ]
        )
    )
    path = draw(token(["/echo/fuzz", "/echo/fuzz?a=1", "", "/", "/%", "/%zz", "/a b", "/\u00e9"]))
    if path and not path.startswith("/"):
        path = "/" + path
    target = draw(
        st.sampled_from([f"{scheme}://{authority}{path}"] * 6 + ["*", "/", "", "http://", path, f"//{path}"])
    )
    version = draw(
        token(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "http/1.1", "HTTP/9", "HTTP/1.12"])
    )
    space = draw(st.sampled_from([" ", " ", "  ", "\t"]))
    line_end = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    head = f"{method}{space}{target}{space}{version}{line_end}{render_headers(draw(HEADERS))}\r\n"
    payload = head.encode("utf-8", "surrogateescape")
    assume(b"CONNECT" not in payload.upper() and loopback_only(payload))
    return payload


@st.composite
def connect_heads(draw: st.DrawFn, upstream_https: str, proxy_address: str) -> bytes:
    target = draw(
        st.sampled_from(
            [
                upstream_https,
                proxy_address,
                "",
                "127.0.0.2",
                "127.0.0.2:",
                "127.0.0.2:0",
                "127.0.0.2:99999",
                "127.0.0.2:-1",
                "127.0.0.2:abc",
                "127.0.0.2:\u0664\u0664\u0663",
                "[::1",
                "[::1]x",
                "[zz]:443",
                ":443",
                "127.0.0.2:443/x",
                "user@127.0.0.2:443",
                "127.0.0.2:443?x",
                "a" * 20_000,
            ]
        )
        | nasty_text().map(lambda t: t + "/")  # a "/" anywhere makes the target refused before use
    )
    version = draw(token(["HTTP/1.1", "HTTP/1.0", "HTTP/2", ""]))
    extra = draw(st.sampled_from(["", "", "early tunnel bytes", "\x16\x03\x01\x00\x05hello"]))
    head = f"CONNECT {target} {version}\r\n{render_headers(draw(HEADERS))}\r\n{extra}"
    payload = head.encode("utf-8", "surrogateescape")
    assume(loopback_only(payload))
    return payload


GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n"),
    st.builds(
        lambda m, b: m + b + b"\r\n\r\n", st.sampled_from([b"GET ", b"POST ", b"\x16\x03\x01"]), st.binary()
    ),
    st.sampled_from([b"\r\n" * 5000, b"\x00" * 70_000, b"G" * 70_000, b" " * 20_000 + b"\r\n\r\n"]),
).filter(lambda b: b"CONNECT" not in b.upper() and b"://" not in b)


# --- the probe -----------------------------------------------------------------------------------


def probe(address: str, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload``, half-close, read whatever comes back until the proxy closes."""
    assert_loopback_only(payload)
    started = time.monotonic()
    with raw.connect(address, timeout=HANG_LIMIT + 2) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # no more bytes are coming: the proxy must not wait for any
        except OSError:
            pass  # the proxy refused and closed while we were still sending: a clean close
        response = raw.read_response(sock)
    return response, time.monotonic() - started


def assert_clean(payload: bytes, response: bytes, elapsed: float) -> None:
    shown = f"sent {payload[:120]!r}... got {response[:300]!r}"
    assert elapsed < HANG_LIMIT, f"hung {elapsed:.1f}s: {shown}"
    assert b"Traceback" not in response, shown
    if not response:
        return  # a close is a clean answer
    assert response.startswith(b"HTTP/1."), shown
    status = raw.status_of(response)
    assert 100 <= status < 600 and status != 500, shown
    if status >= 500:
        assert b"\r\nX-402-Proxy-Error: " in response.split(b"\r\n\r\n", 1)[0], (
            f"undeclared {status}: {shown}"
        )


def assert_still_serving(proxy: ProxyProcess, upstream: Upstream) -> None:
    assert proxy.proc is not None and proxy.proc.poll() is None, "the proxy process died"
    good = f"GET {upstream.http_url}/echo/alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    response = raw.exchange(proxy.address, good)
    assert raw.status_of(response) == 200, response[:300]


def assert_log_clean(proxy: ProxyProcess, since: int) -> None:
    """No unhandled exception logged after offset ``since`` (the proxy is shared by this module)."""
    log = proxy.log_text()[since:]
    for alarm in LOG_ALARMS:
        assert alarm not in log, log[log.find(alarm) - 500 : log.find(alarm) + 2500]


# --- properties ----------------------------------------------------------------------------------


def test_malformed_request_heads(proxy: ProxyProcess, upstream: Upstream) -> None:
    authority = upstream.http_url.split("://", 1)[1]

    @sized(short=60, long=5_000)
    @given(request_heads(authority))
    def run(payload: bytes) -> None:
        response, elapsed = probe(proxy.address, payload)
        assert_clean(payload, response, elapsed)
        assert_still_serving(proxy, upstream)

    log_start = len(proxy.log_text())
    run()
    assert_log_clean(proxy, log_start)


def test_bad_connect_requests(proxy: ProxyProcess, upstream: Upstream) -> None:
    upstream_https = upstream.https_url.split("://", 1)[1]

    @sized(short=40, long=3_000)
    @given(connect_heads(upstream_https, proxy.address))
    def run(payload: bytes) -> None:
        response, elapsed = probe(proxy.address, payload)
        assert_clean(payload, response, elapsed)
        assert_still_serving(proxy, upstream)

    log_start = len(proxy.log_text())
    run()
    assert_log_clean(proxy, log_start)


def test_garbage_bytes(proxy: ProxyProcess, upstream: Upstream) -> None:
    @sized(short=40, long=3_000)
    @given(GARBAGE)
    def run(payload: bytes) -> None:
        response, elapsed = probe(proxy.address, payload)
        assert_clean(payload, response, elapsed)
        if response:
            assert raw.status_of(response) in (400, 414, 431), response[:300]
        assert_still_serving(proxy, upstream)

    log_start = len(proxy.log_text())
    run()
    assert_log_clean(proxy, log_start)


def test_the_loopback_guard_refuses_other_hosts() -> None:
    # The guard is what keeps this fuzzer on loopback: it must catch a smuggled second request.
    smuggled = b"GET http://127.0.0.2:1/a HTTP/1.1\r\n\r\nGET http://example.com/ HTTP/1.1\r\n\r\n"
    assert not loopback_only(smuggled)
    assert not loopback_only(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert not loopback_only(b"CONNECT example.com:443 HTTP/1.1\r\n\r\nGET http://127.0.0.2/ HTTP/1.1")
    assert loopback_only(b"CONNECT a/b:443 HTTP/1.1\r\n\r\n") and loopback_only(
        b"GET http://[::1]:80/ HTTP/1.1"
    )
