"""A lean HTTP/1.1 server protocol: llhttp (httptools) parsing straight into the engine.

aiohttp's server builds a request object, a payload stream, a response object and a writer per
request, and serializes through several layers; for a proxy relaying small answers that machinery
costs more than everything else together. This protocol keeps what a proxy's client side needs:

* keep-alive and pipelining: one request is served at a time, answers go out in order, and reading
  pauses while a parsed request waits its turn (at most one read's worth of bytes is held);
* request bodies fed into a `RequestBody` with read flow control (reading pauses above
  `BODY_HIGH_WATER` buffered bytes and resumes below `BODY_LOW_WATER`);
* write flow control: `drain()` waits while the transport's buffer is above its high-water mark;
* head limits: a request line or header field over `max_header_bytes` is a 431, as is a head that
  keeps growing without ending; malformed requests get a 400 and the connection closes;
* idle keep-alive connections close after `keepalive_timeout`; `close()` ends a connection after
  its current answer (graceful stop).

Upgrade requests (WebSocket, h2c, a CONNECT after the first request) need aiohttp's machinery. At
the request boundary the connection is handed to aiohttp's request handler: the request head is
rebuilt from the parsed parts and fed to it together with the bytes that followed.

What a request means (checks, stages, the answer) lives in `lean_exchange.py`; this module only
moves bytes and keeps order.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.engine.flow_control import WriteFlow
from proxy.engine.responses import error_response

if TYPE_CHECKING:
    from proxy.engine.forwarder import TunnelInfo

log = logging.getLogger("x402_proxy.lean_server")

BODY_HIGH_WATER: Final = 256 * 1024
BODY_LOW_WATER: Final = 64 * 1024
# A head may hold many fields of up to `max_header_bytes` each; this bounds the whole of it.
HEAD_FIELDS_FACTOR: Final = 64


class ClientBodyError(ConnectionError):
    """The client's request body broke off or could not be parsed."""


class UnsupportedVersion(Exception):
    """A request line without HTTP/1.0 or HTTP/1.1 (llhttp reads a bare `GET url` as HTTP/0.9)."""


class HeadTooLarge(Exception):
    """A request line or header field is over the limit (raised inside a parser callback)."""


