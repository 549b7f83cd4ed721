"""HTTP/1.1 proxy semantics over real sockets: headers, framing, 100-continue, loops, failures."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import requests

from tests.support import raw
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


def assert_still_serving(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = requests.get(f"{upstream.http_url}/echo/alive", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 200
    assert response.json()["path"] == "/echo/alive"


def test_hop_by_hop_headers_stripped_and_via_added(proxy: ProxyProcess, upstream: Upstream) -> None:
    host = upstream.http_url.split("://")[1]
    request = (
        f"GET {upstream.http_url}/echo/hop HTTP/1.1\r\nHost: wrong.example\r\nConnection: keep-alive, X-Secret\r\n"
        "X-Secret: must-not-pass\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\nX-Kept: yes\r\nVia: 1.0 other\r\n\r\n"
    ).encode()
    response = raw.exchange(proxy.address, request)
    assert raw.status_of(response) == 200, response[:300]
    received = dict(upstream.last("/echo/hop").headers)
    assert received["Host"] == host  # regenerated from the absolute target, not the client's Host
    assert received["X-Kept"] == "yes"
    for name in ("X-Secret", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "TE"):
        assert name not in received, name
    assert received["Via"] == "1.0 other, 1.1 x402-proxy"


def test_content_length_with_transfer_encoding_rejected(proxy: ProxyProcess, upstream: Upstream) -> None:
    before = len(upstream.received)
    request = (
        f"POST {upstream.http_url}/echo/smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ).encode()
    response = raw.exchange(proxy.address, request)
    assert raw.status_of(response) == 400
    assert len(upstream.received) == before, "an ambiguous request must never reach the upstream"
    assert_still_serving(proxy, upstream)


def test_duplicate_content_length_rejected(proxy: ProxyProcess, upstream: Upstream) -> None:
    request = (
        f"POST {upstream.http_url}/echo/dup HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ).encode()
    assert raw.status_of(raw.exchange(proxy.address, request)) == 400
    assert_still_serving(proxy, upstream)


def test_expect_100_continue(proxy: ProxyProcess, upstream: Upstream) -> None:
    body = b"z" * 100_000
    with raw.connect(proxy.address) as sock:
        sock.sendall(
            f"PUT {upstream.http_url}/echo/continue HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        response = raw.read_response(sock)
    assert raw.status_of(response) == 200
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["body_len"] == len(body)
    assert "Expect" not in dict(upstream.last("/echo/continue").headers)


def test_curl_large_upload_uses_expect(proxy: ProxyProcess, upstream: Upstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    payload = tmp_path / "upload.bin"
    payload.write_bytes(b"q" * (3 * 1024 * 1024))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "-x",
            proxy.url,
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{payload}",
            f"{upstream.http_url}/upload",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["body_len"] == 3 * 1024 * 1024


def test_request_to_proxy_itself_refused(proxy: ProxyProcess, upstream: Upstream) -> None:
    for target in (f"http://{proxy.address}/x", f"http://localhost:{proxy.port}/x"):
        response = raw.exchange(proxy.address, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert raw.status_of(response) == 400
        assert b"self_target" in response
    looped = raw.exchange(
        proxy.address,
        f"GET {upstream.http_url}/echo HTTP/1.1\r\nHost: x\r\nVia: 1.1 x402-proxy\r\n\r\n".encode(),
    )
    assert raw.status_of(looped) == 508


def test_origin_form_request_explained(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = raw.exchange(proxy.address, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.status_of(response) == 400
    assert b"forward proxy" in response


def test_malformed_request_line(proxy: ProxyProcess, upstream: Upstream) -> None:
    for garbage in (
        b"NOT A REQUEST\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
    ):
        response = raw.exchange(proxy.address, garbage)
        assert raw.status_of(response) == 400 or response == b"", response[:200]
        assert b"Traceback" not in response
        assert_still_serving(proxy, upstream)


def test_oversized_headers_get_431(proxy: ProxyProcess, upstream: Upstream) -> None:
    big = "a" * 40_000
    response = raw.exchange(
        proxy.address, f"GET {upstream.http_url}/echo HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode()
    )
    assert raw.status_of(response) == 431
    connect = raw.exchange(proxy.address, f"CONNECT 127.0.0.2:443 HTTP/1.1\r\nX-Big: {big}\r\n\r\n".encode())
    assert raw.status_of(connect) == 431
    assert_still_serving(proxy, upstream)


def test_client_vanishes_mid_body(proxy: ProxyProcess, upstream: Upstream) -> None:
    for _ in range(3):
        with raw.connect(proxy.address) as sock:
            sock.sendall(
                f"POST {upstream.http_url}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n".encode()
                + b"x" * 50_000
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert_still_serving(proxy, upstream)


def test_upstream_reset_is_502(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = requests.get(f"{upstream.http_url}/reset", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 502
    assert response.headers["X-402-Proxy-Error"] == "upstream_disconnected"
    assert "closed the connection" in response.text
    assert_still_serving(proxy, upstream)


def test_upstream_down_is_502_with_reason(proxy: ProxyProcess, upstream: Upstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        dead_port = sock.getsockname()[1]
    response = requests.get(f"http://127.0.0.2:{dead_port}/x", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 502
    assert response.headers["X-402-Proxy-Error"] == "upstream_unreachable"
    assert "cannot connect" in response.text


def test_upstream_silence_is_504(proxy: ProxyProcess, upstream: Upstream) -> None:
    started = time.monotonic()
    response = requests.get(f"{upstream.http_url}/slow?seconds=8", proxies={"http": proxy.url}, timeout=20)
    assert response.status_code == 504
    assert response.headers["X-402-Proxy-Error"] == "upstream_timeout"
    assert time.monotonic() - started < 7  # idle_timeout is 3 s in the test config


def test_body_cut_mid_stream_closes_client(proxy: ProxyProcess, upstream: Upstream) -> None:
    with raw.connect(proxy.address) as sock:
        sock.sendall(f"GET {upstream.http_url}/cut HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = raw.read_response(sock, limit=4 << 20)
    assert data.startswith(b"HTTP/1.1 200")
    assert len(data.split(b"\r\n\r\n", 1)[1]) < 1024 * 1024, (
        "a truncated body must end in a close, not padding"
    )
    assert_still_serving(proxy, upstream)


def test_head_and_204_have_no_body(proxy: ProxyProcess, upstream: Upstream) -> None:
    head = requests.head(f"{upstream.http_url}/bytes?size=5000", proxies={"http": proxy.url}, timeout=10)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "5000"
    assert head.content == b""
    no_content = requests.get(f"{upstream.http_url}/status/204", proxies={"http": proxy.url}, timeout=10)
    assert no_content.status_code == 204
    assert no_content.content == b""
