"""Answers the proxy itself writes: always plain text with a stable reason code header."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from proxy.engine import http_semantics as hs
from proxy.engine.raw_response import http_date

ERROR_HEADER = "X-402-Proxy-Error"


def proxy_error(status: int, reason_code: str, message: str, *, close: bool = False) -> web.Response:
    response = web.Response(
        status=status,
        text=f"x402-proxy: {message}\n",
        content_type="text/plain",
        headers={ERROR_HEADER: reason_code},
    )
    if close:
        response.force_close()
    return response


def raw_error(status: int, phrase: str, reason_code: str, message: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 error response for the front door, which has no aiohttp request yet."""
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
    """`proxy_error` as finished bytes, for the lean server (same headers, no Server header)."""
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
    """(status, code, text) for a request aiohttp could not parse or handle.

    aiohttp's own messages echo client bytes; these name the problem without reflecting input.
    """
    if isinstance(exc, LineTooLong):
        return 431, "headers_too_large", "request line or a header is too long"
    if isinstance(exc, BadHttpMessage) or 400 <= status < 500:
        return 400, "bad_request", f"malformed request ({type(exc).__name__ if exc else 'bad request'})"
    return 500, "internal_error", "internal error (see the proxy log)"
