"""Protocol upgrades on the one client-side request path: a WebSocket goes through the upstream pool and is
spliced after its 101; any other `Upgrade` is ignored (RFC 9110 7.8) and the request is served as HTTP/1.1;
a CONNECT inside a connection is refused."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import time

from tests.support import raw
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def read_exactly(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"connection closed in a head: {data!r}")
        data += chunk
    return data


def read_answer(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One answer framed by Content-Length: (head, body)."""
    head = read_head(sock)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, read_exactly(sock, length)


def masked_text(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket | ssl.SSLSocket) -> tuple[int, bytes]:
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    assert not second & 0x80, "a server frame is never masked"
    if length == 126:
        length = int.from_bytes(read_exactly(sock, 2), "big")
    return first & 0x0F, read_exactly(sock, length)


def ws_handshake(target: str, authority: str, key: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n{extra}\r\n"
    ).encode()


def test_request_pipelined_after_h2c_upgrade_is_answered(proxy: ProxyProcess, upstream: Upstream) -> None:
    """`Upgrade: h2c` is ignored: the request is served as HTTP/1.1, and so is the request behind it."""
    authority = upstream.http_url.split("/")[2]
    h2c = (
        f"GET {upstream.http_url}/echo/h2c HTTP/1.1\r\nHost: {authority}\r\n"
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    after = f"GET {upstream.http_url}/echo/after-h2c HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    with raw.connect(proxy.address, timeout=5) as sock:
        sock.sendall((h2c + after).encode())
        first_head, first = read_answer(sock)
        second_head, second = read_answer(sock)
    assert first_head.startswith(b"HTTP/1.1 200 "), first_head
    assert json.loads(first)["path"] == "/echo/h2c"
    assert second_head.startswith(b"HTTP/1.1 200 "), second_head
    assert json.loads(second)["path"] == "/echo/after-h2c"
    received = dict(upstream.last("/echo/h2c").headers)
    for name in ("Upgrade", "HTTP2-Settings"):  # hop-by-hop: the offer is not passed on
        assert name not in received, name


def test_upgrade_offer_with_a_body_is_served_with_its_body(proxy: ProxyProcess, upstream: Upstream) -> None:
    """llhttp would read the body as the new protocol; ignoring the offer keeps it the request's body."""
    authority = upstream.http_url.split("/")[2]
    post = (
        f"POST {upstream.http_url}/echo/upgrade-body HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\n"
        "Connection: upgrade\r\nUpgrade: foo/1\r\n\r\nhello"
    )
    after = f"GET {upstream.http_url}/echo/after-body HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    with raw.connect(proxy.address, timeout=5) as sock:
        sock.sendall((post + after).encode())
        _, first = read_answer(sock)
        _, second = read_answer(sock)
    assert json.loads(first)["body_len"] == 5
    assert json.loads(first)["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert json.loads(second)["path"] == "/echo/after-body"


def test_websocket_is_spliced_end_to_end(proxy: ProxyProcess, upstream: Upstream) -> None:
    """The upgrade reaches the upstream as the client sent it (its own key), and frames pass untouched."""
    authority = upstream.http_url.split("/")[2]
    key = base64.b64encode(os.urandom(16)).decode()
    with raw.connect(proxy.address, timeout=10) as sock:
        sock.sendall(ws_handshake(f"{upstream.http_url}/ws", authority, key) + masked_text("early"))
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 "), head
        lines = {
            k.strip().lower(): v.strip()
            for k, _, v in (x.decode().partition(":") for x in head.split(b"\r\n")[1:])
        }
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert lines["sec-websocket-accept"] == expected
        assert lines["upgrade"].lower() == "websocket" and lines["connection"].lower() == "upgrade"
        assert lines["sec-websocket-protocol"] == "chat"
        # Sent with the handshake, before the 101: it waited in the proxy and reached the upstream after it.
        assert read_frame(sock) == (1, b"echo:early")
        got = len(head) + 2 + len(b"echo:early")
        for text in ("one", "two"):
            sock.sendall(masked_text(text))
            assert read_frame(sock) == (1, f"echo:{text}".encode())
            got += 2 + len(f"echo:{text}")
        sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))  # close, no payload
        while chunk := sock.recv(65536):  # the upstream's close frame, then the end of the relay
            got += len(chunk)
    received = dict(upstream.last("/ws").headers)
    assert received["Sec-WebSocket-Key"] == key
    assert received["Via"] == "1.1 x402-proxy"
    # One access line once the relay has ended: status 101, and every byte the client got.
    deadline = time.monotonic() + 10
    ws_lines: list[str] = []
    while not ws_lines and time.monotonic() < deadline:
        time.sleep(0.05)
        ws_lines = [
            line for line in proxy.log_text().splitlines() if " x402_proxy.access GET 127.0.0.2 101 " in line
        ]
    assert len(ws_lines) == 1, proxy.log_text()[-2000:]
    assert f" status=101 bytes={got} " in ws_lines[0]


def test_refused_websocket_answer_is_relayed_and_the_connection_goes_on(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    authority = upstream.http_url.split("/")[2]
    key = base64.b64encode(os.urandom(16)).decode()
    after = f"GET {upstream.http_url}/echo/after-refusal HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    with raw.connect(proxy.address, timeout=5) as sock:
        # The second request is only read once the upgrade is known to be refused.
        sock.sendall(ws_handshake(f"{upstream.http_url}/status/403", authority, key) + after.encode())
        head, body = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 403 "), head
        assert body == b"status page\n"
        head, body = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert json.loads(body)["path"] == "/echo/after-refusal"


def test_websocket_to_an_unreachable_upstream_is_502(proxy: ProxyProcess) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        closed = probe.getsockname()[1]  # nothing listens here once the probe is closed
    key = base64.b64encode(os.urandom(16)).decode()
    response = raw.exchange(
        proxy.address, ws_handshake(f"http://127.0.0.2:{closed}/ws", f"127.0.0.2:{closed}", key)
    )
    assert raw.status_of(response) == 502
    assert b"X-402-Proxy-Error: upstream_unreachable" in response


def test_connect_after_the_first_request_is_refused_and_closes(
    proxy: ProxyProcess, upstream: Upstream
) -> None:
    authority = upstream.http_url.split("/")[2]
    first = f"GET {upstream.http_url}/echo/before-connect HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\nnot http at all"
    with raw.connect(proxy.address, timeout=5) as sock:
        sock.sendall((first + connect).encode())
        head, _ = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        head, _ = read_answer(sock)
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"X-402-Proxy-Error: bad_request_target" in head
        assert sock.recv(100) == b""  # what follows a CONNECT is not HTTP: the connection ends
