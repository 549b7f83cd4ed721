"""One proxied request on the lean server: checks, body, the stage stack, the answer written raw.

The same decisions as `Forwarder.handle` (which still serves connections handed to aiohttp), with
the answer serialized once by `serialize_head` and written straight to the client transport.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp

from proxy.engine import http_semantics as hs
from proxy.engine.exchange import Outcome
from proxy.engine.forwarder import Forwarder, Refusal, build_exchange
from proxy.engine.lean_server import ClientBodyError, ClientRequest, LeanConnection, RequestBody
from proxy.engine.raw_response import serialize_head
from proxy.engine.responses import error_response
from proxy.engine.upstream import UpstreamError
from proxy.engine.upstream_pool import PooledResponse

log = logging.getLogger("x402_proxy.engine")

# Bodies up to this size are read whole and answered in one write: fewer syscalls for typical API calls.
SMALL_BODY: Final = 64 * 1024
STREAM_CHUNK: Final = 256 * 1024
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS: Final = frozenset({204, 304})


@dataclass(slots=True)
class CompletedRequest:
    """A proxied request whose answer has been written (or that ended in an error answer)."""

    method: str
    host: str
    status: int
    bytes_sent: int  # head and body bytes written to the client for this answer
    started: float  # loop.time() when the request's head had been parsed
    outcome: Outcome | None  # stage headers (session id, payment id) live in outcome.extra_headers


CompletionHook = Callable[[CompletedRequest], None]


class LeanExchange:
    """The request server of `LeanServer`: `await exchange(request, conn)` answers one request."""

    def __init__(self, forwarder: Forwarder, max_replay_body: int) -> None:
        self._forwarder = forwarder
        self._max_replay_body = max_replay_body
        # Called once per answered request (see `completed`); None costs nothing.
        self.on_complete: CompletionHook | None = None

    async def __call__(self, request: ClientRequest, conn: LeanConnection) -> None:
        try:
            started = conn.loop.time()
            forwarder = self._forwarder
            admitted = forwarder.admit(request.target, request.headers, conn.tunnel)
            if isinstance(admitted, Refusal):
                if admitted.close:
                    request.keep_alive = False
                sent = _send_error(
                    conn, request, admitted.status, admitted.reason_code, admitted.message, admitted.headers
                )
                self.completed(request, "", admitted.status, sent, started, None)
                return
            url = admitted
            host = url.raw_host or ""
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
                self.completed(request, host, 400, sent, started, None)
                return
            exchange = build_exchange(
                request.method, url, request.headers, request.version, conn.tunnel is not None, body, stream
            )
            try:
                outcome = await forwarder.exchanger(exchange)
            except UpstreamError as exc:
                log.info("upstream failure %s %s: %s", request.method, url.host, exc.message)
                sent = _send_error(conn, request, exc.status, exc.reason_code, exc.message, exc.extra_headers)
                self.completed(request, host, exc.status, sent, started, None)
                return
            body = _body_in_hand(request, outcome)
            if body is not None:
                try:  # the usual small answer: no coroutine for the response at all
                    status, sent = _write_whole(conn, request, outcome, body)
                finally:
                    outcome.response.release()
            else:
                status, sent = await _respond(conn, request, outcome)
            self.completed(request, host, status, sent, started, outcome)
        except Exception:  # one request must never take the server down
            conn.request_failed(request)
        finally:
            conn.request_finished(request)

    def completed(
        self,
        request: ClientRequest,
        host: str,
        status: int,
        bytes_sent: int,
        started: float,
        outcome: Outcome | None,
    ) -> None:
        """THE place a finished request is known: its answer is written (`bytes_sent` of it)."""
        hook = self.on_complete
        if hook is not None:
            hook(CompletedRequest(request.method, host, status, bytes_sent, started, outcome))

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
    conn: LeanConnection,
    request: ClientRequest,
    status: int,
    code: str,
    message: str,
    extra: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
) -> int:
    data = error_response(request.version, status, code, message, conn.keep_alive(request), extra)
    conn.write(data)
    return len(data)


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
    conn: LeanConnection, request: ClientRequest, outcome: Outcome, body: bytes
) -> tuple[int, int]:
    """Head and body in one write (for HEAD, `body` is empty); (status, bytes written)."""
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
        outcome.extra_headers,
        out_length,
        conn.keep_alive(request),
    )
    if head is None:
        return 502, _unwritable(conn, request)
    data = head + body if body else head
    conn.write(data)
    return status, len(data)


async def _respond(conn: LeanConnection, request: ClientRequest, outcome: Outcome) -> tuple[int, int]:
    """Write the upstream's answer; (status, bytes written)."""
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
            outcome.extra_headers,
            length,
            conn.keep_alive(request),
            chunked=chunked,
        )
        if head is None:
            return 502, _unwritable(conn, request)
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
        if chunked and not conn.lost:
            conn.write(b"0\r\n\r\n")
            sent += 5
        return status, sent
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
        log.info("upstream body failed mid-stream for %s: %s", request.target[:200], exc.__class__.__name__)
        if sent == 0:
            return 502, _send_error(
                conn, request, 502, "upstream_body_error", f"upstream body failed: {exc.__class__.__name__}"
            )
        # Headers are out: the only honest signal left is to cut the client connection.
        conn.abort()
        return status, sent
    finally:
        upstream.release()


def _unwritable(conn: LeanConnection, request: ClientRequest) -> int:
    """A stage or upstream header would split the head: never write it."""
    log.error("answer for %s has a header that would break framing; not relayed", request.target[:200])
    return _send_error(conn, request, 502, "upstream_bad_response", "answer headers cannot be relayed")
