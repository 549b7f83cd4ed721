"""Write-side flow control for our asyncio protocols (the client side and the upstream side).

The transport calls `pause_writing`/`resume_writing` around its high-water mark; a writer that
must not outrun the peer awaits `wait()`. A lost connection fails the waiter so nobody hangs.
"""

from __future__ import annotations

import asyncio


class WriteFlow:
    __slots__ = ("_loop", "_waiter", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.paused = False
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def wait(self) -> None:
        """Return once the transport takes writes again (at once if it does already)."""
        if not self.paused:
            return
        if self._waiter is None:
            self._waiter = self._loop.create_future()
        await self._waiter
