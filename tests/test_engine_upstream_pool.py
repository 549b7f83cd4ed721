"""The pooled upstream client against raw loopback servers that frame answers oddly or misbehave on purpose.

Every server here is a bare asyncio stream server started by the test, so each test controls exactly
which bytes the "upstream" sends and when it closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.engine.settings import UpstreamSettings
from proxy.engine.upstream import Upstream, UpstreamError, UpstreamRequest
from proxy.engine.upstream_pool import HIGH_WATER, PooledResponse

HOST = "127.0.0.1"


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class RawServer:
    """Calls `behave(conn_no, request_no_on_conn, request, reader, writer)` for every request it reads.

    `behave` returns False to stop serving the connection (the server then closes it).
    """

    behave: Callable[[int, int, Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, path: str = "/", scheme: str = "http") -> URL:
        return URL(f"{scheme}://{HOST}:{self.port}{path}", encoded=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        number = 0
        try:
            while True:
                request = await read_request(reader, conn_no)
                if request is None:
                    break
                number += 1
                self.seen.append(request)
                if not await self.behave(conn_no, number, request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader: asyncio.StreamReader, conn_no: int) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return Seen(method, target, headers, body, conn_no)


def ok(body: bytes = b"hello", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (linger 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def answer(writer: asyncio.StreamWriter, data: bytes) -> bool:
    writer.write(data)
    await writer.drain()
    return True


def upstream(idle_timeout: float = 3.0, connect_timeout: float = 2.0) -> Upstream:
    settings = UpstreamSettings(connect_timeout=connect_timeout, idle_timeout=idle_timeout)
    return Upstream(settings, ssl.create_default_context())


def request(method: str, url: URL, body: bytes | None = None, **headers: str) -> UpstreamRequest:
    return UpstreamRequest(method, url, CIMultiDict(headers), body)


async def fetch(client: Upstream, req: UpstreamRequest, stream: AsyncIterator[bytes] | None = None) -> bytes:
    response = await client.send(req, stream)
    try:
        return await response.read()
    finally:
        response.release()


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(behave: Callable[..., Awaitable[bool]]) -> RawServer:
        server = await RawServer(behave).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def test_keep_alive_reuses_one_connection(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        return await answer(writer, ok(f"{req.target} #{n}".encode()))

    server = await make_server(behave)
    client = upstream()
    for i in range(20):
        assert await fetch(client, request("GET", server.url(f"/r{i}"))) == f"/r{i} #{i + 1}".encode()
    assert server.connections == 1
    assert client.pool.connections_opened == 1
    assert server.seen[0].headers["host"] == f"{HOST}:{server.port}"
    await client.close()


async def test_concurrent_requests_open_parallel_connections_then_reuse_them(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.05)
        return await answer(writer, ok(b"x"))

    server = await make_server(behave)
    client = upstream()
    await asyncio.gather(*(fetch(client, request("GET", server.url())) for _ in range(5)))
    await asyncio.gather(*(fetch(client, request("GET", server.url())) for _ in range(5)))
    assert server.connections == 5
    assert client.pool.idle_count() == 5
    await client.close()


async def test_close_delimited_body(make_server) -> None:  # type: ignore[no-untyped-def]
    body = b"no length, ends at close " * 1000

    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await writer.drain()
        for i in range(0, len(body), 4096):
            writer.write(body[i : i + 4096])
            await writer.drain()
        return False  # close: that is the end of the body

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("GET", server.url()))
    assert response.content_length is None
    assert await response.read() == body
    response.release()
    assert client.pool.idle_count() == 0, "a close-delimited connection is never reused"
    assert await fetch(client, request("GET", server.url())) == body
    assert server.connections == 2
    await client.close()


async def test_close_delimited_body_cut_by_reset_is_an_error(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)
        return False

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("GET", server.url()))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    response.release()
    await client.close()


async def test_chunked_body_assembled_and_connection_reused(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"abc", b"defgh", b"i" * 70000):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        return True

    server = await make_server(behave)
    client = upstream()
    for _ in range(3):
        response = await client.send(request("GET", server.url()))
        assert response.headers["Transfer-Encoding"] == "chunked"
        chunks = [chunk async for chunk in response.content.iter_chunked(1024)]
        assert all(len(chunk) <= 1024 for chunk in chunks)
        assert b"".join(chunks) == b"abcdefgh" + b"i" * 70000
        response.release()
    assert server.connections == 1
    await client.close()


async def test_head_has_no_body_and_the_connection_after_it_stays_usable(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            return await answer(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        return await answer(writer, ok(b"after head"))

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("HEAD", server.url()))
    assert response.content_length == 5000
    assert await response.read() == b""
    response.release()
    assert await fetch(client, request("GET", server.url())) == b"after head"
    assert await fetch(client, request("HEAD", server.url())) == b""
    assert await fetch(client, request("GET", server.url())) == b"after head"
    # A HEAD answer that declares a body is not reused (the server may send that body anyway, later):
    # HEAD on 1, GET on 2, HEAD on 2 (reused after the GET), GET on 3.
    assert server.connections == 3
    await client.close()


async def test_head_answer_without_a_declared_body_keeps_its_connection(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            return await answer(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return await answer(writer, ok(b"after head"))

    server = await make_server(behave)
    client = upstream()
    assert await fetch(client, request("HEAD", server.url())) == b""
    assert await fetch(client, request("GET", server.url())) == b"after head"
    assert server.connections == 1
    await client.close()


async def test_body_sent_late_after_head_response_does_not_leak_into_the_next_answer(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            # Wrong, as aiohttp's StreamResponse does: the body of a HEAD answer, in a later segment,
            # arriving after the client has already sent its next request on this connection.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            await writer.drain()
            asyncio.get_running_loop().call_later(0.2, writer.write, b"WRONG")
            return True
        await asyncio.sleep(0.4)
        return await answer(writer, ok(b"clean"))

    server = await make_server(behave)
    client = upstream()
    assert await fetch(client, request("HEAD", server.url())) == b""
    assert await fetch(client, request("GET", server.url())) == b"clean"
    assert server.connections == 2
    await client.close()


async def test_body_sent_after_head_response_does_not_leak_into_the_next_answer(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        if req.method == "HEAD":
            # Wrong: a body after a HEAD answer, in the same segment.
            return await answer(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
        return await answer(writer, ok(b"clean"))

    server = await make_server(behave)
    client = upstream()
    assert await fetch(client, request("HEAD", server.url())) == b""
    assert await fetch(client, request("GET", server.url())) == b"clean"
    assert server.connections == 2
    await client.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(make_server, status: int) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        if n == 1:
            return await answer(writer, f"HTTP/1.1 {status} X\r\nETag: e\r\n\r\n".encode())
        return await answer(writer, ok(b"next"))

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("GET", server.url()))
    assert response.status == status
    assert await response.read() == b""
    response.release()
    assert await fetch(client, request("GET", server.url())) == b"next"
    assert server.connections == 1
    await client.close()


async def test_interim_responses_are_skipped(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await answer(writer, ok(b"final", "X-Final: 1\r\n"))

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("GET", server.url()))
    assert response.status == 200
    assert response.headers["X-Final"] == "1"
    assert "Link" not in response.headers
    assert await response.read() == b"final"
    response.release()
    await client.close()


async def test_connection_close_answer_is_not_pooled(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await answer(writer, ok(b"bye", "Connection: close\r\n"))
        return False

    server = await make_server(behave)
    client = upstream()
    for _ in range(3):
        assert await fetch(client, request("GET", server.url())) == b"bye"
    assert server.connections == 3
    assert client.pool.idle_count() == 0
    await client.close()


async def test_http10_answer_without_keep_alive_is_not_pooled(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await answer(writer, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True  # keeps the socket open, but HTTP/1.0 without keep-alive means one answer only

    server = await make_server(behave)
    client = upstream()
    assert await fetch(client, request("GET", server.url())) == b"ok"
    assert await fetch(client, request("GET", server.url())) == b"ok"
    assert server.connections == 2
    await client.close()


async def test_idle_connection_closed_by_upstream_leaves_the_pool(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await answer(writer, ok())
        await asyncio.sleep(0.05)
        return False  # close while the client holds the connection idle

    server = await make_server(behave)
    client = upstream()
    await fetch(client, request("GET", server.url()))
    for _ in range(50):
        if client.pool.idle_count() == 0:
            break
        await asyncio.sleep(0.01)
    assert client.pool.idle_count() == 0
    assert await fetch(client, request("GET", server.url())) == b"hello"
    await client.close()


def stale_second_request(
    method_log: list[str],
) -> Callable[[int, int, Seen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]:
    """First connection: answer once, then drop the second request unanswered (a keep-alive race)."""

    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        method_log.append(f"{conn}:{req.method}:{req.body.decode()}")
        if conn == 1 and n == 2:
            writer.transport.abort()
            return False
        return await answer(writer, ok(f"c{conn}".encode()))

    return behave


async def test_stale_reused_connection_retries_idempotent_request(make_server) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []
    server = await make_server(stale_second_request(log))
    client = upstream()
    assert await fetch(client, request("GET", server.url())) == b"c1"
    assert await fetch(client, request("GET", server.url())) == b"c2"
    assert log == ["1:GET:", "1:GET:", "2:GET:"]
    await client.close()


async def test_stale_reused_connection_retries_post_with_its_body(make_server) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []
    server = await make_server(stale_second_request(log))
    client = upstream()
    assert await fetch(client, request("POST", server.url(), b"first")) == b"c1"
    assert await fetch(client, request("POST", server.url(), b"second")) == b"c2"
    assert log == ["1:POST:first", "1:POST:second", "2:POST:second"]
    assert server.seen[-1].headers["content-length"] == "6"
    await client.close()


@pytest.mark.parametrize("header", ["PAYMENT-SIGNATURE", "X-PAYMENT", "payment-signature"])
async def test_payment_carrying_request_is_never_sent_twice(make_server, header: str) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []
    server = await make_server(stale_second_request(log))
    client = upstream()
    assert await fetch(client, request("GET", server.url())) == b"c1"
    paid = request("GET", server.url(), **{header: "signed"})
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, paid)
    assert failure.value.reason_code == "upstream_disconnected"
    assert failure.value.status == 502
    assert log == ["1:GET:", "1:GET:"], "the paid request reached the upstream exactly once"
    await client.close()


async def test_sign_in_with_x_request_may_be_retried_on_stale_connection(make_server) -> None:  # type: ignore[no-untyped-def]
    """A resent SIWX proof moves no money, so it rides the ordinary keep-alive race retry."""
    log: list[str] = []
    server = await make_server(stale_second_request(log))
    client = upstream()
    assert await fetch(client, request("GET", server.url())) == b"c1"
    assert await fetch(client, request("GET", server.url(), **{"SIGN-IN-WITH-X": "proof"})) == b"c2"
    assert log == ["1:GET:", "1:GET:", "2:GET:"]
    await client.close()


async def test_fresh_connection_failure_retries_get_but_not_post(make_server) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []

    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        log.append(f"{conn}:{req.method}")
        if conn == 1:
            writer.transport.abort()
            return False
        return await answer(writer, ok(b"second try"))

    server = await make_server(behave)
    client = upstream()
    assert await fetch(client, request("GET", server.url())) == b"second try"
    assert log == ["1:GET", "2:GET"]

    await client.close()
    log.clear()
    server.connections = 0
    client = upstream()  # nothing pooled: the POST goes out on a fresh connection
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("POST", server.url(), b"once"))
    assert failure.value.reason_code == "upstream_disconnected"
    assert log == ["1:POST"], "a non-idempotent request on a fresh connection is not retried"
    await client.close()


async def test_no_retry_once_part_of_the_answer_arrived(make_server) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []

    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        log.append(req.method)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        await asyncio.sleep(0.02)
        return False

    server = await make_server(behave)
    client = upstream()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", server.url()))
    assert failure.value.reason_code == "upstream_disconnected"
    assert log == ["GET"]
    await client.close()


async def test_streamed_request_body_is_never_retried(make_server) -> None:  # type: ignore[no-untyped-def]
    log: list[str] = []
    server = await make_server(stale_second_request(log))
    client = upstream()
    assert await fetch(client, request("PUT", server.url(), b"a")) == b"c1"

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    with pytest.raises(UpstreamError):
        await fetch(client, request("PUT", server.url()), body())
    assert [entry.split(":")[0] for entry in log] == ["1", "1"]
    await client.close()


async def test_streamed_request_bodies_chunked_or_with_length(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        framing = "chunked" if req.headers.get("transfer-encoding") == "chunked" else "length"
        return await answer(writer, ok(f"{framing}:{len(req.body)}".encode()))

    server = await make_server(behave)
    client = upstream()

    async def body(parts: int) -> AsyncIterator[bytes]:
        for _ in range(parts):
            yield b"z" * 100_000
            await asyncio.sleep(0)

    assert await fetch(client, request("POST", server.url()), body(30)) == b"chunked:3000000"
    sized = request("POST", server.url(), **{"Content-Length": "3000000"})
    assert await fetch(client, sized, body(30)) == b"length:3000000"
    assert server.connections == 1
    await client.close()


async def test_early_answer_while_uploading(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        return await answer(writer, ok(b"too large", "Connection: close\r\n"))

    async def raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw_server, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    client = upstream()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield b"u" * 65536
            await asyncio.sleep(0.001)

    response = await client.send(request("POST", URL(f"http://{HOST}:{port}/up")), body())
    assert response.status == 413
    assert await response.read() == b"too large"
    response.release()
    server.close()
    await client.close()


async def test_large_body_pauses_reading_and_arrives_intact(make_server) -> None:  # type: ignore[no-untyped-def]
    size = 8 * 1024 * 1024
    block = bytes(range(256)) * 256

    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        return True

    server = await make_server(behave)
    client = upstream()
    response = await client.send(request("GET", server.url()))
    assert isinstance(response, PooledResponse)
    await asyncio.sleep(0.3)  # let the upstream fill our buffer while nobody reads
    assert response._size <= HIGH_WATER + 512 * 1024, "reading must pause while the consumer is behind"
    received = hashlib.sha256()
    async for chunk in response.content.iter_chunked(256 * 1024):
        assert len(chunk) <= 256 * 1024
        received.update(chunk)
        await asyncio.sleep(0)
    assert received.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()
    response.release()
    assert client.pool.idle_count() == 1
    await client.close()


async def test_silent_upstream_times_out(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await asyncio.sleep(5)
        return False

    server = await make_server(behave)
    client = upstream(idle_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", server.url()))
    assert failure.value.reason_code == "upstream_timeout"
    assert failure.value.status == 504
    assert 0.4 < time.monotonic() - started < 2
    await client.close()


async def test_silence_mid_body_times_out(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)
        return False

    server = await make_server(behave)
    client = upstream(idle_timeout=0.5)
    response = await client.send(request("GET", server.url()))
    with pytest.raises(TimeoutError):
        await response.read()
    response.release()
    await client.close()


async def test_tls_handshake_that_never_completes_is_a_connect_timeout(make_server) -> None:  # type: ignore[no-untyped-def]
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(hold, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    client = upstream(connect_timeout=0.5)
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", URL(f"https://{HOST}:{port}/")))
    assert failure.value.reason_code == "upstream_connect_timeout"
    assert failure.value.status == 504
    server.close()
    await client.close()


async def test_refused_connection_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    client = upstream()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", URL(f"http://{HOST}:{port}/")))
    assert failure.value.reason_code == "upstream_unreachable"
    assert "cannot connect" in failure.value.message
    await client.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO WORLD\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_invalid_answers_are_bad_responses(make_server, garbage: bytes) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        await answer(writer, garbage)
        await asyncio.sleep(0.1)
        return False

    server = await make_server(behave)
    client = upstream()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", server.url()))
    assert failure.value.reason_code == "upstream_bad_response"
    await client.close()


async def test_header_injection_is_refused_before_sending(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        return await answer(writer, ok())

    server = await make_server(behave)
    client = upstream()
    with pytest.raises(UpstreamError) as failure:
        await fetch(client, request("GET", server.url(), **{"X-Evil": "a\r\nX-Injected: 1"}))
    assert failure.value.status == 400
    assert server.connections == 0
    await client.close()


async def test_request_head_is_what_the_client_sent(make_server) -> None:  # type: ignore[no-untyped-def]
    async def behave(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
        return await answer(writer, ok())

    server = await make_server(behave)
    client = upstream()
    await fetch(client, request("GET", server.url("/p%20q?x=1&y=%2F"), **{"X-A": "1"}))
    await fetch(client, request("POST", server.url("/empty")))
    seen_get, seen_post = server.seen
    assert seen_get.target == "/p%20q?x=1&y=%2F"
    assert set(seen_get.headers) == {"host", "x-a"}, "no invented User-Agent, Accept, ..."
    assert seen_post.headers["content-length"] == "0"
    await client.close()


def test_same_behaviour_on_uvloop() -> None:
    """The proxy runs on uvloop; the suite's loop is asyncio's. Replay the core cases there."""
    import uvloop

    outcome: list[BaseException | None] = []

    async def scenario() -> None:
        log: list[str] = []
        server = await RawServer(stale_second_request(log)).start()
        client = upstream()
        assert await fetch(client, request("GET", server.url())) == b"c1"
        assert await fetch(client, request("GET", server.url())) == b"c2"
        paid = request("GET", server.url(), **{"X-PAYMENT": "p"})
        assert await fetch(client, paid) == b"c2"
        assert log == ["1:GET:", "1:GET:", "2:GET:", "2:GET:"]
        await client.close()
        await server.stop()

        async def chunked(conn, n, req, reader, writer):  # type: ignore[no-untyped-def]
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            await writer.drain()
            return True

        server = await RawServer(chunked).start()
        client = upstream()
        for _ in range(3):
            assert await fetch(client, request("GET", server.url())) == b"abc"
        assert server.connections == 1
        await client.close()
        await server.stop()

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(scenario())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert outcome == [None], outcome
