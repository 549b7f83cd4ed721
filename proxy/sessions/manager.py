"""Live sessions: the in-memory hot index, durable saves, and one payment in flight per scope.

Lookups never touch the database: the index finds candidate ids by origin and path segments, and a
cachetools TLRU cache holds the sessions themselves, each expiring at its own `expires_at`, so an
expired session stops matching at once. Creation and ending are written through; call counts and
last-used times are flushed every `flush_interval` seconds (they may lag by that much after a crash).

Two kinds of store. The blocking SqliteSessionStore is written through on the caller's thread, as it
always was. An AsyncSessionStore (SQLite on a thread, or PostgreSQL shared by a fleet) is written behind:
`add`, `renewed`, `save` and `end` change memory at once and queue the write, in call order; `await
written()` waits until every queued write is durable (StoreError if one failed). With an async store:

- call counts are flushed as increments (`add_calls`), so the counts of several replicas add up;
- `run_watcher` applies the sessions other replicas save: an ended or expired one leaves this
  replica's index at once (the local object is ended too, so a request routed to it just before
  attaches nothing), a new or renewed one is added or replaced (this replica's unflushed calls kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from cachetools import TLRUCache

from proxy.sessions.index import SessionIndex
from proxy.sessions.model import Session
from proxy.sessions.scope import NormalizedURL
from proxy.store.base import StoreError
from proxy.store.locks import KeyedLocks
from proxy.store.session_store import AsyncSessionStore, SqliteSessionStore

log = logging.getLogger("x402_proxy.sessions")

MAX_LIVE_SESSIONS = 1_000_000


class _LiveSessions(TLRUCache[str, Session]):
    """The TLRU cache, telling the index whenever it drops a session on its own (expiry or size).

    The cache expires entries on every insert without saying which; an index that only learnt of
    expiry from lookups would keep every scope nobody asks for again (one per exact-URL payment).
    """

    def __init__(self, maxsize: int, clock: Callable[[], float], dropped: Callable[[str], object]) -> None:
        super().__init__(maxsize=maxsize, ttu=lambda _key, session, _now: session.expires_at, timer=clock)
        self._dropped = dropped

    def expire(self, time: float | None = None) -> list[tuple[str, Session]]:
        expired: list[tuple[str, Session]] = super().expire(time)
        for session_id, _ in expired:
            self._dropped(session_id)
        return expired

    def popitem(self) -> tuple[str, Session]:
        session_id, session = super().popitem()
        self._dropped(session_id)
        return session_id, session


ENDED_ELSEWHERE = "ended by another replica"


def _is_async(store: object) -> bool:
    return inspect.iscoroutinefunction(getattr(store, "save", None))


class SessionManager:
    def __init__(
        self,
        store: SqliteSessionStore | AsyncSessionStore,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 5.0,
    ) -> None:
        self._store = store
        self._sync: SqliteSessionStore | None = None if _is_async(store) else store  # type: ignore[assignment]
        self._async: AsyncSessionStore | None = store if _is_async(store) else None  # type: ignore[assignment]
        # Written behind (async store): the newest queued write, and every one not finished yet.
        self._tail: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        # Calls since the last flush, per session: (count, last use) (async store: flushed as increments).
        self._calls: dict[str, tuple[int, float]] = {}
        self._clock = clock
        self.flush_interval = flush_interval
        self._index = SessionIndex()
        self._live = _LiveSessions(MAX_LIVE_SESSIONS, clock, self._index.remove)
        self._dirty: set[str] = set()
        # scope key -> (lock, number of requests holding or waiting for it)
        self._flights = KeyedLocks()  # one payment per scope at a time (proxy/store/locks.py)

    @property
    def store(self) -> SqliteSessionStore | AsyncSessionStore:
        return self._store

    @property
    def shared(self) -> bool:
        """Written behind to an async store (which other replicas may share)."""
        return self._async is not None

    @property
    def index(self) -> SessionIndex:
        """The scope index; read its `generation` to know when a memoised `match` answer is stale."""
        return self._index

    def load(self) -> int:
        """Bring back the sessions that were active when the proxy last stopped (blocking store)."""
        assert self._sync is not None, "an async store loads with `await restore()`"
        sessions = self._sync.load_active(self._clock())
        for session in sessions:
            self._remember(session)
        return len(sessions)

    async def restore(self) -> int:
        """`load` for either store: a restarted replica rebuilds its index from the database."""
        if self._async is None:
            return self.load()
        sessions = await self._async.load_active(self._clock())
        for session in sessions:
            self._remember(session)
        return len(sessions)

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, sessions: Sequence[Session]) -> None:
        if self._sync is not None:
            self._sync.save(sessions)
            return
        store = self._async
        assert store is not None
        previous = self._tail
        batch = list(sessions)

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous  # in call order: a session's end never lands before its opening
            await store.save(batch)

        task = asyncio.get_running_loop().create_task(run())
        self._tail = task
        self._writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if self._tail is task:
            self._tail = None
        if not task.cancelled() and task.exception() is not None:
            log.error("session write failed: %s", task.exception())

    async def written(self) -> None:
        """Wait for every write queued so far; StoreError if one of them failed."""
        if not self._writes:
            return
        results = await asyncio.gather(*list(self._writes), return_exceptions=True)
        for result in results:
            if isinstance(result, StoreError):
                raise result
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise StoreError(f"session write failed: {result}", "io")

    def _remember(self, session: Session) -> None:
        self._live[session.id] = session
        self._index.add(session.scope, session.id)

    def match(self, url: str | NormalizedURL, now: float | None = None) -> Session | None:
        """The active session whose scope covers `url` (exact before longest prefix before shorter)."""
        now = self._clock() if now is None else now
        stale: list[str] = []
        found: Session | None = None
        for session_id in self._index.candidates(url):
            session = self._live.get(session_id)
            if session is None or not session.is_active(now):
                stale.append(session_id)
                continue
            found = session
            break
        for session_id in stale:  # expired or evicted: prune from the index as we meet them
            self._index.remove(session_id)
        return found

    def get(self, session_id: str) -> Session | None:
        """The live session, else (blocking store) the stored one; see `fetch` for an async store."""
        session = self._live.get(session_id)
        if session is not None or self._sync is None:
            return session
        return self._sync.get(session_id)

    async def fetch(self, session_id: str) -> Session | None:
        """The live session, else the stored one (either store)."""
        session = self._live.get(session_id)
        if session is not None:
            return session
        if self._sync is not None:
            return self._sync.get(session_id)
        assert self._async is not None
        return await self._async.get(session_id)

    async def list_stored(
        self, *, state: str | None = None, origin: str | None = None, limit: int = 1000
    ) -> list[Session]:
        now = self._clock()
        if self._sync is not None:
            return self._sync.list(now=now, state=state, origin=origin, limit=limit)
        assert self._async is not None
        await self.flush_async()  # call counts as every replica has them
        return await self._async.list(now=now, state=state, origin=origin, limit=limit)

    async def count_active(self) -> int:
        now = self._clock()
        if self._sync is not None:
            return self._sync.count_active(now)
        assert self._async is not None
        return await self._async.count_active(now)

    def add(self, session: Session) -> None:
        """A new session: durable before anyone can use it (blocking store), or queued (`written`)."""
        self._write([session])
        self._remember(session)

    def save(self, session: Session) -> None:
        self._write([session])
        self._dirty.discard(session.id)

    def renewed(self, session: Session) -> None:
        """A renewal changed expiry and credentials: re-key the cache and write it through."""
        self._live[session.id] = session
        self._write([session])
        self._dirty.discard(session.id)

    def touch(self, session: Session, now: float) -> None:
        # Runs on every session hit: a few stores and a set add, no further call.
        session.last_used_at = now
        session.call_count += 1
        # Flushed later; the flush also refreshes the session's place in the LRU order (lookups
        # memoised by the stage do not touch the cache).
        self._dirty.add(session.id)
        if self._async is not None:
            count = self._calls.get(session.id)
            self._calls[session.id] = (1 if count is None else count[0] + 1, now)

    def end(self, session_id: str, reason: str) -> tuple[Session | None, bool]:
        """End a session; returns it and whether it was already over (ended or expired). With an async
        store only a session this replica has live is found: use `end_session`."""
        return self._end(self.get(session_id), reason)

    async def end_session(self, session_id: str, reason: str) -> tuple[Session | None, bool]:
        """End a session wherever it was opened; returns once the end is durable (and so announced to
        the other replicas)."""
        found = await self.fetch(session_id)
        ended = self._end(found, reason)
        await self.written()
        return ended

    def _end(self, session: Session | None, reason: str) -> tuple[Session | None, bool]:
        if session is None:
            return None, False
        now = self._clock()
        already = not session.is_active(now)
        session.end(now, reason)  # also forgets its credentials
        self._forget(session.id)
        self._write([session])
        return session, already

    def _forget(self, session_id: str) -> None:
        self._index.remove(session_id)
        self._live.pop(session_id, None)
        self._dirty.discard(session_id)

    async def apply_remote(self, session_id: str) -> None:
        """Another replica saved this session: bring this replica's index in line with the database."""
        assert self._async is not None
        stored = await self._async.get(session_id)
        now = self._clock()
        local = self._live.get(session_id)
        if stored is None or not stored.is_active(now):
            if local is not None:
                # A request routed to the local object just before sees it ended: no credential goes out.
                local.end(stored.ended_at if stored and stored.ended_at else now, ENDED_ELSEWHERE)
            self._forget(session_id)  # its unflushed calls still go to the database
            return
        pending = self._calls.get(session_id)
        if pending is not None:
            stored.call_count += pending[0]  # this replica's calls not flushed yet
        self._remember(stored)

    async def run_watcher(self) -> None:
        """Apply other replicas' changes until cancelled (async store)."""
        if self._async is None:
            return
        await self._async.watch(self.apply_remote)

    def active(self) -> list[Session]:
        now = self._clock()
        return [s for s in list(self._live.values()) if s.is_active(now)]

    @contextlib.asynccontextmanager
    async def flight(self, key: str) -> AsyncIterator[None]:
        """Serialise payment for one scope: the second request waits and then sees the new session."""
        async with self._flights.hold(key):
            yield

    def flush(self) -> int:
        """Write call counts and last use (blocking store; an async store flushes with `flush_async`)."""
        if self._sync is None:
            for session_id in self._dirty:  # keep the LRU order fresh, as the blocking flush does
                self._live.get(session_id)
            self._dirty.clear()
            return 0
        dirty = [self._live[i] for i in self._dirty if i in self._live]
        self._dirty.clear()
        if dirty:
            self._sync.save(dirty)
        return len(dirty)

    async def flush_async(self) -> int:
        """Either store: the blocking flush, or this replica's calls since the last flush as increments
        (kept for the next flush if the database cannot take them)."""
        if self._async is None:
            return self.flush()
        self.flush()
        calls, self._calls = self._calls, {}
        if not calls:
            return 0
        try:
            await self._async.add_calls(calls)
        except BaseException:
            for session_id, (n, at) in calls.items():
                later = self._calls.get(session_id)
                self._calls[session_id] = (n, at) if later is None else (n + later[0], max(at, later[1]))
            raise
        return len(calls)

    async def close(self) -> None:
        """Flush, wait for queued writes, close the store (errors logged: the process is stopping)."""
        try:
            await self.flush_async()
            await self.written()
        except StoreError as exc:
            log.error("sessions not fully written at stop: %s", exc)
        if self._sync is not None:
            self._sync.close()
        elif self._async is not None:
            await self._async.close()

    async def run_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush_async()
                self._live.expire()
            except Exception:  # a failed flush loses counters, never money; keep serving
                log.exception("session flush failed")
