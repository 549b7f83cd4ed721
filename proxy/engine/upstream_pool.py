"""A small pooled HTTP/1.1 client for upstream requests: one asyncio.Protocol per upstream connection.

aiohttp's ClientSession builds a request object, a connector lease, timers and a response object per
request; for a proxy that only moves bytes that machinery dominates the cost of a small request. This
client keeps what a proxy needs and nothing else:

* connections pooled per (scheme, host, port), reused most-recently-used first, closed after
  `IDLE_KEEPALIVE` seconds unused or when the upstream closes them;
* the request head built and written in one call (with a small body in the same write);
* responses parsed by llhttp (httptools): Content-Length, chunked and close-delimited bodies,
  HEAD/204/304 without body, interim 1xx responses skipped, `Connection: close` honoured;
* bounded buffering: reading from the upstream pauses while the consumer is behind;
* connect timeout (TCP + TLS) and an idle timeout that bounds silence while someone waits for data;
* at most one retry, on a fresh connection, when a connection died before any response byte arrived,
  and only for requests that are safe to send twice (see `Upstream.send`);
* protocol upgrades (a WebSocket): an exchange that offers one may get a 101, whose connection then
  leaves the pool with the bytes that followed the head (`PooledResponse.take_upgraded`).

The connection is returned to the pool when its response body has been read to the end (or on
`release()` if the message was complete); anything else closes it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final

import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.engine.flow_control import WriteFlow
from proxy.engine.http_semantics import is_own_listener

IDLE_KEEPALIVE: Final = 30.0  # seconds an unused upstream connection is kept
MAX_IDLE_PER_KEY: Final = 256
# Upstream reads pause above HIGH_WATER buffered body bytes and resume below LOW_WATER.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
# Bodies up to this size go out in the same write as the request head.
_COALESCE_BODY: Final = 64 * 1024
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# Every control byte but HT; head lines may contain only their own terminating CRLF.
_CONTROL_BYTES: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
_HEAD_END: Final = (b"\r\n\r\n", b"\n\n", b"\n\r\n")

PoolKey = tuple[str, str, int]


class ResponseHeadError(Exception):
    """The upstream's answer could not be parsed or was not acceptable."""


