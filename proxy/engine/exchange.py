"""What flows between the engine and the stages that may act on a request (sessions, payments).

A stage is an `Exchanger`: it receives the prepared request and returns an `Outcome`. Stages wrap
each other like middleware; the innermost one is the plain upstream send.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL


class BodyReader(Protocol):
    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """The subset of a response the engine and stages use (aiohttp's ClientResponse satisfies it)."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> BodyReader: ...
    async def read(self) -> bytes: ...
    def release(self) -> object: ...


# Names whose handling the upstream client itself decides (framing, Host): never appended pre-encoded.
_FRAMING_NAMES = frozenset({"host", "content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class EncodedHeaders:
    """Headers a stage adds to many requests alike (a hot session's credentials), encoded once.

    `data` is `items` as head lines ("Name: value\\r\\n" each), checked against header injection when
    built; None when they cannot be encoded safely (the request then takes the ordinary copy path,
    which refuses them as before).
    """

    items: tuple[tuple[str, str], ...]
    names: frozenset[str]  # lower-case
    data: bytes | None

    @classmethod
    def build(cls, headers: dict[str, str]) -> EncodedHeaders:
        from proxy.engine.upstream_pool import encode_head

        lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
        names = frozenset(name.lower() for name in headers)
        data = encode_head(lines) if lines and not names & _FRAMING_NAMES else None
        return cls(tuple(headers.items()), names, data)


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    url: URL
    # End-to-end headers for upstream (hop-by-hop removed, Via added). Stages may add to them.
    headers: CIMultiDict[str]
    # The client's headers as received, for decisions (e.g. "already carries a payment header").
    client_headers: CIMultiDictProxy[str]
    # Whole body when it fits `max_replay_body` (replayable), else None with `body_stream` set.
    body: bytes | None
    body_stream: AsyncIterator[bytes] | None = None
    tunnelled: bool = False
    # Pre-encoded headers sent after `headers` (see `with_encoded`); none of their names is in `headers`.
    appended: EncodedHeaders | None = None

    @property
    def replayable(self) -> bool:
        return self.body_stream is None

    def has_header(self, name: str) -> bool:
        """Whether the request sent upstream carries `name` (in `headers` or appended)."""
        appended = self.appended
        return name in self.headers or (appended is not None and name.lower() in appended.names)

    def with_headers(self, extra: dict[str, str]) -> Exchange:
        """A copy whose headers carry `extra`, replacing anything the client sent under those names."""
        headers = self.headers.copy()
        if self.appended is not None:
            for name, value in self.appended.items:
                headers[name] = value
        for name, value in extra.items():
            headers[name] = value
        # Built directly: dataclasses.replace() re-inspects the fields on every call (hot path).
        return Exchange(
            self.request_id,
            self.method,
            self.url,
            headers,
            self.client_headers,
            self.body,
            self.body_stream,
            self.tunnelled,
        )

    def with_encoded(self, extra: EncodedHeaders) -> Exchange:
        """`with_headers(dict(extra.items))` without copying the headers when no name collides."""
        if extra.data is None or self.appended is not None:
            return self.with_headers(dict(extra.items))
        headers = self.headers
        for name in extra.names:
            if name in headers:
                return self.with_headers(dict(extra.items))
        return Exchange(
            self.request_id,
            self.method,
            self.url,
            self.headers,
            self.client_headers,
            self.body,
            self.body_stream,
            self.tunnelled,
            extra,
        )


# The proxy's own answer headers, rendered from an Outcome's fields at the edge (`proxy_headers`).
SESSION_HEADER = "X-402-Proxy-Session"
PAYMENT_HEADER = "X-402-Proxy-Payment"
ERROR_HEADER = "X-402-Proxy-Error"
RETRY_AFTER = "Retry-After"
_NONE: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Outcome:
    """An answer and what the stages decided about it, as fields (never as header strings to re-parse).

    `session_id`: the session whose credentials went along (or that this request opened);
    `payment_id`: the ledger row of a payment sent (or behind a refusal); `error_code`: the reason the
    proxy did not do what it would have (e.g. `budget_exhausted`); `retry_after`: seconds, with it.
    """

    response: UpstreamResponse
    # Set when a stage already read the body (e.g. to parse a 402 challenge).
    body: bytes | None = None
    session_id: str | None = None
    payment_id: int | None = None
    error_code: str | None = None
    retry_after: int | None = None

    def release_body(self) -> None:
        """Drop an answer we will not forward (its connection is not reused if the body was unread)."""
        self.response.release()

    def refuse(self, code: str, payment_id: int | None = None, retry_after: int | None = None) -> None:
        """The first reason a stage gives wins (the innermost knows best)."""
        if self.error_code is None:
            self.error_code = code
        if payment_id is not None and self.payment_id is None:
            self.payment_id = payment_id
        if retry_after is not None and self.retry_after is None:
            self.retry_after = retry_after

    def proxy_headers(self) -> tuple[tuple[str, str], ...]:
        """The fields as answer headers: rendered once, at the edge."""
        if self.session_id is None and self.payment_id is None and self.error_code is None:
            return _NONE  # the common case
        return render_proxy_headers(self.session_id, self.payment_id, self.error_code, self.retry_after)


def render_proxy_headers(
    session_id: str | None, payment_id: int | None, error_code: str | None, retry_after: int | None
) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    if session_id is not None:
        headers.append((SESSION_HEADER, session_id))
    if payment_id is not None:
        headers.append((PAYMENT_HEADER, str(payment_id)))
    if error_code is not None:
        headers.append((ERROR_HEADER, error_code))
    if retry_after is not None:
        headers.append((RETRY_AFTER, str(retry_after)))
    return tuple(headers)


Exchanger = Callable[[Exchange], Awaitable[Outcome]]
