"""Access control: proxy auth, loopback-only default, refusing an open relay."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import requests

from tests.support import raw
from tests.support.certs import UpstreamCA
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("auth") / "home"
    config = (
        '[proxy]\nconnect_ports = ["*"]\n[proxy.auth]\nusername = "agent"\npassword = "s3cret:pw"\n'
        f'[upstream]\nextra_ca_bundle = "{upstream_ca.cert_path}"\n'
    )
    process = ProxyProcess(home, config).start()
    yield process
    process.stop()


def test_missing_or_wrong_credentials_get_407(auth_proxy: ProxyProcess, upstream: Upstream) -> None:
    for proxy_url in (auth_proxy.url, auth_proxy.url.replace("http://", "http://agent:wrong@")):
        response = requests.get(f"{upstream.http_url}/echo/a", proxies={"http": proxy_url}, timeout=10)
        assert response.status_code == 407
        assert response.headers["Proxy-Authenticate"].startswith("Basic")
    connect = raw.exchange(auth_proxy.address, b"CONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\n")
    assert raw.status_of(connect) == 407
    assert b"Proxy-Authenticate: Basic" in connect


def test_right_credentials_pass_and_are_not_forwarded(auth_proxy: ProxyProcess, upstream: Upstream) -> None:
    url = auth_proxy.url.replace("http://", "http://agent:s3cret%3Apw@")
    response = requests.get(f"{upstream.http_url}/echo/authed", proxies={"http": url}, timeout=10)
    assert response.status_code == 200
    assert "Proxy-Authorization" not in dict(upstream.last("/echo/authed").headers)
    token = base64.b64encode(b"agent:s3cret:pw").decode()
    with raw.connect(auth_proxy.address) as sock:
        sock.sendall(f"CONNECT 127.0.0.2:443 HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode())
        assert raw.read_response(sock).startswith(b"HTTP/1.1 200")


def test_env_includes_credentials_for_auth_proxy(auth_proxy: ProxyProcess) -> None:
    exports = auth_proxy.env_exports()
    assert exports["HTTP_PROXY"].startswith("http://agent:s3cret%3Apw@127.0.0.1:")


def test_non_loopback_listen_without_auth_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    process = ProxyProcess(tmp_path / "home", "")
    result = process.cli("run", "--listen", "0.0.0.0:0", check=False)
    assert result.returncode == 2
    assert "non-loopback" in result.stderr and "proxy.listen" in result.stderr


def test_invalid_config_names_key_and_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    process = ProxyProcess(tmp_path / "home", '[proxy]\n\nmax_header_bytes = "lots"\n')
    result = process.cli("config", "check", check=False)
    assert result.returncode == 2
    assert "proxy.max_header_bytes" in result.stderr
    assert f"{process.config_path}:3" in result.stderr
