"""SessionManager over a real SQLite file, with a controllable clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session, SessionCredentials
from proxy.sessions.scope import Scope
from proxy.store.session_store import SqliteSessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock) -> SessionManager:
    return SessionManager(SqliteSessionStore(tmp_path / "state.db"), clock=clock)


def new_session(clock: Clock, url: str = "https://api.x.com/v1", ttl: int = 60) -> Session:
    session = Session.create(Scope.from_url(url, "prefix"), now=clock.now, ttl_seconds=ttl)
    session.credentials = SessionCredentials(token_headers={"x-x402-lease": "secret-lease"})
    return session


def test_expired_session_stops_matching_at_once(tmp_path: Path) -> None:
    clock = Clock()
    manager = make(tmp_path, clock)
    session = new_session(clock)
    manager.add(session)
    clock.now += 59.999
    assert manager.match("https://api.x.com/v1/items") is session
    clock.now += 0.002
    assert manager.match("https://api.x.com/v1/items") is None
    assert manager.active() == []


def test_end_forgets_credentials_and_persists(tmp_path: Path) -> None:
    clock = Clock()
    manager = make(tmp_path, clock)
    session = new_session(clock)
    manager.add(session)
    ended, already = manager.end(session.id, "test")
    assert ended is session and not already
    assert manager.match("https://api.x.com/v1") is None
    assert session.credentials.kinds() == []
    stored = SqliteSessionStore(tmp_path / "state.db").get(session.id)
    assert stored is not None and stored.ended_at is not None and stored.credentials.kinds() == []
    again, already = manager.end(session.id, "twice")
    assert again is not None and already


def test_restart_loads_only_active_sessions_with_counts(tmp_path: Path) -> None:
    clock = Clock()
    manager = make(tmp_path, clock)
    live, short, ended = (
        new_session(clock, ttl=3600),
        new_session(clock, "https://b.x.com/", 60),
        new_session(clock),
    )
    for session in (live, short, ended):
        manager.add(session)
    manager.end(ended.id, "test")
    manager.touch(live, clock.now)
    manager.touch(live, clock.now)
    assert manager.flush() == 1
    clock.now += 120
    restarted = make(tmp_path, clock)
    assert restarted.load() == 1
    found = restarted.match("https://api.x.com/v1/z")
    assert found is not None and found.id == live.id and found.call_count == 2
    assert found.credentials.token_headers == {"x-x402-lease": "secret-lease"}


async def test_one_flight_per_scope_even_with_waiters(tmp_path: Path) -> None:
    manager = make(tmp_path, Clock())
    inside = 0
    most = 0

    async def request() -> None:
        nonlocal inside, most
        async with manager.flight("prefix https://api.x.com/v1"):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(request() for _ in range(20)))
    assert most == 1
    assert len(manager._flights) == 0  # cleaned up once nobody waits


async def test_different_scopes_fly_in_parallel(tmp_path: Path) -> None:
    manager = make(tmp_path, Clock())
    started = asyncio.Event()

    async def first() -> None:
        async with manager.flight("a"):
            started.set()
            await asyncio.sleep(0.2)

    async def second() -> float:
        await started.wait()
        loop = asyncio.get_running_loop()
        t = loop.time()
        async with manager.flight("b"):
            return loop.time() - t

    _, waited = await asyncio.gather(first(), second())
    assert waited < 0.1


def test_expired_sessions_leave_the_index_even_if_never_looked_up(tmp_path: Path) -> None:
    """One exact-URL session per payment: scopes nobody asks for again must not pile up in the index."""
    clock = Clock()
    manager = make(tmp_path, clock)
    for n in range(50):
        manager.add(new_session(clock, f"https://api.x.com/item/{n}", ttl=60))
    assert len(manager._index) == 50
    clock.now += 61
    manager.add(new_session(clock, "https://api.x.com/fresh", ttl=60))  # any insert expires the rest
    assert len(manager._index) == 1
    assert manager.match("https://api.x.com/fresh/x") is not None
