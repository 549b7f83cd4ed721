"""Real clients, configured only by `x402-proxy env`, through the proxy to the tests' own upstreams."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import aiohttp
import httpx
import pytest
import requests

from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


def test_env_prints_every_variable(proxy: ProxyProcess, proxy_env: dict[str, str]) -> None:
    for name in (
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "NODE_USE_ENV_PROXY",
    ):
        assert proxy_env.get(name), name
    assert proxy_env["HTTP_PROXY"] == proxy.url
    bundle = open(proxy_env["SSL_CERT_FILE"]).read()
    ours = open(proxy.home / "ca.pem").read()
    assert ours.strip() in bundle
    assert bundle.count("BEGIN CERTIFICATE") > 10, "bundle must keep the system roots"
    assert proxy.cli("ca", "path").stdout.strip() == str(proxy.home / "ca.pem")
    assert proxy.cli("ca", "export").stdout.strip() == ours.strip()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_curl(proxy_env: dict[str, str], upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    result = subprocess.run(
        ["curl", "-sS", "--fail", f"{base}/echo/curl?x=1"],
        env=proxy_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["path"] == "/echo/curl?x=1"
    assert body["scheme"] == scheme
    headers = dict(body["headers"])
    assert headers["Host"] == base.split("://")[1]
    assert "x402-proxy" in headers["Via"]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_requests(
    proxy_env: dict[str, str], upstream: Upstream, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in proxy_env.items():
        monkeypatch.setenv(name, value)
    base = upstream.http_url if scheme == "http" else upstream.https_url
    with requests.Session() as session:  # trust_env: reads the proxy and CA bundle variables
        for i in range(3):  # keep-alive: several requests on one connection / one tunnel
            response = session.post(f"{base}/echo/req{i}", data=b"hello" * 100, timeout=30)
            assert response.status_code == 200
            assert response.json()["body_len"] == 500


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_httpx(
    proxy_env: dict[str, str], upstream: Upstream, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in proxy_env.items():
        monkeypatch.setenv(name, value)
    base = upstream.http_url if scheme == "http" else upstream.https_url
    with httpx.Client(
        trust_env=True, verify=ssl.create_default_context(cafile=proxy_env["SSL_CERT_FILE"])
    ) as client:
        for i in range(3):
            response = client.get(f"{base}/echo/httpx{i}")
            assert response.status_code == 200, response.text
            assert response.json()["path"] == f"/echo/httpx{i}"


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_aiohttp_trust_env(
    proxy_env: dict[str, str], upstream: Upstream, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in proxy_env.items():
        monkeypatch.setenv(name, value)
    base = upstream.http_url if scheme == "http" else upstream.https_url
    ssl_ctx = ssl.create_default_context(cafile=proxy_env["SSL_CERT_FILE"])
    async with aiohttp.ClientSession(trust_env=True, connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as session:
        for i in range(3):
            async with session.get(f"{base}/echo/aio{i}") as response:
                assert response.status == 200
                assert (await response.json())["path"] == f"/echo/aio{i}"


NODE_FETCH = Path(__file__).parent / "stack" / "clients" / "node_fetch.mjs"


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_node_fetch_env_http_proxy_agent(proxy_env: dict[str, str], upstream: Upstream, scheme: str) -> None:
    base = upstream.http_url if scheme == "http" else upstream.https_url
    env = {"PATH": os.environ["PATH"], **proxy_env}
    result = subprocess.run(
        ["node", str(NODE_FETCH), f"{base}/echo/node", "POST", "from node"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == 200
    echoed = json.loads(answer["body"])
    assert echoed["scheme"] == scheme and echoed["body_len"] == len("from node")
    assert "x402-proxy" in dict(echoed["headers"])["Via"]
