"""What every proxied request passes: the checks before anything goes upstream (`admit`), its upstream
view (`build_exchange`), and the stage stack that sends it (`exchanger`, innermost the upstream pool).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from multidict import CIMultiDictProxy, MultiMapping
from yarl import URL

from proxy.engine import http_semantics as hs
from proxy.engine.exchange import Exchange, Exchanger, Outcome, UpstreamResponse
from proxy.engine.settings import ProxySettings
from proxy.engine.upstream import Upstream, UpstreamRequest

log = logging.getLogger("x402_proxy.engine")

_DROP_REQUEST = frozenset({"host", "expect"})
_request_ids = itertools.count(1)
_TARGET_CACHE_SIZE = 4096
_TARGET_CACHE_URL = 1024
_id_prefix = os.urandom(3).hex()


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """Attached to a client connection serving the inside of an intercepted CONNECT tunnel."""

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

    def wrap(self, stage: object) -> None:
        """Install a stage around the current exchanger (stage(inner) -> Exchanger)."""
        self._exchanger = stage(self._exchanger)  # type: ignore[operator]

    async def send_upstream(self, exchange: Exchange) -> Outcome:
        """The innermost exchanger (no stages): what the control plane builds on."""
        return await self._send(exchange)

    async def send_upgrade(self, exchange: Exchange, protocol: str) -> UpstreamResponse:
        """An upgrade offer (a WebSocket) sent as it is, past the stages: a 101 answer carries the
        connection (`PooledResponse.take_upgraded`); any other answer is relayed like every answer."""
        request = UpstreamRequest(
            exchange.method, exchange.url, exchange.headers, exchange.body, upgrade=protocol
        )
        return await self._upstream.send(request)

    def set_listen_addresses(self, addresses: list[tuple[str, int]]) -> None:
        self._listen = addresses
        self._self_checked.clear()

    @property
    def exchanger(self) -> Exchanger:
        """The full stage stack (outermost stage first); what every proxied request goes through."""
        return self._exchanger

    def admit(self, raw_target: str, headers: MultiMapping[str], tunnel: TunnelInfo | None) -> URL | Refusal:
        """The checks every request passes before anything is sent upstream."""
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

    async def _send(self, exchange: Exchange) -> Outcome:
        upstream_request = UpstreamRequest(
            exchange.method, exchange.url, exchange.headers, exchange.body, exchange.appended
        )
        response = await self._upstream.send(upstream_request, exchange.body_stream)
        return Outcome(response)
