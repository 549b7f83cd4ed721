"""Per-request forwarding: turn a client request into an upstream exchange and stream the answer back."""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy, MultiMapping
from yarl import URL

from proxy.engine import http_semantics as hs
from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.raw_response import relay_response
from proxy.engine.responses import proxy_error
from proxy.engine.settings import ProxySettings
from proxy.engine.upstream import Upstream, UpstreamError, UpstreamRequest
from proxy.engine.upstream_pool import PooledResponse

log = logging.getLogger("x402_proxy.engine")

# Bodies up to this size are read whole and answered in one write: fewer syscalls for typical API calls.
_SMALL_BODY = 64 * 1024
_STREAM_CHUNK = 256 * 1024
_DROP_REQUEST = frozenset({"host", "expect"})
_DROP_RESPONSE = frozenset({"content-length"})
_request_ids = itertools.count(1)
_TARGET_CACHE_SIZE = 4096
_TARGET_CACHE_URL = 1024
_id_prefix = os.urandom(3).hex()


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """Attached to a request handler serving the inside of an intercepted CONNECT tunnel."""

    authority: hs.Authority
    # Some clients (undici's proxy agent, websockets for ws://) tunnel plain HTTP through CONNECT too.
    tls: bool = True

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def check_proxy_auth(settings: ProxySettings, header: str | None) -> bool:
    if not settings.auth.enabled:
        return True
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, _, password = decoded.partition(":")
    expected = f"{settings.auth.username}:{settings.auth.password}".encode()
    return hmac.compare_digest(f"{user}:{password}".encode(), expected)


PROXY_AUTH_CHALLENGE = 'Basic realm="x402-proxy", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the proxy answers itself, before anything goes upstream."""

    status: int
    reason_code: str
    message: str
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()


def build_exchange(
    method: str,
    url: URL,
    client_headers: CIMultiDictProxy[str],
    version: tuple[int, int],
    tunnelled: bool,
    body: bytes | None,
    stream: AsyncIterator[bytes] | None,
) -> Exchange:
    """The upstream view of a client request: end-to-end headers only, Via added, a fresh request id."""
    headers = hs.end_to_end_headers(
        client_headers.items(), hs.connection_tokens(client_headers), _DROP_REQUEST
    )
    headers["Via"] = hs.via_value(headers.pop("Via", None), version)
    return Exchange(
        f"{_id_prefix}-{next(_request_ids)}",
        method,
        url,
        headers,
        client_headers,
        body,
        stream,
        tunnelled,
    )


