"""The pooled upstream HTTP client (`upstream_pool.py`), configured for proxying rather than browsing."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from multidict import CIMultiDict
from yarl import URL

from proxy.engine.exchange import EncodedHeaders, UpstreamResponse
from proxy.engine.settings import UpstreamSettings
from proxy.engine.upstream_pool import (
    DisconnectedError,
    HeadTimeoutError,
    NoResponseError,
    PoolKey,
    RequestBodyError,
    RequestHeadError,
    ResponseHeadError,
    SelfTargetError,
    UpstreamConnection,
    UpstreamPool,
    build_head,
)

# Challenges with many requirements and extensions exceed the usual 8 KiB field size.
MAX_UPSTREAM_FIELD = 128 * 1024
MAX_UPSTREAM_HEAD = 1024 * 1024
# Requests carrying any of these may move money: never sent twice by the transport.
# Requests carrying a signed payment are never sent twice by the pool: if the first copy reached the
# server the outcome is recorded as unknown rather than guessed. (A resent Sign-In-With-X moves no
# money, so it may ride the ordinary stale-connection retry.)
PAYMENT_HEADERS = ("PAYMENT-SIGNATURE", "X-PAYMENT")
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HOST_CACHE_SIZE = 4096


class UpstreamError(Exception):
    """Upstream could not be reached or answered badly; carries the status to return."""

    def __init__(self, status: int, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason_code = reason_code
        self.message = message
        # The ledger row of a payment sent before the failure (the client is told it with the error).
        self.payment_id: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | None
    # Pre-encoded header lines sent after `headers` (a session's credentials; names not in `headers`).
    appended: EncodedHeaders | None = None
    # A protocol upgrade offered with the request (the client's `Upgrade` value, e.g. "websocket"):
    # sent with `Connection: Upgrade`; a 101 answer hands its connection over (`take_upgraded`).
    upgrade: str | None = None


class Upstream:
    def __init__(self, settings: UpstreamSettings, ssl_context: ssl.SSLContext) -> None:
        self._settings = settings
        self._ssl = ssl_context
        self._pool: UpstreamPool | None = None
        # Set by the app: the addresses of every listener of this process (refused as upstreams).
        self.own_listeners: Callable[[], list[tuple[str, int]]] | None = None
        self._hosts: dict[PoolKey, str] = {}

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:
            self._pool = UpstreamPool(
                asyncio.get_running_loop(),
                self._ssl,
                connect_timeout=self._settings.connect_timeout,
                idle_timeout=self._settings.idle_timeout,
                max_field=MAX_UPSTREAM_FIELD,
                max_head=MAX_UPSTREAM_HEAD,
            )
            self._pool.own_listeners = self.own_listeners
        return self._pool

    async def send(
        self, request: UpstreamRequest, body_stream: AsyncIterator[bytes] | None = None
    ) -> UpstreamResponse:
        """Send one request over a pooled connection; failures become UpstreamError with a readable reason.

        A request is sent a second time (on a new connection) only when the first connection died before
        a single response byte arrived, the request was idempotent or went out on a reused connection
        (the classic keep-alive race), its body is replayable, and it carries no payment header.
        """
        url = request.url
        key: PoolKey = (url.scheme, url.raw_host or "", url.port or 0)
        head, stream_length = self._head(request, body_stream, key)
        body = request.body if body_stream is None else None
        is_head = request.method == "HEAD"
        pool = self.pool
        conn = pool.acquire(key)
        try:
            if conn is None:
                conn = await self._connect(key, request)
            upgrade = request.upgrade is not None
            try:
                return await conn.exchange(head, body, body_stream, stream_length, is_head, upgrade)
            except NoResponseError as exc:
                if not (
                    body_stream is None
                    and (exc.reused or request.method in _IDEMPOTENT)
                    and not _carries_payment(request)
                ):
                    raise
            conn = await self._connect(key, request)
            return await conn.exchange(head, body, None, None, is_head, upgrade)
        except UpstreamError:
            raise
        except Exception as exc:
            raise _map_error(exc, request) from exc

    def _head(
        self, request: UpstreamRequest, body_stream: AsyncIterator[bytes] | None, key: PoolKey
    ) -> tuple[bytes, int | None]:
        headers = request.headers
        extra: tuple[tuple[str, str], ...] = ()
        stream_length: int | None = None
        if body_stream is not None:
            declared = headers.get("Content-Length")
            if declared is not None and declared.isascii() and declared.isdigit():
                stream_length = int(declared)
            else:
                if declared is not None:
                    headers = headers.copy()
                    del headers["Content-Length"]
                extra = (("Transfer-Encoding", "chunked"),)
        elif request.body is not None:
            length = str(len(request.body))
            if headers.get("Content-Length") != length:
                headers = headers.copy()
                headers["Content-Length"] = length
        elif request.method in _BODY_METHODS and "Content-Length" not in headers:
            extra = (("Content-Length", "0"),)
        if request.upgrade is not None:
            extra = (*extra, ("Connection", "Upgrade"), ("Upgrade", request.upgrade))
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= _HOST_CACHE_SIZE:
                self._hosts.clear()
            host = self._hosts[key] = _host_header(request.url)
        try:
            head = build_head(request.method, request.url.raw_path_qs, host, headers, extra)
        except (RequestHeadError, UnicodeEncodeError) as exc:
            raise UpstreamError(400, "bad_request_header", f"request cannot be forwarded: {exc}") from exc
        appended = request.appended
        if appended is not None and appended.data is not None:
            head = head[:-2] + appended.data + b"\r\n"
        return head, stream_length

    async def _connect(self, key: PoolKey, request: UpstreamRequest) -> UpstreamConnection:
        try:
            return await self.pool.connect(key)
        except SelfTargetError as exc:
            raise UpstreamError(400, "self_target", f"request is aimed at the proxy itself: {exc}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(
                502,
                "upstream_tls_error",
                f"upstream TLS certificate verification failed for {_host(request)}: "
                f"{exc.verify_message or exc.reason}",
            ) from exc
        except ssl.SSLError as exc:
            raise UpstreamError(
                502,
                "upstream_tls_error",
                f"TLS handshake with upstream {_host(request)} failed: {exc.reason or _reason(exc)}",
            ) from exc
        except TimeoutError as exc:
            raise UpstreamError(
                504, "upstream_connect_timeout", f"connecting to upstream {_host(request)} timed out"
            ) from exc
        except OSError as exc:
            raise UpstreamError(
                502, "upstream_unreachable", f"cannot connect to upstream {_host(request)}: {_reason(exc)}"
            ) from exc

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _map_error(exc: Exception, request: UpstreamRequest) -> UpstreamError:
    host = _host(request)
    if isinstance(exc, NoResponseError | DisconnectedError):
        return UpstreamError(
            502, "upstream_disconnected", f"upstream {host} closed the connection without answering"
        )
    if isinstance(exc, HeadTimeoutError):
        return UpstreamError(504, "upstream_timeout", f"upstream {host} did not answer in time")
    if isinstance(exc, ResponseHeadError):
        return UpstreamError(502, "upstream_bad_response", f"upstream {host} sent an invalid response: {exc}")
    if isinstance(exc, RequestBodyError):
        return UpstreamError(
            502, "upstream_error", f"sending the request body to upstream {host} failed: {exc}"
        )
    if isinstance(exc, TimeoutError):
        return UpstreamError(504, "upstream_timeout", f"upstream {host} timed out")
    return UpstreamError(502, "upstream_error", f"upstream {host} failed: {_reason(exc)}")


def _carries_payment(request: UpstreamRequest) -> bool:
    appended = request.appended.names if request.appended is not None else frozenset()
    return any(name in request.headers or name.lower() in appended for name in PAYMENT_HEADERS)


def _host_header(url: URL) -> str:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if url.port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    return host


def _host(request: UpstreamRequest) -> str:
    return f"{request.url.host}:{request.url.port}"


def _reason(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    text = str(exc) or type(exc).__name__
    return text[:300]
