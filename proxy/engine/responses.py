"""What the proxy writes to a client: the head of a relayed answer, and its own (error) answers, which
are always plain text with a stable reason code header."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from proxy.engine import http_semantics as hs
from proxy.engine.exchange import ERROR_HEADER
from proxy.engine.upstream_pool import encode_head

__all__ = ["ERROR_HEADER"]

_SKIP: Final = hs.HOP_BY_HOP | {"content-length"}

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
    extra: Sequence[tuple[str, str]],
    content_length: int | None,
    keep_alive: bool,
    chunked: bool = False,
    upgrade: str | None = None,
) -> bytes | None:
    """Status line and end-to-end headers of a relayed answer; None if a header would break the framing.

    With `chunked` the body that follows is sent with chunked transfer coding (HTTP/1.1 clients only).
    With `upgrade` (a 101) the head names that protocol and `Connection: Upgrade` instead of keep-alive.
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
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}\r\n")
        lines.append("Connection: Upgrade\r\n")
    else:
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        connection = hs.connection_line(version, keep_alive)
        if connection:  # encode_head counts one CRLF per line: never append an empty one
            lines.append(connection)
    lines.append("\r\n")
    return encode_head(lines)


def raw_error(status: int, phrase: str, reason_code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response for the front door (a CONNECT it refuses)."""
    body = f"x402-proxy: {message}\n".encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        f"{ERROR_HEADER}: {reason_code}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


def error_response(
    version: tuple[int, int],
    status: int,
    reason_code: str,
    message: str,
    keep_alive: bool,
    extra: Iterable[tuple[str, str]] = (),
) -> bytes:
    """One of the proxy's own answers, as finished bytes: plain text, the reason code in `ERROR_HEADER`."""
    body = f"x402-proxy: {message}\n".encode()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [
        f"HTTP/{version[0]}.{version[1]} {status} {phrase}\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        f"Content-Length: {len(body)}\r\n",
        f"Date: {http_date()}\r\n",
        f"{ERROR_HEADER}: {reason_code}\r\n",
    ]
    # Stage headers (a ledger id) and the message are ours; line breaks in them would split the head.
    lines.extend(f"{name}: {value}\r\n" for name, value in extra if "\r" not in value and "\n" not in value)
    connection = hs.connection_line(version, keep_alive)
    if connection:  # encode_head counts one CRLF per line: never append an empty one
        lines.append(connection)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape") + body


def classify_request_error(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """(status, code, text) for a request aiohttp's server could not parse or handle (the admin API).

    aiohttp's own messages echo client bytes; these name the problem without reflecting input.
    """
    if isinstance(exc, LineTooLong):
        return 431, "headers_too_large", "request line or a header is too long"
    if isinstance(exc, BadHttpMessage) or 400 <= status < 500:
        return 400, "bad_request", f"malformed request ({type(exc).__name__ if exc else 'bad request'})"
    return 500, "internal_error", "internal error (see the proxy log)"
