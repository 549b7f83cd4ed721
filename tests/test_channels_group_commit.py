"""GroupCommit (proxy/channels/book.py): the channel book's per-request writes, committed off the event
loop in batches, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from proxy.channels.book import GroupCommit


def _table(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")


def _rows(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT k, v FROM t").fetchall())


def test_writes_queued_meanwhile_commit_as_one_batch_and_a_bad_write_fails_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "book.db"
    _table(path)
    group = GroupCommit(path)
    gate = threading.Event()
    committed: list[str] = []

    def insert(key: str, value: int | None) -> object:
        def write(db: sqlite3.Connection) -> object:
            if key == "k0":
                gate.wait(5)  # hold the writer so the other writes queue up behind it: one batch
            db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))  # v NULL: NOT NULL fails
            return lambda: committed.append(key)

        return write

    async def main() -> list[BaseException | None]:
        first = group.submit(insert("k0", 0))
        await asyncio.sleep(0.05)
        rest = [group.submit(insert(f"k{i}", None if i == 3 else i)) for i in range(1, 6)]
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    group.close()
    assert [r is None for r in results] == [True, True, True, False, True, True]
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert _rows(path) == {"k0": 0, "k1": 1, "k2": 2, "k4": 4, "k5": 5}
    # What a write returns runs only once its transaction is committed: never for the failed one.
    assert sorted(committed) == ["k0", "k1", "k2", "k4", "k5"]


def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "book.db"
    _table(path)
    group = GroupCommit(path)
    group.close()

    async def main() -> None:
        group.submit(lambda db: None)

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())
