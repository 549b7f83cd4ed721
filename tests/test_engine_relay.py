"""What the proxy writes back: relayed heads are the upstream's (minus hop-by-hop), bodies byte-exact."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from tests.support import raw
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


class BareOrigin:
    """A socket server answering every request on a connection with the same fixed bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def bare_origin() -> Iterator[type[BareOrigin]]:
    made: list[BareOrigin] = []

    class Made(BareOrigin):
        def __init__(self, answer: bytes) -> None:
            super().__init__(answer)
            made.append(self)

    yield Made
    for origin in made:
        origin.close()


def head_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head}


def test_nothing_invented_and_date_added_when_missing(proxy: ProxyProcess, bare_origin) -> None:  # type: ignore[no-untyped-def]
    origin = bare_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Origin: yes\r\n\r\nabc")
    response = raw.exchange(
        proxy.address, f"GET http://127.0.0.2:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    headers = head_of(response)
    assert response.endswith(b"\r\n\r\nabc")
    assert headers["x-origin"] == "yes"
    assert headers["content-length"] == "3"
    assert "date" in headers, "a forwarded answer without Date gets one (RFC 9110 6.6.1)"
    assert "server" not in headers and "content-type" not in headers, "the proxy adds no Server/Content-Type"


def test_small_chunked_answer_relayed_whole(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = requests.get(
        f"{upstream.http_url}/bytes?size=3000&chunked=1", proxies={"http": proxy.url}, timeout=10
    )
    assert response.status_code == 200
    assert response.content == (bytes(range(256)) * 12)[:3000]


def test_hop_by_hop_response_headers_removed(proxy: ProxyProcess, bare_origin) -> None:  # type: ignore[no-untyped-def]
    origin = bare_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
        b"Keep-Alive: timeout=5\r\nX-End: kept\r\n\r\nok"
    )
    response = raw.exchange(
        proxy.address, f"GET http://127.0.0.2:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    headers = head_of(response)
    assert headers["x-end"] == "kept"
    for name in ("x-hop", "keep-alive", "connection"):
        assert name not in headers, name


def test_http10_client_gets_http10_framing(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = raw.exchange(
        proxy.address, f"GET {upstream.http_url}/echo/ten HTTP/1.0\r\nHost: x\r\n\r\n".encode()
    )
    assert response.startswith(b"HTTP/1.0 200")
    assert "connection" not in head_of(response) or head_of(response)["connection"].lower() == "close"
    with raw.connect(proxy.address) as sock:
        request = f"GET {upstream.http_url}/echo/ten HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
        sock.sendall(request.encode())
        first = raw.read_response(sock)
        assert head_of(first)["connection"].lower() == "keep-alive"
        sock.sendall(request.encode())
        assert raw.status_of(raw.read_response(sock)) == 200


def test_client_connection_close_is_honoured(proxy: ProxyProcess, upstream: Upstream) -> None:
    response = raw.exchange(
        proxy.address,
        f"GET {upstream.http_url}/echo/c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert head_of(response)["connection"].lower() == "close"


def test_compressed_request_body_passes_untouched(proxy: ProxyProcess, upstream: Upstream) -> None:
    plain = b"hello world " * 1000
    body = gzip.compress(plain)
    response = requests.post(
        f"{upstream.http_url}/upload",
        data=body,
        headers={"Content-Encoding": "gzip"},
        proxies={"http": proxy.url},
        timeout=10,
    )
    # The test origin decompresses what it receives: it can only do so if the proxy did not already.
    assert response.status_code == 200
    assert response.json()["body_len"] == len(plain)
    assert response.json()["body_sha256"] == hashlib.sha256(plain).hexdigest()


def test_compressed_answer_passes_untouched(proxy: ProxyProcess, bare_origin) -> None:  # type: ignore[no-untyped-def]
    payload = gzip.compress(b"compressed " * 500)
    origin = bare_origin(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    response = raw.exchange(
        proxy.address, f"GET http://127.0.0.2:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert head_of(response)["content-encoding"] == "gzip"
    assert response.split(b"\r\n\r\n", 1)[1] == payload


def test_stage_headers_replace_upstream_ones_and_last_wins() -> None:
    from proxy.engine.responses import serialize_head

    head = serialize_head(
        (1, 1),
        402,
        "Payment Required",
        [("X-402-Proxy-Error", "from-upstream"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")],
        set(),
        [("X-402-Proxy-Error", "first"), ("x-402-proxy-error", "second")],
        0,
        True,
    )
    assert head is not None
    lines = head.decode().split("\r\n")
    assert [line for line in lines if line.lower().startswith("x-402-proxy-error")] == [
        "x-402-proxy-error: second"
    ]
    assert lines.count("Set-Cookie: a=1") == 1 and lines.count("Set-Cookie: b=2") == 1


def test_header_with_line_break_is_never_written() -> None:
    from proxy.engine.responses import serialize_head

    for bad in ("a\r\nInjected: 1", "a\nb", "a\rb", "a\x00b"):
        assert serialize_head((1, 1), 200, "OK", [], set(), [("X-Bad", bad)], 0, True) is None
