"""One canonical host everywhere (proxy/hosts.py): another spelling of an IPv4 address never gets past
the front door, so it cannot escape `host_deny`, open a per-host budget of its own, or name a host
the policy, the ledger, the sessions and the log would each read differently.

`2130706438`, `0x7f000006`, `127.6`, `0177.0.0.6`, `127.0.0.06` and `[::ffff:127.0.0.6]` all connect
to 127.0.0.6. curl rewrites them; Python clients send them as written (httpx below, raw sockets for
the two httpx itself refuses), in an absolute-form target and as a CONNECT authority. Everything is
real: a paying proxy subprocess, the local x402 stack, and a hostile origin on 127.0.0.6 that sells
access for real money and records what arrived.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack
from tests.support import raw
from tests.support.admin import AdminProxy
from tests.support.certs import UpstreamCA
from tests.support.malicious_server import HostileOrigin, bind_twin_ports
from tests.support.paying_proxy import ledger, stack_config

HOST = "127.0.0.6"
FORMS = ["2130706438", "0x7f000006", "127.6", "0177.0.0.6", "127.0.0.06", "[::ffff:127.0.0.6]"]
ERROR = "X-402-Proxy-Error"
SCHEMES = ["http", "https"]  # http: absolute-form target; https: the CONNECT authority


@pytest.fixture(scope="module")
def origin(
    x402_stack: Stack, upstream_ca: UpstreamCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HostileOrigin, int]]:
    cert = upstream_ca.issue(tmp_path_factory.mktemp("canonical-origin"), [HOST])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert_path, cert.key_path)
    hostile = HostileOrigin(x402_stack, tls, switch_pay_to=x402_stack.pay_to).start()
    port, _twin, sockets = bind_twin_ports([HOST], HOST)
    for sock in sockets:
        hostile.add_front(sock)
    for scheme in SCHEMES:
        for path in ("/paid/a", "/paid/b"):
            hostile.protect(scheme, port, path)
    yield hostile, port
    hostile.stop()


def start_proxy(stack: Stack, upstream_ca: UpstreamCA, home: Path, policy: str) -> AdminProxy:
    config = stack_config(stack, policy=policy, upstream_ca=upstream_ca.cert_path)
    return AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()


def send(proxy: AdminProxy, scheme: str, host: str, port: int, path: str) -> tuple[int, str]:
    """GET scheme://host:port/path through the proxy with the host exactly as written: (status, error code).

    httpx when it can, raw sockets otherwise: httpx refuses "0177.0.0.6" and "127.0.0.06" itself, and
    writes an IPv6 literal without its brackets in an absolute-form target (`GET http://::ffff:...`).
    For https the status is the CONNECT answer's when that is not 200, else the answer inside the tunnel.
    """
    try:
        httpx.URL(f"{scheme}://{host}:{port}{path}")
    except httpx.InvalidURL:
        return send_raw(proxy, scheme, host, port, path)
    if scheme == "http" and host.startswith("["):
        return send_raw(proxy, scheme, host, port, path)
    verify = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
    verify.check_hostname = False  # the leaf names what the client wrote; that is not under test here
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=60) as client:
        try:
            response = client.get(f"{scheme}://{host}:{port}{path}")
        except httpx.ProxyError as exc:  # the CONNECT was refused: read its answer from the raw socket
            assert scheme == "https", exc
            return send_raw(proxy, scheme, host, port, path)
        return response.status_code, response.headers.get(ERROR, "")


def send_raw(proxy: AdminProxy, scheme: str, host: str, port: int, path: str) -> tuple[int, str]:
    if scheme == "http":
        request = (
            f"GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        )
        return _parsed(raw.exchange(proxy.address, request.encode()))
    with raw.connect(proxy.address, timeout=60) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = raw.read_response(sock)
        if raw.status_of(answer) != 200:
            return _parsed(answer)
        ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
        ctx.check_hostname = False
        with ctx.wrap_socket(sock, server_hostname=HOST) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            return _parsed(raw.read_response(tls))


def _parsed(response: bytes) -> tuple[int, str]:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    code = next(
        (
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith(ERROR.lower())
        ),
        "",
    )
    return raw.status_of(response), code


@pytest.fixture(scope="module")
def deny_proxy(
    x402_stack: Stack, upstream_ca: UpstreamCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdminProxy]:
    home = tmp_path_factory.mktemp("canonical-deny") / "home"
    process = start_proxy(x402_stack, upstream_ca, home, f'host_deny = ["{HOST}"]\ndaily_budget = "5"')
    yield process
    process.stop()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_host_deny_holds_for_the_canonical_address(
    deny_proxy: AdminProxy, origin: tuple[HostileOrigin, int], scheme: str
) -> None:
    """Positive control: the deny entry does refuse the dotted quad (the 402 is passed on, nothing paid)."""
    hostile, port = origin
    start = len(hostile.hits)
    assert send(deny_proxy, scheme, HOST, port, "/paid/a") == (402, "host_not_allowed")
    assert len(hostile.hits_since(start)) == 1 and ledger(deny_proxy) == []


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_other_spellings_of_a_denied_address_are_refused_before_anything_is_sent(
    deny_proxy: AdminProxy, origin: tuple[HostileOrigin, int], x402_stack: Stack, scheme: str, form: str
) -> None:
    """Was: each spelling reached 127.0.0.6 and the plain-HTTP ones were paid, host_deny notwithstanding."""
    hostile, port = origin
    start, settled = len(hostile.hits), len(hostile.settlements)
    paid_before = x402_stack.balance_of(x402_stack.pay_to)
    assert send(deny_proxy, scheme, form, port, "/paid/a") == (400, "non_canonical_host")
    assert hostile.hits_since(start) == []  # nothing reached the address
    assert len(hostile.settlements) == settled and ledger(deny_proxy) == []
    assert x402_stack.balance_of(x402_stack.pay_to) == paid_before


def test_one_per_host_budget_for_every_spelling(
    x402_stack: Stack, upstream_ca: UpstreamCA, origin: tuple[HostileOrigin, int], tmp_path: Path
) -> None:
    """A per-host budget that fits one payment: spent at 127.0.0.6, no other spelling opens a fresh one."""
    hostile, port = origin
    price = Decimal(x402_stack.price).scaleb(-x402_stack.token_decimals)
    proxy = start_proxy(
        x402_stack, upstream_ca, tmp_path / "home", f'per_host_daily_budget = "{price}"\ndaily_budget = "5"'
    )
    try:
        assert send(proxy, "http", HOST, port, "/paid/a") == (200, "")
        for scheme in SCHEMES:
            for form in FORMS:
                start = len(hostile.hits)
                assert send(proxy, scheme, form, port, "/paid/b") == (400, "non_canonical_host"), (
                    scheme,
                    form,
                )
                assert hostile.hits_since(start) == [], (scheme, form)
        # The canonical address is out of budget: the only host the ledger and the budget know.
        assert send(proxy, "http", HOST, port, "/paid/b") == (402, "budget_exhausted")
        rows = ledger(proxy)
        assert [(r["host"], r["state"]) for r in rows] == [(HOST, "settled")], rows
        assert set(proxy.call("GET", "/budget").json()["hosts"]) == {HOST}
    finally:
        proxy.stop()
    # The access log names the canonical host on every line, the refused absolute-form spellings
    # included (a refused CONNECT gets no access line: docs/logs.md). Read once the proxy has stopped:
    # access lines are written in batches (docs/logs.md), the last ones at exit.
    lines = [line for line in proxy.log_text().splitlines() if "x402_proxy.access" in line]
    assert len([line for line in lines if "error=non_canonical_host" in line]) == len(FORMS), lines
    assert all(f"host={HOST} " in line for line in lines), lines


@pytest.mark.parametrize("form", ["2130706438", "127.6", "[::ffff:127.0.0.6]"])
def test_admin_endpoints_follow_the_same_rule(
    deny_proxy: AdminProxy, origin: tuple[HostileOrigin, int], form: str
) -> None:
    """`POST /sessions` sends its endpoint through the stages without the front door: the same refusal."""
    hostile, port = origin
    start = len(hostile.hits)
    response = deny_proxy.call("POST", "/sessions", json={"endpoint": f"http://{form}:{port}/paid/a"})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["code"] == "non_canonical_host", response.json()
    assert hostile.hits_since(start) == [] and ledger(deny_proxy) == []
