"""The client side of the proxy: HTTP/1.1 on every client connection, llhttp (httptools) parsing
straight into the engine.

One protocol serves every client connection (plain, or the inside of an intercepted tunnel):

* keep-alive and pipelining: one request is served at a time, answers go out in order, and reading
  pauses while a parsed request waits its turn (at most one read's worth of bytes is held);
* request bodies fed into a `RequestBody` with read flow control (reading pauses above
  `BODY_HIGH_WATER` buffered bytes and resumes below `BODY_LOW_WATER`);
* write flow control: `drain()` waits while the transport's buffer is above its high-water mark;
* head limits: a request line or header field over `max_header_bytes` is a 431, as is a head that
  keeps growing without ending; malformed requests get a 400 and the connection closes;
* protocol upgrades: a WebSocket upgrade (`Connection: upgrade` + `Upgrade: websocket` on a GET)
  stops the parser at the end of its head; the request handler either switches the connection to
  a splice with the upstream (after a 101) or hands it back, and parsing resumes where it stopped.
  Any other `Upgrade` (h2c, ...) is ignored (RFC 9110 7.8): the request is parsed again without the
  upgrade and served as HTTP/1.1, with whatever was pipelined after it. A CONNECT after the first
  request is answered (refused) and the connection closes: what follows it is not HTTP;
* idle keep-alive connections close after `keepalive_timeout`; `close()` ends a connection after
  its current answer (graceful stop).

What a request means (checks, stages, the answer) lives in `request_handler.py`; this module only
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

log = logging.getLogger("x402_proxy.client_http")

BODY_HIGH_WATER: Final = 256 * 1024
BODY_LOW_WATER: Final = 64 * 1024
# A head may hold many fields of up to `max_header_bytes` each; this bounds the whole of it.
HEAD_FIELDS_FACTOR: Final = 64
# Seconds a request aborted at the drain deadline gets to finish its cancellation (see `shutdown`).
CANCEL_GRACE: Final = 5.0


class ClientBodyError(ConnectionError):
    """The client's request body broke off or could not be parsed."""


class UnsupportedVersion(Exception):
    """A request line without HTTP/1.0 or HTTP/1.1 (llhttp reads a bare `GET url` as HTTP/0.9)."""


class HeadTooLarge(Exception):
    """A request line or header field is over the limit (raised inside a parser callback)."""


class RequestBody:
    """A request body as it arrives: fed by the parser, read by the engine, with read flow control."""

    __slots__ = ("_chunks", "_conn", "_done", "_exc", "_size", "_waiter")

    def __init__(self, conn: ClientConnection) -> None:
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
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        conn: ClientConnection,
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
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(raw_headers))
        # A CONNECT inside a connection is never followed by HTTP: the connection ends after its answer.
        self.keep_alive = keep_alive and method != "CONNECT"
        # The parser stopped after this head (a WebSocket upgrade, or a CONNECT): see `ClientConnection`.
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


# Serves one request: writes its answer with conn.write(), calls conn.request_failed(request) if it
# raises, and always ends with conn.request_finished(request) (in a `finally`).
RequestServer = Callable[["ClientRequest", "ClientConnection"], Coroutine[Any, Any, None]]


class ClientConnections:
    """What every client connection shares: limits, the request server, the live set."""

    def __init__(self, serve: RequestServer, max_header_bytes: int, keepalive_timeout: float) -> None:
        self.serve = serve
        self.max_field = max_header_bytes
        self.max_head = max_header_bytes * HEAD_FIELDS_FACTOR
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[ClientConnection] = set()
        self._all_closed: asyncio.Event | None = None  # set up by shutdown()

    def protocol(self, tunnel: TunnelInfo | None) -> ClientConnection:
        return ClientConnection(self, tunnel)

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def shutdown(self, drain_timeout: float) -> None:
        """End idle connections now, busy ones after their current answer; abort the rest at the timeout.

        A WebSocket relay is busy until one side closes it: it runs until the timeout, as any answer.
        An aborted request's task is cancelled and may still have to record what it leaves behind (a
        paid request cut at the deadline is written down as in doubt, which takes the ledger's thread):
        those tasks get up to `CANCEL_GRACE` seconds to finish before this returns.
        """
        self._all_closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close()
        if self.connections:
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                busy = [conn.task for conn in self.connections if conn.task is not None]
                for conn in list(self.connections):
                    conn.abort()
                if busy:
                    await asyncio.wait(busy, timeout=CANCEL_GRACE)


