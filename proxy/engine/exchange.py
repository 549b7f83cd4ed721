"""What flows between the engine and the stages that may act on a request (sessions, payments).

A stage is an `Exchanger`: it receives the prepared request and returns an `Outcome`. Stages wrap
each other like middleware; the innermost one is the plain upstream send.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
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

    @property
    def replayable(self) -> bool:
        return self.body_stream is None

    def with_headers(self, extra: dict[str, str]) -> Exchange:
        """A copy whose headers carry `extra`, replacing anything the client sent under those names."""
        headers = self.headers.copy()
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


@dataclass(slots=True)
class Outcome:
    response: UpstreamResponse
    # Set when a stage already read the body (e.g. to parse a 402 challenge).
    body: bytes | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)

    def release_body(self) -> None:
        """Drop an answer we will not forward (its connection is not reused if the body was unread)."""
        self.response.release()


Exchanger = Callable[[Exchange], Awaitable[Outcome]]