class NoResponseError(Exception):
    """The connection ended before a single response byte arrived (safe-to-retry territory)."""

    def __init__(self, message: str, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class SelfTargetError(Exception):
    """The upstream connection reached one of the proxy's own listeners."""


class DisconnectedError(Exception):
    """The connection ended after part of the response head arrived."""


class HeadTimeoutError(TimeoutError):
    """No response head within the idle timeout."""


class RequestBodyError(Exception):
    """The request body could not be sent (the client's stream failed or was short)."""


class RequestHeadError(ValueError):
    """A header name or value would break the request framing."""


class _HeadDone(Exception):
    """Raised from the parser callback to stop at the end of a HEAD response's head."""


class _Extraneous(Exception):
    """The upstream sent bytes after a complete response."""


class PooledResponse:
    """An upstream response; satisfies `proxy.engine.exchange.UpstreamResponse`."""

    __slots__ = (
        "_body",
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_size",
        "_upgraded",
        "_waiter",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
    ) -> None:
        self.status = status
        self.reason: str | None = reason
        self.headers = headers
        self.content_length = content_length
        self._conn: UpstreamConnection | None = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: bytes | None = None
        self._upgraded: tuple[asyncio.Transport, bytes] | None = None

    @property
    def content(self) -> PooledResponse:
        return self

    @property
    def complete_in_buffer(self) -> bool:
        """The whole body has arrived and nothing of it was read yet (small enough to relay whole)."""
        return self._done and self._exc is None and self._size <= HIGH_WATER

    # --- fed by the connection -------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._done or self._exc is not None:
            return
        if exc is None:
            self._done = True
        else:
            self._exc = exc
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- read by the consumer --------------------------------------------------------------

    async def _next(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes, waiting for some if needed; b"" at the end of the body."""
        while True:
            chunks = self._chunks
            if chunks:
                chunk = chunks.popleft()
                if len(chunk) > limit:
                    chunks.appendleft(chunk[limit:])
                    chunk = chunk[:limit]
                elif chunks and len(chunk) + len(chunks[0]) <= limit:
                    parts = [chunk]
                    size = len(chunk)
                    while chunks and size + len(chunks[0]) <= limit:
                        part = chunks.popleft()
                        parts.append(part)
                        size += len(part)
                    chunk = b"".join(parts)
                self._size -= len(chunk)
                conn = self._conn
                if conn is not None and conn.reading_paused and self._size <= LOW_WATER:
                    conn.resume()
                return chunk
            if self._exc is not None:
                raise self._exc
            if self._done:
                self._complete()
                return b""
            conn = self._conn
            if conn is None:  # released early: nothing more will come
                raise aiohttp.ClientPayloadError("response was released before its body was read")
            waiter = conn.loop.create_future()
            self._waiter = waiter
            conn.wait_started()
            try:
                await waiter
            finally:
                conn.waiting = False

    async def _iterate(self, n: int) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._next(n)
            if not chunk:
                return
            yield chunk

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        return self._iterate(n)

    def read_complete(self) -> bytes | None:
        """The whole body if it has fully arrived (without an await), else None."""
        if self._body is not None:
            return self._body
        if not self._done or self._exc is not None:
            return None
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._complete()
        self._body = body
        return body

    async def read(self) -> bytes:
        if self._body is not None:
            return self._body
        if self._done and self._exc is None:
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._complete()
        else:
            parts = []
            while True:
                chunk = await self._next(1 << 62)
                if not chunk:
                    break
                parts.append(chunk)
            body = b"".join(parts)
        self._body = body
        return body

    def _complete(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.exchange_finished(complete=True)

    def release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.exchange_finished(complete=self._done and self._exc is None)
        upgraded = self._upgraded
        if upgraded is not None:  # a 101 nobody took: its connection is ours to close
            self._upgraded = None
            upgraded[0].abort()

    def take_upgraded(self) -> tuple[asyncio.Transport, bytes] | None:
        """After a 101: the connection (reading paused, out of the pool) and the bytes after the head."""
        upgraded, self._upgraded = self._upgraded, None
        return upgraded


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream; serves one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self.reading_paused = False
        self.waiting = False
        self._parser: httptools.HttpResponseParser | None = None
        self._reusable = True
        # Per exchange.
        self._busy = False
        self._head_request = False
        self._upgrade = False  # the request offers a protocol upgrade: a 101 is an answer
        self._head_waiter: asyncio.Future[PooledResponse] | None = None
        self._response: PooledResponse | None = None
        self._got_bytes = False
        self._head_bytes = 0
        self._status = 0
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._message_done = False
        self._keep_alive = False
        self._eof_framed = False
        self._writer: asyncio.Task[None] | None = None
        self._flow = WriteFlow(self.loop)
        # Idle timeout.
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - best effort
                pass

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._message_done:
            # Bytes while idle, or after a complete response: the framing is no longer trustworthy.
            self._reusable = False
            if not self._busy:
                self._close()
            return
        self._got_bytes = True
        self._last_read = self.loop.time()
        if self._response is None:
            self._head_bytes += len(data)
            if self._head_bytes > self.pool.max_head:
                self._fail(ResponseHeadError("response head too large"))
                return
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                # The parser cannot be told that a HEAD response has no body; it stopped at the head
                # and is spent. Reuse the connection only if nothing followed the head.
                self._keep_alive = _head_keep_alive(parser, self._response)
                self._parser = None
                if not data.endswith(_HEAD_END) or _head_declares_body(self._response):
                    # Some servers (aiohttp's StreamResponse among them) send the body of a HEAD
                    # answer anyway, sometimes in a later segment than the head: a connection whose
                    # HEAD answer declared a body is never reused, or the next answer reads that body.
                    self._reusable = False
                self._on_message_complete()
            elif isinstance(cause, _Extraneous):
                self._reusable = False
            elif isinstance(cause, ResponseHeadError):
                self._fail(cause)
            else:
                self._fail(ResponseHeadError(f"unparseable response ({cause!r})"))
        except httptools.HttpParserUpgrade as exc:
            response = self._response
            if not self._upgrade or response is None or response.status != 101:
                self._fail(ResponseHeadError("unexpected protocol switch"))
                return
            self._switched(response, data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail(ResponseHeadError(str(exc) or exc.__class__.__name__))

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flow.fail(ConnectionResetError("upstream connection lost"))
        if not self._busy:
            self.pool.forget(self)
            return
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            if not self._got_bytes:
                text = "connection closed before any response byte"
                waiter.set_exception(NoResponseError(text, reused=self.requests > 1))
            else:
                waiter.set_exception(DisconnectedError("connection closed in the response head"))
            return
        response = self._response
        if response is not None and not self._message_done:
            if self._eof_framed and exc is None:
                self._message_done = True
                response._finish()
            else:
                reason = f": {exc}" if exc is not None else ""
                response._finish(
                    aiohttp.ClientPayloadError(f"upstream closed the connection mid-body{reason}")
                )

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(value) > self.pool.max_field:
            raise ResponseHeadError("response header field too large")
        self._raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_message_begin(self) -> None:
        if self._message_done:
            raise _Extraneous

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status == 101 and self._upgrade:
            # Answered when the parser stops at the end of this head (`_switched`), not before.
            self._status = status
            headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
            reason = self._reason.decode("utf-8", "surrogateescape")
            self._response = PooledResponse(self, status, reason, headers, 0)
            return
        if status < 200:
            if status == 101:
                raise ResponseHeadError("unexpected 101 Switching Protocols")
            # Interim response (100, 103, ...): not forwarded; the final one follows on this connection.
            self._raw_headers = []
            self._reason = b""
            self._status = status
            return
        self._status = status
        headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        length: int | None = None
        raw_length = headers.get("Content-Length")
        if raw_length is not None:
            try:
                length = int(raw_length)
            except ValueError:
                length = None
        transfer = headers.get("Transfer-Encoding")
        self._eof_framed = raw_length is None and (transfer is None or "chunked" not in transfer.lower())
        response = PooledResponse(
            self, status, self._reason.decode("utf-8", "surrogateescape"), headers, length
        )
        self._response = response
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head_request:
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is None:
            return
        response._feed(body)
        if response._size > HIGH_WATER and not self.reading_paused:
            self.pause()

    def on_message_complete(self) -> None:
        if self._status < 200 and self._status != 101:
            return
        if self._parser is not None:
            self._keep_alive = self._parser.should_keep_alive()
        self._on_message_complete()

    def _on_message_complete(self) -> None:
        self._message_done = True
        if self._response is not None:
            self._response._finish()

    def _switched(self, response: PooledResponse, rest: bytes) -> None:
        """A 101: the connection leaves the pool and belongs to whoever takes the response's upgrade."""
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        self._reusable = False
        self.closed = True
        self.transport = None
        self._busy = False
        self.waiting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        response._conn = None
        response._upgraded = (transport, rest)
        waiter = self._head_waiter
        self._head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        else:  # nobody waits any more: the connection is nobody's
            response.release()

    # --- exchange --------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        transport = self.transport
        return self._reusable and not self.closed and transport is not None and not transport.is_closing()

    async def exchange(
        self,
        head: bytes,
        body: bytes | None,
        stream: AsyncIterator[bytes] | None,
        stream_length: int | None,
        head_request: bool,
        upgrade: bool = False,
    ) -> PooledResponse:
        transport = self.transport
        if transport is None or self.closed:
            raise NoResponseError("connection already closed", reused=self.requests > 0)
        self.requests += 1
        self._busy = True
        self._head_request = head_request
        self._upgrade = upgrade
        self._response = None
        self._got_bytes = False
        self._head_bytes = 0
        self._status = 0
        self._reason = b""
        self._raw_headers = []
        self._message_done = False
        self._keep_alive = False
        self._eof_framed = False
        if self._parser is None:
            self._parser = _new_parser(self)
        waiter: asyncio.Future[PooledResponse] = self.loop.create_future()
        self._head_waiter = waiter
        if body:
            if len(body) <= _COALESCE_BODY:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        else:
            transport.write(head)
        if stream is not None:
            self._writer = self.loop.create_task(self._write_stream(stream, stream_length))
        self.wait_started()
        try:
            return await waiter
        except BaseException:
            self._head_waiter = None
            writer = self._writer
            if writer is not None:
                self._writer = None
                writer.cancel()
            self._abort()
            raise
        finally:
            self.waiting = False

    async def _write_stream(self, stream: AsyncIterator[bytes], length: int | None) -> None:
        """Send a streamed body (chunked unless `length` is known) while the response is awaited."""
        sent = 0
        chunks = stream.__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:  # the client's side of the body failed
                self._body_failed(
                    RequestBodyError(f"reading the request body failed ({exc.__class__.__name__})")
                )
                return
            if not chunk:
                continue
            transport = self.transport
            if transport is None or transport.is_closing():
                return  # the reading side reports the lost connection
            if length is None:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            sent += len(chunk)
            if self._flow.paused:
                try:
                    await self._drain()
                except ConnectionError:
                    return
        if length is not None and sent != length:
            self._body_failed(RequestBodyError(f"request body ended after {sent} of {length} bytes"))
            return
        transport = self.transport
        if length is None and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")

    def _body_failed(self, error: RequestBodyError) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._response is not None and not self._message_done:
            self._response._finish(aiohttp.ClientPayloadError(str(error)))
        self._abort()

    async def _drain(self) -> None:
        if self.transport is not None:
            await self._flow.wait()

    def exchange_finished(self, complete: bool) -> None:
        """The response has been consumed (`complete`) or abandoned."""
        writer = self._writer
        if writer is not None:
            self._writer = None
            if not writer.done():
                writer.cancel()
                complete = False
        self._busy = False
        self._response = None
        if complete and self._message_done and self._keep_alive and self.usable:
            if self.reading_paused:
                self.resume()
            self.pool.put(self)
        elif complete and self._message_done:
            self._close()
        else:
            self._abort()

    # --- flow control and timers -----------------------------------------------------------

    def pause(self) -> None:
        self.reading_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def wait_started(self) -> None:
        self.waiting = True
        now = self.loop.time()
        self._last_read = now
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.pool.idle_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.waiting or self.closed:
            return
        due = self._last_read + self.pool.idle_timeout
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HeadTimeoutError("no response within the idle timeout"))
        elif self._response is not None:
            self._response._finish(aiohttp.SocketTimeoutError("upstream went silent mid-body"))
        self._abort()

    def _fail(self, exc: Exception) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._response is not None and not self._message_done:
            self._response._finish(aiohttp.ClientPayloadError(f"invalid response body: {exc}"))
        self._abort()

    def _close(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.abort()


def _new_parser(conn: UpstreamConnection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(conn)
    # The same tolerance aiohttp's client has for sloppy servers, but never for odd header bytes.
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True, lenient_spaces_after_chunk_size=True)
    return parser


def _head_keep_alive(parser: httptools.HttpResponseParser, response: PooledResponse | None) -> bool:
    if response is None:
        return False
    tokens = {t.strip().lower() for v in response.headers.getall("Connection", ()) for t in v.split(",")}
    if parser.get_http_version() == "1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _head_declares_body(response: PooledResponse | None) -> bool:
    if response is None:
        return True
    headers = response.headers
    if "Transfer-Encoding" in headers:
        return True
    return any(value.strip() not in ("", "0") for value in headers.getall("Content-Length", ()))


class UpstreamPool:
    """Idle connections per (scheme, host, port); https connections use the one client SSLContext."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        idle_timeout: float,
        max_field: int,
        max_head: int,
    ) -> None:
        self.loop = loop
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_field = max_field
        self.max_head = max_head
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections_opened = 0
        # Our own listeners: a connection that lands on one is refused (see is_own_listener).
        self.own_listeners: Callable[[], list[tuple[str, int]]] | None = None

    def acquire(self, key: PoolKey) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            conn._close()
        return None

    async def connect(self, key: PoolKey) -> UpstreamConnection:
        scheme, host, port = key
        conn = UpstreamConnection(self, key)
        tls = scheme == "https"
        async with asyncio.timeout(self.connect_timeout):
            await self.loop.create_connection(
                lambda: conn,
                host,
                port,
                ssl=self.ssl_context if tls else None,
                # For IP literals the ssl module verifies the address and sends no SNI.
                server_hostname=host if tls else None,
            )
        self.connections_opened += 1
        if self.own_listeners is not None and conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
            local = conn.transport.get_extra_info("sockname")
            if peer and local and is_own_listener(peer[:2], local[0], self.own_listeners()):
                conn._close()
                raise SelfTargetError(f"{host}:{port} is this proxy's own listener")
        return conn

    def put(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_KEY:
            conn._close()
            return
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(IDLE_KEEPALIVE / 3, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None:
            try:
                idle.remove(conn)
            except ValueError:
                pass
            if not idle:
                del self._idle[conn.key]

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self.loop.time() - IDLE_KEEPALIVE
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [conn for conn in idle if conn.idle_since > cutoff and conn.usable]
            for conn in idle:
                if conn not in keep:
                    conn._close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = self.loop.call_later(IDLE_KEEPALIVE / 3, self._sweep)

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn._close()
        self._idle.clear()


def build_head(
    method: str, target: str, host: str, headers: CIMultiDict[str], extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    """Request line and header block, validated against header injection, as one bytes object."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    if "Host" not in headers:
        lines.append(f"Host: {host}\r\n")
    lines.extend([f"{name}: {value}\r\n" for name, value in headers.items()])
    lines.extend([f"{name}: {value}\r\n" for name, value in extra])
    lines.append("\r\n")
    head = encode_head(lines)
    if head is None:
        raise RequestHeadError("request head contains control characters")
    return head


def encode_head(lines: list[str]) -> bytes | None:
    """Join CRLF-terminated head lines; None if any control character other than HT, or any CR/LF
    except the line ends, appears (it would split or smuggle a header)."""
    data = "".join(lines).encode("utf-8", "surrogateescape")
    breaks = len(lines)
    # UTF-8 never encodes a non-ASCII character with bytes below 0x80, so this check on bytes is exact.
    if len(data.translate(None, _CONTROL_BYTES)) != len(data) - 2 * breaks or data.count(b"\r\n") != breaks:
        return None
    return data


__all__ = [
    "DisconnectedError",
    "HeadTimeoutError",
    "NoResponseError",
    "PooledResponse",
    "RequestBodyError",
    "RequestHeadError",
    "ResponseHeadError",
    "UpstreamConnection",
    "UpstreamPool",
    "build_head",
    "encode_head",
]
