"""GroupCommit (proxy/channels/book.py): the channel book's per-request writes, committed on the event
loop, one transaction per pass of the loop, on a real SQLite file; checkpoints on a thread."""

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


def test_writes_queued_in_one_pass_commit_as_one_batch_and_a_bad_write_fails_only_itself(
    tmp_path: Path,
) -> None:
    path = tmp_path / "book.db"
    _table(path)
    group = GroupCommit(path)
    committed: list[str] = []
    transactions: list[int] = []

    def insert(key: str, value: int | None) -> object:
        def write(db: sqlite3.Connection) -> object:
            transactions.append(db.total_changes)  # changes before this write: the batch's first sees 0
            db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))  # v NULL: NOT NULL fails
            return lambda: committed.append(key)

        return write

    async def main() -> list[BaseException | None]:
        first = group.submit(insert("k0", 0))
        rest = [group.submit(insert(f"k{i}", None if i == 3 else i)) for i in range(1, 6)]
        assert _rows(path) == {}  # nothing committed before the loop's pass ends
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(main())
    group.close()
    assert [r is None for r in results] == [True, True, True, False, True, True]
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert _rows(path) == {"k0": 0, "k1": 1, "k2": 2, "k4": 4, "k5": 5}
    # What a write returns runs only once its transaction is committed: never for the failed one.
    assert sorted(committed) == ["k0", "k1", "k2", "k4", "k5"]
    # One batch first (k0..k3 in one transaction, rolled back by k3), then write by write.
    assert transactions[:4] == [0, 1, 2, 3]


def test_checkpoints_run_off_the_loop_and_keep_the_wal_bounded(tmp_path: Path) -> None:
    path = tmp_path / "book.db"
    _table(path)
    group = GroupCommit(path)
    group.CHECKPOINT_EVERY = 50
    wal = Path(f"{path}-wal")
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = group._checkpoint_off_loop

    def checkpoint() -> None:
        seen.append(threading.get_ident())
        original()

    group._checkpoint_off_loop = checkpoint  # type: ignore[method-assign]

    async def main() -> None:
        for i in range(400):
            await group.submit(
                lambda db, i=i: db.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", i)) and None
            )

    asyncio.run(main())
    group.close()
    assert len(_rows(path)) == 400
    assert seen and loop_thread not in seen
    # Without checkpoints the WAL would hold all 400 commits' frames (two each); it restarts after each
    # thread checkpoint and the loop's copy of the frames written meanwhile.
    with sqlite3.connect(path) as db:
        frames = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]  # (busy, frames, copied)
    assert wal.exists() and frames < 200


def test_submit_after_close_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "book.db"
    _table(path)
    group = GroupCommit(path)
    group.close()

    async def main() -> None:
        group.submit(lambda db: None)

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(main())
