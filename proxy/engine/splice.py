"""Two transports joined byte for byte: passthrough tunnels, and a WebSocket after its 101.

Each side's protocol writes what it reads to the other side. Backpressure runs both ways: when one
side's write buffer is over its high-water mark, reading from the other side pauses until it drains.
An EOF is passed on as a half-close where both ends can express one (plain TCP); where one cannot
(TLS has no half-close), the splice closes both sides once what was written has been flushed.
"""

from __future__ import annotations

import asyncio
import contextlib

# What a transport that is closing underneath us may raise when written, paused or resumed.
_EXPECTED = (RuntimeError, OSError, AttributeError)


class _End(asyncio.Protocol):
    """One side of a splice: its transport's reads are written to the peer's transport."""

    def __init__(self, splice: Splice, transport: asyncio.Transport) -> None:
        self.splice = splice
        self.transport = transport
        self.peer: _End | None = None
        self.eof = False
        self.lost = False
        self.written = 0  # bytes written to this side's transport

    def write(self, data: bytes) -> None:
        if data and not self.lost:
            self.written += len(data)
            with contextlib.suppress(*_EXPECTED):
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer
        assert peer is not None
        if peer.eof or peer.lost:
            peer.transport.close()
            return False
        if self.transport.can_write_eof() and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep writing to this side what the peer still sends
        # One side cannot half-close: end both (close() flushes what is buffered first).
        peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and not peer.lost:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        self.splice._lost()

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            with contextlib.suppress(*_EXPECTED):
                peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            with contextlib.suppress(*_EXPECTED):
                peer.transport.resume_reading()


class Splice:
    """Join `a` and `b` (paused or reading): `a_first` is written to `a`, `b_first` to `b` first;
    `b_ended` says `b` has already sent its EOF.

    The transports' protocols are replaced; `await splice.wait()` returns when both sides are closed.
    """

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        a_first: bytes = b"",
        b_first: bytes = b"",
        b_ended: bool = False,
    ) -> None:
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.a = _End(self, a)
        self.b = _End(self, b)
        self.a.peer, self.b.peer = self.b, self.a
        a.set_protocol(self.a)
        b.set_protocol(self.b)
        self.a.write(a_first)
        self.b.write(b_first)
        if b_ended and not self.b.eof_received():  # `b` sent its EOF before the splice took over
            b.close()
        for end in (self.a, self.b):
            if end.transport.is_closing() and not end.lost:
                # Closed before the splice took over: its connection_lost went to the old protocol.
                end.connection_lost(None)
            else:
                with contextlib.suppress(*_EXPECTED):
                    end.transport.resume_reading()

    def _lost(self) -> None:
        if self.a.lost and self.b.lost and not self._done.done():
            self._done.set_result(None)

    def abort(self) -> None:
        for end in (self.a, self.b):
            if not end.lost:
                end.transport.abort()

    async def wait(self) -> None:
        """Until both sides are closed (cancelled: both are aborted)."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.abort()
            raise


class Pending(asyncio.Protocol):
    """The protocol of a connection opened to be spliced: holds what arrives before `Splice` takes over."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.held = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.held += data  # only what was in flight when reading paused

    def eof_received(self) -> bool | None:
        self.eof = True  # passed on by the splice (`b_ended`)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
