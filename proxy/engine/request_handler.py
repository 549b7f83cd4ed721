"""One client request, from its parsed head to its answer: the checks (`Forwarder.admit`), the body,
the stage stack, and the answer serialized once (`serialize_head`) and written straight to the client
transport. A WebSocket upgrade goes to the upstream as it is (past the stages) and, after a 101, the
two connections are spliced byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Final

import aiohttp
from yarl import URL

from proxy.engine import http_semantics as hs
from proxy.engine.client_http import ClientBodyError, ClientConnection, ClientRequest, RequestBody
from proxy.engine.exchange import Outcome, render_proxy_headers
from proxy.engine.forwarder import Forwarder, Refusal, build_exchange
from proxy.engine.responses import error_response, serialize_head
from proxy.engine.splice import Splice
from proxy.engine.upstream import UpstreamError
from proxy.engine.upstream_pool import PooledResponse

log = logging.getLogger("x402_proxy.engine")

# Bodies up to this size are read whole and answered in one write: fewer syscalls for typical API calls.
SMALL_BODY: Final = 64 * 1024
STREAM_CHUNK: Final = 256 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
UNWRITABLE: Final = "upstream_bad_response"
BODY_ERROR: Final = "upstream_body_error"
_NO_BODY_STATUS: Final = frozenset({204, 304})
# Logged for a request whose client went away before its answer was complete (nginx's convention).
CLIENT_GONE_STATUS: Final = 499
CLIENT_GONE: Final = "client_gone"
SWITCHING_PROTOCOLS: Final = 101


@dataclass(slots=True)
class CompletedRequest:
    """A proxied request whose answer has been written (or that ended in an error answer, or was cut)."""

    method: str
    host: str  # "" when the target could not be parsed
    status: int  # the status written; CLIENT_GONE_STATUS if the client left before any answer
    bytes_sent: int  # head and body bytes written to the client for this answer (chunk framing included)
    started: float  # perf_counter() when the server started on the request
    outcome: Outcome | None  # what the stages decided (session id, payment id, error code): its fields
    # The proxy's own error code when the answer is one of its errors or was cut short; None for an
    # answer relayed from upstream (a stage's code, if any, is outcome.error_code).
    error: str | None = None


CompletionHook = Callable[[CompletedRequest], None]


class AnswerCut(asyncio.CancelledError):
    """The task was cancelled (the client went away) while the answer was being written.

    Still a CancelledError, so the task ends cancelled as before; it carries what had gone out so the
    completion hook can report it.
    """

    def __init__(self, status: int, sent: int) -> None:
        super().__init__(status, sent)
        self.status = status
        self.sent = sent


class RequestHandler:
    """The request server of `ClientConnections`: `await handler(request, conn)` answers one request."""

    def __init__(self, forwarder: Forwarder, max_replay_body: int) -> None:
        self._forwarder = forwarder
        self._max_replay_body = max_replay_body
        # Called once per answered request (see `completed`); None costs nothing.
        self.on_complete: CompletionHook | None = None

    async def __call__(self, request: ClientRequest, conn: ClientConnection) -> None:
        # With no hook (access log off) nothing below times, counts or allocates for the report.
        reporting = self.on_complete is not None
        started = perf_counter() if reporting else 0.0
        host = ""
        outcome: Outcome | None = None
        try:
            forwarder = self._forwarder
            admitted = forwarder.admit(request.target, request.headers, conn.tunnel)
            if isinstance(admitted, Refusal):
                if admitted.close:
                    request.keep_alive = False
                sent = _send_error(
                    conn, request, admitted.status, admitted.reason_code, admitted.message, admitted.headers
                )
                if reporting:
                    host = _target_host(request.target, conn)
                    self.completed(request, host, admitted.status, sent, started, None, admitted.reason_code)
                return
            url = admitted
            host = url.raw_host or ""
            if request.upgrade:
                status, sent, error, outcome = await self._upgrade(request, conn, url)
                if reporting:
                    self.completed(request, host, status, sent, started, outcome, error)
                return
            if (
                request.body is not None
                and "Expect" in request.headers
                and hs.expects_continue(request.headers)
            ):
                # The upstream client would wait for a 100 itself: answer it here and strip the expectation
                # (RFC 9110 10.1.1 lets a proxy do so).
                conn.write(CONTINUE)
            try:
                body, stream = (None, None) if request.body is None else await self._read_body(request)
            except ClientBodyError as exc:
                request.keep_alive = False
                sent = _send_error(conn, request, 400, "bad_request", str(exc))
                if reporting:
                    self.completed(request, host, 400, sent, started, None, "bad_request")
                return
            exchange = build_exchange(
                request.method, url, request.headers, request.version, conn.tunnel is not None, body, stream
            )
            try:
                outcome = await forwarder.exchanger(exchange)
            except UpstreamError as exc:
                log.info("upstream failure %s %s: %s", request.method, url.host, exc.message)
                sent = _send_error(
                    conn, request, exc.status, exc.reason_code, exc.message, _payment_named(exc.payment_id)
                )
                if reporting:
                    self.completed(request, host, exc.status, sent, started, None, exc.reason_code)
                return
            body = _body_in_hand(request, outcome)
            if body is not None:
                try:  # the usual small answer: no coroutine for the response at all
                    status, sent, error = _write_whole(conn, request, outcome, body)
                finally:
                    outcome.response.release()
            else:
                status, sent, error = await _respond(conn, request, outcome)
            if reporting:
                self.completed(request, host, status, sent, started, outcome, error)
        except AnswerCut as cut:
            if reporting:
                self.completed(request, host, cut.status, cut.sent, started, outcome, CLIENT_GONE)
            raise
        except asyncio.CancelledError:
            # connection_lost cancels the task: the client left before any answer was written.
            if reporting:
                self.completed(request, host, CLIENT_GONE_STATUS, 0, started, outcome, CLIENT_GONE)
            raise
        except Exception:  # one request must never take the server down
            sent = conn.request_failed(request)
            if reporting:
                self.completed(request, host, 500, sent, started, outcome, "internal_error")
        finally:
            conn.request_finished(request)

    async def _upgrade(
        self, request: ClientRequest, conn: ClientConnection, url: URL
    ) -> tuple[int, int, str | None, Outcome | None]:
        """A request the parser stopped after (a WebSocket offer, or a CONNECT inside a connection):
        (status, bytes written, our error code, the relayed outcome if any)."""
        if request.method == "CONNECT":  # `admit` refuses most; what is left is not ours to tunnel
            request.keep_alive = False
            message = "CONNECT is served only as the first request of a connection"
            sent = _send_error(conn, request, 400, "bad_request_target", message)
            return 400, sent, "bad_request_target", None
        exchange = build_exchange(
            request.method, url, request.headers, request.version, conn.tunnel is not None, None, None
        )
        try:
            upstream = await self._forwarder.send_upgrade(exchange, request.headers.get("Upgrade", ""))
        except UpstreamError as exc:
            log.info("upstream failure %s %s: %s", request.method, url.host, exc.message)
            sent = _send_error(
                conn, request, exc.status, exc.reason_code, exc.message, _payment_named(exc.payment_id)
            )
            return exc.status, sent, exc.reason_code, None
        outcome = Outcome(upstream)
        taken = upstream.take_upgraded() if isinstance(upstream, PooledResponse) else None
        if upstream.status != SWITCHING_PROTOCOLS or taken is None:
            # Refused (or not switched): relayed like any answer, and the connection goes on as HTTP/1.1.
            body = _body_in_hand(request, outcome)
            if body is not None:
                try:
                    status, sent, error = _write_whole(conn, request, outcome, body)
                finally:
                    upstream.release()
                return status, sent, error, outcome
            status, sent, error = await _respond(conn, request, outcome)
            return status, sent, error, outcome
        upstream_transport, upstream_first = taken
        head = serialize_head(
            request.version,
            SWITCHING_PROTOCOLS,
            upstream.reason or "Switching Protocols",
            upstream.headers.items(),
            hs.connection_tokens(upstream.headers),
            [],
            None,
            False,
            upgrade=upstream.headers.get("Upgrade", request.headers.get("Upgrade", "")),
        )
        if head is None or not conn.can_switch:
            upstream_transport.abort()
            if head is None:
                return 502, _unwritable(conn, request), UNWRITABLE, None
            return CLIENT_GONE_STATUS, 0, CLIENT_GONE, None
        conn.write(head)
        client_transport, client_first = conn.switch()
        splice = Splice(client_transport, upstream_transport, upstream_first, client_first)
        await splice.wait()
        return SWITCHING_PROTOCOLS, len(head) + splice.a.written, None, None

    def completed(
        self,
        request: ClientRequest,
        host: str,
        status: int,
        bytes_sent: int,
        started: float,
        outcome: Outcome | None,
        error: str | None = None,
    ) -> None:
        """THE place a finished request is known: its answer is written (`bytes_sent` of it), or cut."""
        hook = self.on_complete
        if hook is not None:
            try:
                hook(CompletedRequest(request.method, host, status, bytes_sent, started, outcome, error))
            except Exception:  # a report must never fail the request it reports
                log.exception("completion hook failed")

    async def _read_body(self, request: ClientRequest) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
        body = request.body
        if body is None:
            return None, None
        limit = self._max_replay_body
        length = request.content_length
        if length is not None and length > limit:
            return None, _iterate(body, b"")
        buffered = b""
        while True:
            chunk = await body.readany()
            if not chunk:
                return buffered, None
            buffered = chunk if not buffered else buffered + chunk
            if len(buffered) > limit:
                # Too big to keep for a paid replay: stream what we have plus the rest.
                return None, _iterate(body, buffered)


async def _iterate(body: RequestBody, head: bytes) -> AsyncIterator[bytes]:
    if head:
        yield head
    while True:
        chunk = await body.readany()
        if not chunk:
            return
        yield chunk


def _send_error(
    conn: ClientConnection,
    request: ClientRequest,
    status: int,
    code: str,
    message: str,
    extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
) -> int:
    data = error_response(request.version, status, code, message, conn.keep_alive(request), extra)
    conn.write(data)
    return len(data)


def _payment_named(payment_id: int | None) -> tuple[tuple[str, str], ...]:
    return () if payment_id is None else render_proxy_headers(None, payment_id, None, None)


def _target_host(target: str, conn: ClientConnection) -> str:
    """The host a refused request named (for its report only; "" when there is none to name)."""
    if conn.tunnel is not None:
        return conn.tunnel.authority.host
    try:
        return URL(target, encoded=True).raw_host or ""
    except ValueError:
        return ""


def _body_in_hand(request: ClientRequest, outcome: Outcome) -> bytes | None:
    """The answer's whole body if it is already here (b"" for HEAD), taken without an await; else None."""
    body = outcome.body
    if body is not None:
        return body
    if request.method == "HEAD":
        return b""
    upstream = outcome.response
    if isinstance(upstream, PooledResponse):
        length = upstream.content_length
        if (length is not None and length <= SMALL_BODY) or (length is None and upstream.complete_in_buffer):
            return upstream.read_complete()
    return None