def _without_upgrade(method: bytes, url: bytes, version: str, raw_headers: list[tuple[str, str]]) -> bytes:
    """A request head rebuilt without its upgrade offer (no `Upgrade` field, no `upgrade` option)."""
    lines = [f"{method.decode('ascii', 'surrogateescape')} {url.decode('utf-8', 'surrogateescape')}"]
    lines[0] += f" HTTP/{version}\r\n"
    for name, value in raw_headers:
        lower = name.lower()
        if lower == "upgrade":
            continue
        if lower == "connection":
            options = [t for t in value.split(",") if t.strip() and t.strip().lower() != "upgrade"]
            if not options:
                continue
            value = ",".join(options).strip()
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _is_websocket_offer(method: bytes, raw_headers: list[tuple[str, str]], has_body: bool) -> bool:
    """A GET without a body whose upgrade offer names WebSocket (RFC 6455 4.1)."""
    if method != b"GET" or has_body:
        return False
    return any(name.lower() == "upgrade" and "websocket" in value.lower() for name, value in raw_headers)


class ClientConnection(asyncio.Protocol):
    """One client connection (plain, or the inside of an intercepted tunnel)."""

    def __init__(self, server: ClientConnections, tunnel: TunnelInfo | None) -> None:
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
        self._reparse: bytes | None = None  # an upgrade offer to ignore: the head again, without it
        # Requests.
        self._parsing: ClientRequest | None = None  # the request whose body the parser is in
        self._active: ClientRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: deque[ClientRequest] = deque()
        self._stopped = False  # the parser is done with this connection (an error, or closing)
        # The parser stopped at an upgrade: what arrived after that head (None while parsing).
        self._held: bytearray | None = None
        self._switched = False  # the connection now belongs to a splice (`switch()`)
        self._final_answer: bytes | None = None  # an error to send once the queue has drained
        # Connection state.
        self.closing = False
        self.lost = False
        self.answer_started = False  # some of the active request's answer was written
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
        if self._held is not None:
            self._held += data  # bytes in flight when reading paused at an upgrade
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
            rest = data[exc.args[0] :]
            again = self._reparse
            if again is not None:
                # An upgrade we do not take: parse the request again as plain HTTP/1.1, then the rest.
                self._reparse = None
                self._parser = httptools.HttpRequestParser(self)
                self._in_head = True
                self._head_size = 0
                self.data_received(again + rest)
                return
            self._held = bytearray(rest)
            self._update_reading()
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
        method = parser.get_method()
        upgrade = parser.should_upgrade()
        if upgrade and method != b"CONNECT":
            has_body = any(
                name.lower() in ("content-length", "transfer-encoding") and value.strip() not in ("", "0")
                for name, value in self._raw_headers
            )
            if not _is_websocket_offer(method, self._raw_headers, has_body):
                # RFC 9110 7.8: a server may ignore Upgrade. llhttp has already decided the rest of the
                # stream is another protocol (body included), so the head is parsed again without it.
                self._reparse = _without_upgrade(method, self._url, version_text, self._raw_headers)
                self._in_head = False
                return
        version = (1, 1) if version_text == "1.1" else (int(version_text[0]), int(version_text[2]))
        request = ClientRequest(
            self,
            method.decode("ascii", "surrogateescape"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            self._raw_headers,
            parser.should_keep_alive(),
            upgrade,
        )
        self._in_head = False
        self._head_size = 0
        self._parsing = request
        if self._active is None and not self._waiting:
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
        if self.answer_started or self.transport is None or self._switched:
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
        if request.upgrade and self._held is not None:
            self._resume_parsing()  # the upgrade was not taken: HTTP/1.1 goes on where it stopped
            return
        self._next()

    def _next(self) -> None:
        if self._waiting:
            self._start(self._waiting.popleft())
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

    def _resume_parsing(self) -> None:
        held = self._held
        self._held = None
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = True
        self._head_size = 0
        if self.closing:
            self._close_transport()
            return
        self._update_reading()
        if held:
            self.data_received(bytes(held))

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task serving the active request, if any."""
        return self._task

    def keep_alive(self, request: ClientRequest) -> bool:
        """May this connection carry another request after the answer to `request`?"""
        if not (request.keep_alive and request.complete):
            return False
        return not (self.closing or self.lost or self._switched)

    @property
    def can_switch(self) -> bool:
        """The parser stopped at the active request's upgrade offer: the connection may be handed over."""
        return self._held is not None and not self.lost and self.transport is not None

    def switch(self) -> tuple[asyncio.Transport, bytes]:
        """Hand the transport over (a WebSocket after its 101): the transport and the bytes already read.

        The connection stays in the live set until its request finishes (a graceful stop waits for it,
        then aborts it); nothing is parsed or answered on it any more.
        """
        transport = self.transport
        assert transport is not None and self._held is not None
        held = bytes(self._held)
        self._held = None
        self._switched = True
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return transport, held

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
        if transport is None or self.lost or self._switched:
            return
        pause = self._stopped or self._body_backlog or bool(self._waiting) or self._held is not None
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