class RequestBody:
    """A request body as it arrives: fed by the parser, read by the engine, with read flow control."""

    __slots__ = ("_chunks", "_conn", "_done", "_exc", "_size", "_waiter")

    def __init__(self, conn: LeanConnection) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH_WATER:
            self._conn.body_backlog(True)
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._done:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def readany(self) -> bytes:
        """Whatever has arrived (waiting for some if nothing has); b"" once the body is complete."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._conn.body_backlog(False)
                return data
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            waiter = self._waiter = self._conn.loop.create_future()
            await waiter


class ClientRequest:
    """One parsed request head (and its body, if any) waiting for or being served."""

    __slots__ = (
        "body",
        "complete",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_headers",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        conn: LeanConnection,
        method: str,
        target: str,
        version: tuple[int, int],
        raw_headers: list[tuple[str, str]],
        keep_alive: bool,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(raw_headers))
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.complete = False
        transfer = self.headers.get("Transfer-Encoding")
        length = self.headers.get("Content-Length")
        self.content_length: int | None = None
        if transfer is None and length is not None:
            try:  # llhttp has already refused anything but a valid number
                self.content_length = int(length)
            except ValueError:
                self.content_length = None
        has_body = transfer is not None or bool(self.content_length)
        self.body = RequestBody(conn) if has_body else None

    def head_bytes(self) -> bytes:
        """The request head rebuilt from its parts (for handing the connection to aiohttp)."""
        lines = [f"{self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in self.raw_headers)
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


# Serves one request: writes its answer with conn.write(), calls conn.request_failed(request) if it
# raises, and always ends with conn.request_finished(request) (in a `finally`).
RequestServer = Callable[["ClientRequest", "LeanConnection"], Coroutine[Any, Any, None]]


class LeanServer:
    """What every lean connection shares: limits, the request server, the aiohttp fallback, the live set."""

    def __init__(
        self,
        serve: RequestServer,
        fallback: Callable[[TunnelInfo | None], asyncio.Protocol],
        max_header_bytes: int,
        keepalive_timeout: float,
    ) -> None:
        self.serve = serve
        self.fallback = fallback
        self.max_field = max_header_bytes
        self.max_head = max_header_bytes * HEAD_FIELDS_FACTOR
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[LeanConnection] = set()
        self._all_closed: asyncio.Event | None = None  # set up by shutdown()

    def protocol(self, tunnel: TunnelInfo | None) -> LeanConnection:
        return LeanConnection(self, tunnel)

    def forget(self, conn: LeanConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def shutdown(self, drain_timeout: float) -> None:
        """End idle connections now, busy ones after their current answer; abort the rest at the timeout."""
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close()
        if self.connections:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                for conn in list(self.connections):
                    conn.abort()


class LeanConnection(asyncio.Protocol):
    """One client connection (plain, or the inside of an intercepted tunnel)."""

    def __init__(self, server: LeanServer, tunnel: TunnelInfo | None) -> None:
        self.server = server
        self.tunnel = tunnel
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # Head being parsed.
        self._url = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._in_head = True
        self._head_size = 0
        # Requests.
        self._parsing: ClientRequest | None = None  # the request whose body the parser is in
        self._active: ClientRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: deque[ClientRequest] = deque()
        self._stopped = False  # the parser is done with this connection (error or upgrade)
        self._upgrade_rest = b""
        self._final_answer: bytes | None = None  # an error to send once the queue has drained
        # Connection state.
        self.closing = False
        self.lost = False
        self.answer_started = False  # some of the active request's answer was written
        self._eof = False
        self._read_paused = False
        self._body_backlog = False
        self._flow = WriteFlow(self.loop)
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - best effort
                pass
        self._last_activity = self.loop.time()
        self._timer = self.loop.call_at(self._last_activity + self.server.keepalive_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._active is None:
            self._last_activity = self.loop.time()
        if self._in_head:
            self._head_size += len(data)
            if self._head_size > self.server.max_head:
                self._parse_failed(431, "headers_too_large", "request head is too large")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._stopped = True
            self._upgrade_rest = data[exc.args[0] :]
            self._update_reading()
            if self._active is None:
                self._next()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._parse_failed(431, "headers_too_large", "request line or a header is too long")
            elif isinstance(exc.__context__, UnsupportedVersion):
                self._parse_failed(400, "bad_request", "only HTTP/1.0 and HTTP/1.1 requests are served")
            else:
                log.error("request parser callback failed", exc_info=exc.__context__)
                self._parse_failed(400, "bad_request", "malformed request")
        except httptools.HttpParserError as exc:
            self._parse_failed(400, "bad_request", f"malformed request ({type(exc).__name__})")

    def eof_received(self) -> bool | None:
        # Like aiohttp's server: a half-closed client is a gone client; the transport closes.
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gone = ConnectionResetError("client connection lost")
        for request in (self._parsing, self._active, *self._waiting):
            if request is not None and request.body is not None and not request.body.done:
                request.body.fail(gone)
        self._waiting.clear()
        self._flow.fail(gone)
        if self._task is not None:
            # The answer has nowhere to go (what aiohttp's handler_cancellation does).
            self._task.cancel()

    def pause_writing(self) -> None:
        self._flow.pause()

    def resume_writing(self) -> None:
        self._flow.resume()

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw_headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_field:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(value) > self.server.max_field or len(name) > self.server.max_field:
            raise HeadTooLarge
        self._raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        version_text = parser.get_http_version()
        if version_text not in ("1.0", "1.1"):
            raise UnsupportedVersion(version_text)
        version = (1, 1) if version_text == "1.1" else (int(version_text[0]), int(version_text[2]))
        request = ClientRequest(
            self,
            parser.get_method().decode("ascii", "surrogateescape"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            self._raw_headers,
            parser.should_keep_alive(),
            parser.should_upgrade(),
        )
        self._in_head = False
        self._head_size = 0
        self._parsing = request
        if self._active is None and not self._waiting and not request.upgrade:
            self._start(request)
        else:
            self._waiting.append(request)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None and request.body is not None:
            request.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            request.complete = True
            if request.body is not None:
                request.body.finish()
            self._parsing = None
        self._in_head = True

    # --- serving ---------------------------------------------------------------------------

    def _start(self, request: ClientRequest) -> None:
        self._active = request
        self.answer_started = False
        # The request server's own coroutine is the task (no wrapper frame on every resume); it reports
        # back through request_failed() and request_finished().
        self._task = self.loop.create_task(self.server.serve(request, self))

    def request_failed(self, request: ClientRequest) -> int:
        """The request server raised: answer 500 if nothing was written yet, else cut the connection.

        Returns the bytes of the 500 written (0 when the connection was cut instead).
        """
        log.exception("unhandled error while proxying")
        if self.answer_started or self.transport is None:
            self.abort()
            return 0
        request.keep_alive = False
        answer = error_response(
            request.version, 500, "internal_error", "internal error (see the proxy log)", False
        )
        self.write(answer)
        return len(answer)

    def request_finished(self, request: ClientRequest) -> None:
        """Called by the request server in a `finally` (also when cancelled): go on or close."""
        self._task = None
        self._active = None
        if not self.lost:
            self._done(request)

    def _done(self, request: ClientRequest) -> None:
        """The answer to `request` is out: close, or go on with the next request."""
        self._last_activity = self.loop.time()
        if not self.keep_alive(request):
            self._close_transport()
            return
        self._next()

    def _next(self) -> None:
        if self._waiting:
            request = self._waiting.popleft()
            if request.upgrade:
                self._hand_over(request)
                return
            self._start(request)
            self._update_reading()
            return
        if self._final_answer is not None:
            assert self.transport is not None
            self.transport.write(self._final_answer)
            self._close_transport()
            return
        if self.closing or self._stopped:
            self._close_transport()
            return
        self._update_reading()

    def keep_alive(self, request: ClientRequest) -> bool:
        """May this connection carry another request after the answer to `request`?"""
        return request.keep_alive and request.complete and not self.closing and not self.lost

    def _hand_over(self, request: ClientRequest) -> None:
        """Give the connection to aiohttp's handler, starting with this (upgrade) request."""
        transport = self.transport
        assert transport is not None
        self._stopped = True
        self.server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler = self.server.fallback(self.tunnel)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(request.head_bytes() + self._upgrade_rest)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        if self._eof:
            handler.eof_received()

    def _parse_failed(self, status: int, code: str, message: str) -> None:
        self._stopped = True
        request = self._parsing
        answer = error_response((1, 1), status, code, message, keep_alive=False)
        if request is not None:
            # The head was fine and the request may already be served: its body is what broke.
            self._parsing = None
            if request.body is not None:
                request.body.fail(ClientBodyError("malformed request body"))
            if request is self._active or request in self._waiting:
                answer = b""
        self._final_answer = answer or None
        if self._active is None and not self._waiting:
            self._next()
        else:
            self._update_reading()

    # --- flow control ----------------------------------------------------------------------

    def body_backlog(self, full: bool) -> None:
        """A request body holds more (or, after a read, less) than its reader has taken."""
        if full != self._body_backlog:
            self._body_backlog = full
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.lost:
            return
        pause = self._stopped or self._body_backlog or bool(self._waiting)
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if not self._flow.paused:
            return
        if self.lost:
            raise ConnectionResetError("client connection lost")
        await self._flow.wait()

    @property
    def write_paused(self) -> bool:
        return self._flow.paused

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.answer_started = True
        self.transport.write(data)

    def close(self) -> None:
        """Graceful: now if idle, else after the current answer."""
        self.closing = True
        if self._active is None and not self._waiting:
            self._close_transport()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        self._stopped = True
        self.server.forget(self)
        if self.transport is not None:
            self.transport.close()

    def _on_timer(self) -> None:
        self._timer = None
        if self.lost or self._stopped:
            return
        timeout = self.server.keepalive_timeout
        due = self._last_activity + timeout
        now = self.loop.time()
        if self._active is None and now >= due:
            self._close_transport()
            return
        self._timer = self.loop.call_at(
            max(due, now + 1.0) if self._active is None else now + timeout, self._on_timer
        )
