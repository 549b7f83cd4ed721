"""CONNECT: interception, upstream verification, passthrough, port policy, bad TLS input."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest
import requests

from tests.conftest import proxy_config
from tests.support import raw
from tests.support.certs import UpstreamCA
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


def tunnel(proxy: ProxyProcess, target: str) -> socket.socket:
    sock = raw.connect(proxy.address)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    reply = raw.read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert b"content-length" not in reply.lower()
    return sock


def test_intercepted_leaf_verifies_strictly_and_keeps_alive(proxy: ProxyProcess, upstream: Upstream) -> None:
    target = upstream.https_url.split("://")[1]
    ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 does by default
    with tunnel(proxy, target) as sock, ctx.wrap_socket(sock, server_hostname="127.0.0.2") as tls:
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        for i in range(3):
            tls.sendall(f"GET /echo/inside{i} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            response = raw.read_response(tls)
            assert raw.status_of(response) == 200
            assert f"/echo/inside{i}".encode() in response


def test_leaf_for_dns_name(proxy: ProxyProcess, upstream: Upstream) -> None:
    port = upstream.https_url.rsplit(":", 1)[1]
    ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
    with (
        tunnel(proxy, f"localhost:{port}") as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        cert = tls.getpeercert()
        assert ("DNS", "localhost") in cert["subjectAltName"]


def test_untrusted_upstream_certificate_is_502(proxy: ProxyProcess, upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cafile=str(proxy.home / "ca.pem"))
    with httpx.Client(proxy=proxy.url, verify=ctx) as client:
        response = client.get(f"{upstream.bad_tls_url}/echo/x")
    assert response.status_code == 502
    assert response.headers["X-402-Proxy-Error"] == "upstream_tls_error"
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "certificate verification failed" in response.text


def test_garbage_instead_of_client_hello(proxy: ProxyProcess, upstream: Upstream) -> None:
    with tunnel(proxy, upstream.https_url.split("://")[1]) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n" * 4)
        sock.settimeout(5)
        try:
            leftover = sock.recv(100)
        except ConnectionResetError:
            leftover = b""
        assert b"HTTP/1.1 200" not in leftover
    response = requests.get(f"{upstream.http_url}/echo/after", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 200


def test_bad_connect_requests(proxy: ProxyProcess, upstream: Upstream) -> None:
    assert raw.status_of(raw.exchange(proxy.address, b"CONNECT nohostport HTTP/1.1\r\n\r\n")) == 400
    assert raw.status_of(raw.exchange(proxy.address, b"CONNECT a:b:c:d HTTP/1.1\r\n\r\n")) == 400
    own = raw.exchange(proxy.address, f"CONNECT {proxy.address} HTTP/1.1\r\n\r\n".encode())
    assert raw.status_of(own) == 400 and b"self_target" in own
    response = requests.get(f"{upstream.http_url}/echo/after", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 200


@pytest.fixture(scope="module")
def strict_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA, upstream: Upstream
) -> Iterator[ProxyProcess]:
    """Default CONNECT ports (443, 8443), and the upstream's host tunnelled raw."""
    home = tmp_path_factory.mktemp("strict") / "home"
    config = (
        f'[proxy]\npassthrough_hosts = ["127.0.0.*"]\nconnect_ports = ["443", "{upstream.https_url.rsplit(":", 1)[1]}"]\n'
        f'[upstream]\nextra_ca_bundle = "{upstream_ca.cert_path}"\n'
    )
    process = ProxyProcess(home, config).start()
    yield process
    process.stop()


def test_connect_port_outside_allowed_list_is_403(strict_proxy: ProxyProcess) -> None:
    response = raw.exchange(strict_proxy.address, b"CONNECT 127.0.0.2:22 HTTP/1.1\r\n\r\n")
    assert raw.status_of(response) == 403
    assert b"connect_port_not_allowed" in response


def test_passthrough_host_is_not_intercepted(
    strict_proxy: ProxyProcess, upstream: Upstream, upstream_ca: UpstreamCA
) -> None:
    target = upstream.https_url.split("://")[1]
    # Trusting only the upstream's own CA proves the certificate came from the origin, not from us.
    ctx = ssl.create_default_context(cafile=str(upstream_ca.cert_path))
    with tunnel(strict_proxy, target) as sock, ctx.wrap_socket(sock, server_hostname="127.0.0.2") as tls:
        tls.sendall(f"GET /echo/raw HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        response = raw.read_response(tls)
    assert raw.status_of(response) == 200
    assert "Via" not in dict(upstream.last("/echo/raw").headers)


def test_config_file_written_by_fixture_is_valid(upstream_ca: UpstreamCA) -> None:
    assert "[upstream]" in proxy_config(upstream_ca)
