"""The pooled upstream HTTP client, configured for proxying rather than browsing."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.engine.settings import UpstreamSettings

# aiohttp would otherwise invent these; a proxy must send only what the client sent.
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})
# Challenges with many requirements and extensions exceed aiohttp's 8 KiB default field size.
MAX_UPSTREAM_FIELD = 128 * 1024


class UpstreamError(Exception):
    """Upstream could not be reached or answered badly; carries the status to return."""

    def __init__(self, status: int, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason_code = reason_code
        self.message = message
        # Stages add headers here (e.g. the ledger id of a payment sent before the failure).
        self.extra_headers: list[tuple[str, str]] = []


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | None


class Upstream:
    def __init__(self, settings: UpstreamSettings, ssl_context: ssl.SSLContext) -> None:
        self._settings = settings
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,  # the client decides concurrency, not us
                ssl=self._ssl,
                ttl_dns_cache=10,
                keepalive_timeout=30,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,  # an inherited HTTPS_PROXY pointing at ourselves would loop
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self._settings.connect_timeout,
                    sock_read=self._settings.idle_timeout,
                ),
                skip_auto_headers=_SKIP_AUTO,
                max_line_size=MAX_UPSTREAM_FIELD,
                max_field_size=MAX_UPSTREAM_FIELD,
                read_bufsize=256 * 1024,
            )
        return self._session

    async def send(
        self, request: UpstreamRequest, body_stream: object | None = None
    ) -> aiohttp.ClientResponse:
        """Send one request; map transport failures to UpstreamError with a readable reason."""
        data = body_stream if body_stream is not None else request.body
        try:
            return await self.session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamError(
                502,
                "upstream_tls_error",
                f"upstream TLS certificate verification failed for {_host(request)}: {exc.certificate_error}",
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError(
                502,
                "upstream_tls_error",
                f"TLS handshake with upstream {_host(request)} failed: {_reason(exc)}",
            ) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamError(
                504, "upstream_connect_timeout", f"connecting to upstream {_host(request)} timed out"
            ) from exc
        except aiohttp.SocketTimeoutError as exc:
            raise UpstreamError(
                504, "upstream_timeout", f"upstream {_host(request)} did not answer in time"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                502, "upstream_unreachable", f"cannot connect to upstream {_host(request)}: {_reason(exc)}"
            ) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise UpstreamError(
                502,
                "upstream_disconnected",
                f"upstream {_host(request)} closed the connection without answering",
            ) from exc
        except aiohttp.ClientResponseError as exc:
            raise UpstreamError(
                502,
                "upstream_bad_response",
                f"upstream {_host(request)} sent an invalid response: {exc.message}",
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                502, "upstream_error", f"upstream {_host(request)} failed: {_reason(exc)}"
            ) from exc
        except TimeoutError as exc:
            raise UpstreamError(504, "upstream_timeout", f"upstream {_host(request)} timed out") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _host(request: UpstreamRequest) -> str:
    return f"{request.url.host}:{request.url.port}"


def _reason(exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    text = str(exc) or type(exc).__name__
    return text[:300]