class Forwarder:
    def __init__(
        self,
        settings: ProxySettings,
        upstream: Upstream,
        listen_addresses: list[tuple[str, int]],
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._listen = listen_addresses
        self._local_names = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
        self._exchanger: Exchanger = self._send
        self._targets: dict[str, URL] = {}  # request target -> its checked URL (see _target_url)
        # URL -> why its host is refused ((code, message): aimed at one of our listeners, or another
        # spelling of an IPv4 address), () if it is not. Depends only on the listen addresses, which
        # reset it.
        self._self_checked: dict[URL, tuple[str, str] | tuple[()]] = {}
        from proxy.engine.websocket_relay import relay_websocket

        self._relay_websocket = relay_websocket

    def wrap(self, stage: object) -> None:
        """Install a stage around the current exchanger (stage(inner) -> Exchanger)."""
        self._exchanger = stage(self._exchanger)  # type: ignore[operator]

    async def send_upstream(self, exchange: Exchange) -> Outcome:
        """The innermost exchanger (no stages): what the control plane builds on."""
        return await self._send(exchange)

    def set_listen_addresses(self, addresses: list[tuple[str, int]]) -> None:
        self._listen = addresses
        self._self_checked.clear()

    @property
    def exchanger(self) -> Exchanger:
        """The full stage stack (outermost stage first); what every proxied request goes through."""
        return self._exchanger

    def admit(self, raw_target: str, headers: MultiMapping[str], tunnel: TunnelInfo | None) -> URL | Refusal:
        """The checks every request passes before anything is sent upstream (shared by both servers)."""
        if (
            tunnel is None
            and self._settings.auth.enabled
            and not check_proxy_auth(self._settings, headers.get("Proxy-Authorization"))
        ):
            return Refusal(
                407,
                "proxy_auth_required",
                "proxy authentication required",
                headers=(("Proxy-Authenticate", PROXY_AUTH_CHALLENGE),),
            )
        try:
            url = self._target_url(raw_target, tunnel)
        except hs.TargetError as exc:
            return Refusal(400, "bad_request_target", str(exc))
        problem = hs.framing_error(headers)
        if problem:
            return Refusal(400, "bad_framing", problem, close=True)
        if "Via" in headers and hs.via_has_loop(headers.getall("Via")):
            return Refusal(508, "loop_detected", "request already passed through this proxy")
        if tunnel is None:  # a tunnel's authority passed the same checks at its CONNECT
            refused = self._self_checked.get(url)
            if refused is None:
                refused = self._host_refusal(url)
                if len(raw_target) <= _TARGET_CACHE_URL:
                    if len(self._self_checked) >= _TARGET_CACHE_SIZE:
                        self._self_checked.clear()
                    self._self_checked[url] = refused
            if refused:
                return Refusal(400, refused[0], refused[1])
        return url

    def _host_refusal(self, url: URL) -> tuple[str, str] | tuple[()]:
        """Why the target's host is refused, or () (see `admit`): aimed at us, or not canonical."""
        authority = hs.Authority((url.raw_host or "").lower(), url.port or 0)
        if hs.is_self_target(authority, self._listen, self._local_names):
            return ("self_target", "request is aimed at the proxy itself")
        return hs.host_refusal(authority, self._listen, self._local_names) or ()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's handler entry: connections handed over by the lean server (upgrades) land here."""
        tunnel: TunnelInfo | None = getattr(request.protocol, "x402_tunnel", None)
        admitted = self.admit(request.raw_path, request.headers, tunnel)
        if isinstance(admitted, Refusal):
            response = proxy_error(
                admitted.status, admitted.reason_code, admitted.message, close=admitted.close
            )
            for name, value in admitted.headers:
                response.headers[name] = value
            return response
        url = admitted

        if hs.is_websocket_upgrade(request.headers):
            return await self._relay_websocket(request, url, self._upstream, self._settings)

        exchange = await self._prepare(request, url, tunnel is not None)
        try:
            outcome = await self._exchanger(exchange)
        except UpstreamError as exc:
            log.info("upstream failure %s %s: %s", request.method, url.host, exc.message)
            response = proxy_error(exc.status, exc.reason_code, exc.message)
            for name, value in exc.extra_headers:
                response.headers[name] = value
            return response
        return await self._respond(request, outcome)

    def _target_url(self, raw: str, tunnel: TunnelInfo | None) -> URL:
        if tunnel is not None:
            return self._parse_target(raw, tunnel)
        # Absolute-form targets recur (an agent calls the same endpoints): parse and check each once.
        url = self._targets.get(raw)
        if url is None:
            url = self._parse_target(raw, None)
            if len(raw) <= _TARGET_CACHE_URL:  # bounded memory: entries of at most 1 KiB
                if len(self._targets) >= _TARGET_CACHE_SIZE:
                    self._targets.clear()
                self._targets[raw] = url
        return url

    def _parse_target(self, raw: str, tunnel: TunnelInfo | None) -> URL:
        if tunnel is not None:
            if not raw.startswith("/"):
                if raw.startswith(("http://", "https://")):
                    # Absolute-form inside a tunnel: honour only the path, the tunnel fixes the origin.
                    raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
                else:
                    raise hs.TargetError("request target inside the tunnel must start with /")
            netloc = tunnel.authority.netloc(tunnel.scheme)
            try:
                tunnelled = URL(f"{tunnel.scheme}://{netloc}{raw}", encoded=True)
                tunnel_host = tunnelled.host  # an invalid xn-- label raises here, not mid-exchange
            except ValueError as exc:
                raise hs.TargetError(f"unparseable tunnel authority: {exc}") from exc
            if not tunnel_host:
                raise hs.TargetError("tunnel authority has no host")
            return tunnelled
        if raw.startswith("/") or raw == "*":
            raise hs.TargetError(
                "this is a forward proxy: send absolute-form requests (http://host/path) or CONNECT"
            )
        try:
            url = URL(raw, encoded=True)
            host = url.host  # decodes IDNA: an invalid xn-- label raises UnicodeError (a ValueError)
        except ValueError as exc:
            raise hs.TargetError(f"unparseable request target: {exc}") from exc
        if url.scheme not in ("http", "https", "ws", "wss") or not host:
            raise hs.TargetError(f"unsupported request target {raw[:200]!r}")
        if url.user is not None or url.password is not None:
            raise hs.TargetError("credentials in the request URL are not forwarded")
        if url.scheme in ("ws", "wss"):
            url = url.with_scheme("http" if url.scheme == "ws" else "https")
        return url

    async def _prepare(self, request: web.BaseRequest, url: URL, tunnelled: bool) -> Exchange:
        if hs.expects_continue(request.headers):
            # The low-level server never sends 100 itself and the upstream client would wait for one:
            # answer it here and strip the expectation (RFC 9110 10.1.1 lets a proxy do so).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, stream = await self._read_body(request)
        return build_exchange(request.method, url, request.headers, request.version, tunnelled, body, stream)

    async def _read_body(self, request: web.BaseRequest) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
        if not request.body_exists:
            return None, None
        limit = self._settings.max_replay_body
        length = request.content_length
        if length is not None and length > limit:
            return None, _iterate(request.content, b"")
        buffered = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buffered), None
            buffered += chunk
            if len(buffered) > limit:
                # Too big to keep for a paid replay: stream what we have plus the rest.
                return None, _iterate(request.content, bytes(buffered))

    async def _send(self, exchange: Exchange) -> Outcome:
        upstream_request = UpstreamRequest(
            exchange.method, exchange.url, exchange.headers, exchange.body, exchange.appended
        )
        response = await self._upstream.send(upstream_request, exchange.body_stream)
        return Outcome(response)

    async def _respond(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        upstream = outcome.response
        stream: web.StreamResponse | None = None
        try:
            body = outcome.body
            length = upstream.content_length
            is_head = request.method == "HEAD"
            if body is None and not is_head:
                if length is not None and length <= _SMALL_BODY:
                    body = await upstream.read()
                elif length is None and isinstance(upstream, PooledResponse) and upstream.complete_in_buffer:
                    # A small chunked (or close-delimited) answer that has fully arrived: relay it whole.
                    body = await upstream.read()
            listed = hs.connection_tokens(upstream.headers)
            if body is not None or is_head:
                # Keep a HEAD answer's Content-Length: it describes the body a GET would get.
                relayed = relay_response(
                    request,
                    upstream.status,
                    upstream.reason,
                    upstream.headers.items(),
                    listed,
                    outcome.extra_headers,
                    body or b"",
                    length,
                )
                if relayed is not None:
                    return relayed
            headers = hs.end_to_end_headers(upstream.headers.items(), listed, _DROP_RESPONSE)
            for name, value in outcome.extra_headers:
                headers[name] = value
            if is_head:
                stream = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
                if length is not None:
                    stream.content_length = length
                return stream
            if body is not None:
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=headers, body=body
                )
            stream = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            if length is not None:
                stream.content_length = length
            await stream.prepare(request)
            async for chunk in upstream.content.iter_chunked(_STREAM_CHUNK):
                await stream.write(chunk)
            await stream.write_eof()
            return stream
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            log.info("upstream body failed mid-stream for %s: %s", request.url.host, exc.__class__.__name__)
            if stream is None or not stream.prepared:
                return proxy_error(
                    502, "upstream_body_error", f"upstream body failed: {exc.__class__.__name__}"
                )
            # Headers are out: the only honest signal left is to cut the client connection.
            if request.transport is not None:
                request.transport.abort()
            return stream
        finally:
            upstream.release()


async def _iterate(content: aiohttp.StreamReader, head: bytes) -> AsyncIterator[bytes]:
    if head:
        yield head
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        yield chunk
