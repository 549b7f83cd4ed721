"""Relaying a response whose body is already in hand: serialized once by us, written in one call.

aiohttp's `web.Response` copies the headers, adds `Server` and a default `Content-Type` (neither
belongs in a relayed answer), then serializes them again; for a small relayed body that is a large
share of the proxy's per-request cost. `RawResponse` carries finished bytes and plugs into aiohttp's
request handler through the public `prepare`/`write_eof` calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.engine import http_semantics as hs
from proxy.engine.upstream_pool import encode_head

_SKIP: Final = hs.HOP_BY_HOP | {"content-length"}
_NO_BODY_STATUS: Final = frozenset({204, 304})

_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def serialize_head(
    version: tuple[int, int],
    status: int,
    reason: str,
    upstream_headers: Iterable[tuple[str, str]],
    connection_listed: set[str],
    extra: list[tuple[str, str]],
    content_length: int | None,
    keep_alive: bool,
    chunked: bool = False,
) -> bytes | None:
    """Status line and end-to-end headers; None if a header would break the framing (caller falls back).

    With `chunked` the body that follows is sent with chunked transfer coding (HTTP/1.1 clients only).
    """
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {reason}\r\n"]
    skip = _SKIP
    if connection_listed and not connection_listed <= skip:  # "keep-alive" alone is skipped anyway
        skip = skip | connection_listed
    # Names a stage sets: they replace the upstream's (checked apart from `skip`: no set union per answer).
    replaced: tuple[str, ...] | Iterable[str] = ()
    if len(extra) == 1:  # the usual case (a session or payment id)
        replaced = (extra[0][0].lower(),)
    elif extra:
        # Of a stage's repeats the last one wins.
        last = {name.lower(): (name, value) for name, value in extra}
        extra = list(last.values())
        replaced = last.keys()
    has_date = False
    append = lines.append
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in skip or lower in replaced:
            continue
        if lower == "date":
            has_date = True
        append(f"{name}: {value}\r\n")
    for name, value in extra:
        lines.append(f"{name}: {value}\r\n")
    if not has_date:
        # RFC 9110 6.6.1: a recipient with a clock adds Date when forwarding a response without one.
        lines.append(f"Date: {http_date()}\r\n")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    elif chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    connection = hs.connection_line(version, keep_alive)
    if connection:  # encode_head counts one CRLF per line: never append an empty one
        lines.append(connection)
    lines.append("\r\n")
    return encode_head(lines)


class RawResponse(web.StreamResponse):
    """A complete response (head and body) already serialized."""

    def __init__(self, status: int, reason: str, data: bytes, keep_alive: bool) -> None:
        super().__init__(status=status, reason=reason)
        self._raw = data
        self._keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is None:
            self._req = request
            self._payload_writer = request.writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "prepare() first"
        await writer.write_eof(self._raw)
        self._eof_sent = True
        self._req = None
        self._body_length = len(self._raw)
        self._payload_writer = None


def relay_response(
    request: web.BaseRequest,
    status: int,
    reason: str | None,
    upstream_headers: Iterable[tuple[str, str]],
    connection_listed: set[str],
    extra: list[tuple[str, str]],
    body: bytes,
    head_length: int | None,
) -> RawResponse | None:
    """The whole answer for a body in hand (for HEAD, `head_length` is the upstream's Content-Length)."""
    keep_alive = request.keep_alive
    if request.method == "HEAD":
        length, body = head_length, b""
    elif status in _NO_BODY_STATUS:
        length, body = None, b""
    else:
        length = len(body)
    text_reason = reason if reason is not None else ""
    head = serialize_head(
        request.version, status, text_reason, upstream_headers, connection_listed, extra, length, keep_alive
    )
    if head is None:
        return None
    return RawResponse(status, text_reason, head + body if body else head, keep_alive)
