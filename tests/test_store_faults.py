"""The ledger's file in trouble, with the real proxy process: locked, disk full, corrupt.

At startup each is a readable message and exit code 2, never a traceback, and the file is left as it
was. At runtime the client gets 503 `X-402-Proxy-Error: ledger_unavailable`, and because the pending
row could not be written nothing is signed: the facilitator never sees an authorization and no
balance moves. Once the fault clears the same process pays normally.

The faults are real: another process holding `BEGIN EXCLUSIVE`; a full tmpfs (ENOSPC, needs root to
mount); a file size limit set on the running proxy with prlimit (EFBIG; Python ignores SIGXFSZ);
garbage, truncated and partly overwritten database files.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.store.base import NewPayment
from proxy.store.sqlite import BUSY_TIMEOUT_MS, SqliteLedgerStore
from tests.stack import Stack
from tests.support.paying_proxy import ledger, proxies, stack_config
from tests.support.proxy_process import ProxyProcess

ERROR = "X-402-Proxy-Error"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class LockHolder:
    """Another process with an exclusive write lock on the database (what a second proxy would hold)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
            self.proc.wait(10)


def paying_proxy(stack: Stack, home: Path, running: list[ProxyProcess]) -> ProxyProcess:
    proxy = ProxyProcess(home, stack_config(stack), {"X402_PROXY_PRIVATE_KEY": stack.payer_key})
    running.append(proxy)
    return proxy.start()


def verifies(stack: Stack) -> int:
    return int(stack.facilitator_stats()["counts"]["verify"])


def get(proxy: ProxyProcess, url: str) -> requests.Response:
    return requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)


def assert_refused_unpaid(
    stack: Stack, proxy: ProxyProcess, url: str, expect_in_body: str
) -> requests.Response:
    """The request is answered 503 ledger_unavailable, and no authorization left the proxy."""
    rows, verify = ledger(proxy), verifies(stack)
    pay_to, payer = stack.balance_of(stack.pay_to), stack.balance_of(stack.payer_address)
    response = get(proxy, url)
    assert response.status_code == 503, response.text[:300]
    assert response.headers[ERROR] == "ledger_unavailable"
    assert expect_in_body in response.text, response.text
    assert PAYMENT not in response.headers
    assert ledger(proxy) == rows, "a row appeared although the write failed"
    assert verifies(stack) == verify, "an authorization reached the facilitator"
    assert stack.balance_of(stack.pay_to) == pay_to
    assert stack.balance_of(stack.payer_address) == payer
    return response


def assert_pays_once(stack: Stack, proxy: ProxyProcess, url: str) -> None:
    before, rows = stack.balance_of(stack.pay_to), len(ledger(proxy))
    response = get(proxy, url)
    assert response.status_code == 200, response.text[:300]
    # Read from a fresh process: after another process held (and released) the database lock, this
    # test process's own read-only connections were seen to keep a stale view in full runs.
    wanted = int(response.headers[PAYMENT])
    row = next(r for r in ledger_in_new_process(proxy) if r["id"] == wanted)
    assert row["state"] == "settled" and len(ledger_in_new_process(proxy)) == rows + 1
    assert stack.balance_of(stack.pay_to) - before == stack.price


READ_LEDGER = """
import json, sqlite3, sys
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
conn.row_factory = sqlite3.Row
print(json.dumps([dict(r) for r in conn.execute("SELECT id, state FROM payments ORDER BY id")]))
"""


def ledger_in_new_process(proxy: ProxyProcess) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", READ_LEDGER, str(proxy.home / "state.db")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def failed_start(proxy: ProxyProcess) -> subprocess.CompletedProcess[str]:
    """`x402-proxy run` that must refuse to start (it would otherwise run until the timeout)."""
    result = proxy.cli("run", "--listen", "127.0.0.1:0", check=False)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening on" not in result.stdout
    return result


# -- locked -------------------------------------------------------------------------------------


def test_startup_with_ledger_locked_by_another_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proxy = ProxyProcess(home, "")
    proxy.start()
    proxy.stop()
    holder = LockHolder(home / "state.db")
    try:
        started = time.monotonic()
        result = failed_start(proxy)
        assert time.monotonic() - started >= BUSY_TIMEOUT_MS / 1000  # it waited for the lock first
    finally:
        holder.release()
    assert f"ledger {home / 'state.db'} is locked by another process" in result.stderr
    proxy.start()  # the lock gone, the same home starts
    proxy.stop()


def test_ledger_locked_at_runtime_refuses_to_pay(
    x402_stack: Stack, tmp_path: Path, running: list[ProxyProcess]
) -> None:
    proxy = paying_proxy(x402_stack, tmp_path / "home", running)
    url = f"{x402_stack.py}/paid/a"
    holder = LockHolder(proxy.home / "state.db")
    try:
        assert_refused_unpaid(x402_stack, proxy, url, "is locked by another process")
    finally:
        holder.release()
    assert_pays_once(x402_stack, proxy, url)


