"""Live sessions: the in-memory hot index, durable saves, and one payment in flight per scope.

Lookups never touch SQLite: the index finds candidate ids by origin and path segments, and a
cachetools TLRU cache holds the sessions themselves, each expiring at its own `expires_at`, so an
expired session stops matching at once. Creation and ending are written through; call counts and
last-used times are flushed every `flush_interval` seconds (they may lag by that much after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from cachetools import TLRUCache

from proxy.sessions.index import SessionIndex
from proxy.sessions.model import Session
from proxy.sessions.scope import NormalizedURL
from proxy.store.session_store import SqliteSessionStore

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


class SessionManager:
    def __init__(
        self,
        store: SqliteSessionStore,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 5.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self.flush_interval = flush_interval
        self._index = SessionIndex()
        self._live = _LiveSessions(MAX_LIVE_SESSIONS, clock, self._index.remove)
        self._dirty: set[str] = set()
        # scope key -> (lock, number of requests holding or waiting for it)
        self._flights: dict[str, tuple[asyncio.Lock, int]] = {}

    @property
    def store(self) -> SqliteSessionStore:
        return self._store

    @property
    def index(self) -> SessionIndex:
        """The scope index; read its `generation` to know when a memoised `match` answer is stale."""
        return self._index

    def load(self) -> int:
        """Bring back the sessions that were active when the proxy last stopped."""
        sessions = self._store.load_active(self._clock())
        for session in sessions:
            self._remember(session)
        return len(sessions)

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
        session = self._live.get(session_id)
        return session if session is not None else self._store.get(session_id)

    def add(self, session: Session) -> None:
        """A new session is durable before anyone can use it."""
        self._store.save([session])
        self._remember(session)

    def save(self, session: Session) -> None:
        self._store.save([session])
        self._dirty.discard(session.id)

    def renewed(self, session: Session) -> None:
        """A renewal changed expiry and credentials: re-key the cache and write it through."""
        self._live[session.id] = session
        self._store.save([session])
        self._dirty.discard(session.id)

    def touch(self, session: Session, now: float) -> None:
        # Runs on every session hit: two stores and a set add, no further call.
        session.last_used_at = now
        session.call_count += 1
        # Flushed later; the flush also refreshes the session's place in the LRU order (lookups
        # memoised by the stage do not touch the cache).
        self._dirty.add(session.id)

    def end(self, session_id: str, reason: str) -> tuple[Session | None, bool]:
        """End a session; returns it and whether it was already over (ended or expired)."""
        now = self._clock()
        session = self.get(session_id)
        if session is None:
            return None, False
        already = not session.is_active(now)
        session.end(now, reason)  # also forgets its credentials
        self._index.remove(session_id)
        self._live.pop(session_id, None)
        self._dirty.discard(session_id)
        self._store.save([session])
        return session, already

    def active(self) -> list[Session]:
        now = self._clock()
        return [s for s in list(self._live.values()) if s.is_active(now)]

    @contextlib.asynccontextmanager
    async def flight(self, key: str) -> AsyncIterator[None]:
        """Serialise payment for one scope: the second request waits and then sees the new session."""
        lock, users = self._flights.get(key, (asyncio.Lock(), 0))
        self._flights[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._flights[key]
            # A released lock with waiters still looks unlocked: count users, or a second flight could start.
            if users == 1:
                del self._flights[key]
            else:
                self._flights[key] = (lock, users - 1)

    def flush(self) -> int:
        dirty = [self._live[i] for i in self._dirty if i in self._live]
        self._dirty.clear()
        if dirty:
            self._store.save(dirty)
        return len(dirty)

    async def run_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                self.flush()
                self._live.expire()
            except Exception:  # a failed flush loses counters, never money; keep serving
                log.exception("session flush failed")