def _write_whole(
    conn: ClientConnection, request: ClientRequest, outcome: Outcome, body: bytes
) -> tuple[int, int, str | None]:
    """Head and body in one write (for HEAD, `body` is empty); (status, bytes written, our error code)."""
    upstream = outcome.response
    status = upstream.status
    if request.method == "HEAD":
        # Keep a HEAD answer's Content-Length: it describes the body a GET would get.
        out_length: int | None = upstream.content_length
        body = b""
    elif status in _NO_BODY_STATUS:
        out_length, body = None, b""
    else:
        out_length = len(body)
    head = serialize_head(
        request.version,
        status,
        upstream.reason if upstream.reason is not None else "",
        upstream.headers.items(),
        hs.connection_tokens(upstream.headers),
        outcome.proxy_headers(),
        out_length,
        conn.keep_alive(request),
    )
    if head is None:
        return 502, _unwritable(conn, request), UNWRITABLE
    data = head + body if body else head
    conn.write(data)
    return status, len(data), None


async def _respond(
    conn: ClientConnection, request: ClientRequest, outcome: Outcome
) -> tuple[int, int, str | None]:
    """Write the upstream's answer; (status, bytes written, our error code if it is not the upstream's)."""
    upstream = outcome.response
    status = upstream.status
    sent = 0
    try:
        body = outcome.body
        length = upstream.content_length
        is_head = request.method == "HEAD"
        if body is None and not is_head:
            pooled = upstream if isinstance(upstream, PooledResponse) else None
            if length is not None and length <= SMALL_BODY:
                # Usually the whole small body came with the head: take it without an await.
                body = pooled.read_complete() if pooled is not None else None
                if body is None:
                    body = await upstream.read()
            elif length is None and pooled is not None and pooled.complete_in_buffer:
                # A small chunked (or close-delimited) answer that has fully arrived: relay it whole.
                body = await upstream.read()
        if body is not None or is_head:
            return _write_whole(conn, request, outcome, body or b"")
        listed = hs.connection_tokens(upstream.headers)
        reason = upstream.reason if upstream.reason is not None else ""
        # Streamed: chunked to an HTTP/1.1 client when the length is unknown, else close-delimited.
        chunked = length is None and request.version >= (1, 1)
        if length is None and not chunked:
            request.keep_alive = False
        head = serialize_head(
            request.version,
            status,
            reason,
            upstream.headers.items(),
            listed,
            outcome.proxy_headers(),
            length,
            conn.keep_alive(request),
            chunked=chunked,
        )
        if head is None:
            return 502, _unwritable(conn, request), UNWRITABLE
        conn.write(head)
        sent = len(head)
        async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
            if conn.lost:
                break
            if chunked:
                frame = b"%x\r\n" % len(chunk)
                conn.write(frame)
                conn.write(chunk)
                conn.write(b"\r\n")
                sent += len(frame) + len(chunk) + 2
            else:
                conn.write(chunk)
                sent += len(chunk)
            if conn.write_paused:
                await conn.drain()
        if conn.lost:
            return status, sent, CLIENT_GONE
        if chunked:
            conn.write(b"0\r\n\r\n")
            sent += 5
        return status, sent, None
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        log.info("upstream body failed mid-stream for %s: %s", request.target[:200], exc.__class__.__name__)
        if sent == 0:
            detail = f"upstream body failed: {exc.__class__.__name__}"
            return 502, _send_error(conn, request, 502, BODY_ERROR, detail), BODY_ERROR
        # Headers are out: the only honest signal left is to cut the client connection.
        conn.abort()
        return status, sent, BODY_ERROR
    except asyncio.CancelledError:
        if sent:  # the client went away mid-answer: say how much of it had gone out
            raise AnswerCut(status, sent) from None
        raise
    finally:
        upstream.release()


def _unwritable(conn: ClientConnection, request: ClientRequest) -> int:
    """A stage or upstream header would split the head: never write it."""
    log.error("answer for %s has a header that would break framing; not relayed", request.target[:200])
    return _send_error(conn, request, 502, UNWRITABLE, "answer headers cannot be relayed")