def test_a_locked_ledger_delays_only_the_payment_not_pass_through(
    x402_stack: Stack, tmp_path: Path, running: list[ProxyProcess]
) -> None:
    # The ledger runs on a thread of its own (proxy/store/threaded.py): while a payment waits up to the
    # 5 s busy timeout for the lock, free requests through the same proxy are served at once. (Before,
    # the SQLite call ran on the event loop and every request waited with it.)
    proxy = paying_proxy(x402_stack, tmp_path / "home", running)
    holder = LockHolder(proxy.home / "state.db")
    outcome: dict[str, Any] = {}

    def paid() -> None:
        started = time.monotonic()
        outcome["response"] = get(proxy, f"{x402_stack.py}/paid/a")
        outcome["seconds"] = time.monotonic() - started

    try:
        thread = threading.Thread(target=paid, daemon=True)
        thread.start()
        time.sleep(0.5)  # the payment is now waiting for the lock
        assert thread.is_alive()
        slowest = 0.0
        while thread.is_alive() and slowest < 2.0:
            started = time.monotonic()
            free = get(proxy, f"{x402_stack.py}/free")
            slowest = max(slowest, time.monotonic() - started)
            assert free.status_code == 200
        thread.join(TIMEOUT)
    finally:
        holder.release()
    assert slowest < 1.0, f"a pass-through request waited {slowest:.2f} s behind the locked ledger"
    assert (
        outcome["response"].status_code == 503 and outcome["response"].headers[ERROR] == "ledger_unavailable"
    )
    assert outcome["seconds"] >= BUSY_TIMEOUT_MS / 1000 - 0.5  # the payment did wait for the lock


# -- disk full ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a real filesystem that really fills up (ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the file-size-limit test covers the write failure")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return filler


def test_disk_full_at_runtime_refuses_to_pay(
    x402_stack: Stack, small_disk: Path, running: list[ProxyProcess]
) -> None:
    proxy = paying_proxy(x402_stack, small_disk / "home", running)
    assert_pays_once(x402_stack, proxy, f"{x402_stack.py}/paid/a")
    filler = fill(small_disk)
    try:
        assert_refused_unpaid(x402_stack, proxy, f"{x402_stack.py}/paid/b", "disk full")
    finally:
        filler.unlink()
    assert_pays_once(x402_stack, proxy, f"{x402_stack.py}/paid/b")


def set_file_size_limit(pid: int, limit: int) -> None:
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


def test_file_size_limit_at_runtime_refuses_to_pay(
    x402_stack: Stack, tmp_path: Path, running: list[ProxyProcess]
) -> None:
    proxy = paying_proxy(x402_stack, tmp_path / "home", running)
    wal = proxy.home / "state.db-wal"
    # Any write past the WAL's current end now fails with EFBIG (the process ignores SIGXFSZ).
    set_file_size_limit(proxy.pid(), wal.stat().st_size)
    try:
        assert_refused_unpaid(x402_stack, proxy, f"{x402_stack.py}/paid/a", "cannot write ledger")
    finally:
        set_file_size_limit(proxy.pid(), resource.RLIM_INFINITY)
    assert_pays_once(x402_stack, proxy, f"{x402_stack.py}/paid/a")


# -- corrupt ------------------------------------------------------------------------------------


def write_ledger(path: Path, rows: int) -> None:
    """A real ledger with enough rows to span many pages."""
    with SqliteLedgerStore(path) as store:
        for i in range(rows):
            new = NewPayment(
                amount=1000 + i,
                decimals=6,
                asset="0x" + "1" * 40,
                network="eip155:84532",
                pay_to="0x" + "2" * 40,
                host="api.example",
                method="GET",
                url=f"http://api.example/{i}",
                x402_version=2,
                scheme="exact",
                reason="r" * 1500,
            )
            store.mark_settled(store.insert_pending(new).id)


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def truncated(path: Path) -> None:
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)


def overwritten(path: Path) -> None:
    """Random bytes over a few pages in the middle, header intact: opens fine, fails on reading them."""
    with path.open("r+b") as file:
        file.seek(path.stat().st_size // 2)
        file.write(os.urandom(3 * 4096))


@pytest.mark.parametrize("damage", [garbage, truncated, overwritten], ids=lambda f: f.__name__)
def test_startup_with_corrupt_ledger(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    path = home / "state.db"
    write_ledger(path, 150)
    damage(path)
    damaged = path.read_bytes()
    result = failed_start(ProxyProcess(home, ""))
    assert f"ledger {path} is corrupt" in result.stderr
    assert "move it aside" in result.stderr
    assert path.read_bytes() == damaged, "the proxy changed a ledger it refused to use"


def test_outcome_not_recordable_after_payment_stays_in_doubt(
    x402_stack: Stack, tmp_path: Path, running: list[ProxyProcess]
) -> None:
    """The ledger fails between the payment leaving and its outcome being written: the client still
    gets what was paid for, and the same request is not paid again while the payment is in doubt."""
    proxy = paying_proxy(x402_stack, tmp_path / "home", running)
    url = f"{x402_stack.py}/paid/slow?delay=2"
    before = x402_stack.balance_of(x402_stack.pay_to)
    answer: dict[str, requests.Response] = {}
    client = threading.Thread(target=lambda: answer.setdefault("r", get(proxy, url)))
    client.start()
    deadline = time.monotonic() + TIMEOUT
    # The row is written, then signed and its header recorded before the request leaves: wait for that.
    while not (ledger(proxy) and ledger(proxy)[0]["presentations"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    (pending,) = ledger(proxy)
    assert pending["state"] == "pending"
    # The paid request is at the slow handler; from now on every ledger write fails (EFBIG).
    set_file_size_limit(proxy.pid(), (proxy.home / "state.db-wal").stat().st_size)
    try:
        client.join(TIMEOUT)
        response = answer["r"]
        assert response.status_code == 200, response.text[:300]
        assert response.headers[ERROR] == "ledger_unavailable"
        assert int(response.headers[PAYMENT]) == pending["id"]
        assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    finally:
        set_file_size_limit(proxy.pid(), resource.RLIM_INFINITY)
    retry = get(proxy, url)
    assert retry.status_code == 402 and retry.headers[ERROR] == "payment_in_doubt", retry.text[:300]
    assert x402_stack.balance_of(x402_stack.pay_to) - before == x402_stack.price
    assert [r["state"] for r in ledger(proxy)] == ["pending"]  # a restart turns it unknown
