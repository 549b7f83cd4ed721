"""Every refusal on record (issue #13), through the real proxy process on the real local stack.

A refused 402 (the payer will not pay: budget_exhausted, host_not_allowed, ...) is answered as before,
the server's 402 plus `X-402-Proxy-Error: <reason>`, and is now also kept: `GET /refusals`, the
`refusals` CLI, `x402_proxy_refusals_total{reason}` on /metrics and `refusals_24h` per host on
/budget (hosts only ever refused included). A refusal that cannot be written still answers the client,
promptly: another process holding the database's write lock, and a file size limit on the running
proxy (EFBIG), as in tests/test_store_faults.py.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy
from tests.support.paying_proxy import ledger, proxies, stack_config

ERROR = "X-402-Proxy-Error"
PAYMENT = "X-402-Proxy-Payment"
TIMEOUT = 60
DENIED = "127.0.0.3"  # a second reference server listens here; the policy denies the host


@pytest.fixture(scope="module")
def denied_server(x402_stack: Stack) -> Iterator[PyServer]:
    server = x402_stack.start_py_server(host=DENIED)
    yield server
    server.stop()


def start(stack: Stack, home: Path, policy: str) -> AdminProxy:
    config = stack_config(stack, policy=policy)
    return AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()


@pytest.fixture
def admin(x402_stack: Stack, tmp_path: Path) -> Iterator[AdminProxy]:
    """Room for one payment (0.001 of a 0.0015 daily budget); 127.0.0.3 denied."""
    proxy = start(x402_stack, tmp_path / "home", f'daily_budget = "0.0015"\nhost_deny = ["{DENIED}"]')
    yield proxy
    proxy.stop()


def get(proxy: AdminProxy, url: str) -> requests.Response:
    return requests.get(url, proxies=proxies(proxy), timeout=TIMEOUT)


def conforms(admin: AdminProxy, name: str, instance: object) -> None:
    doc = admin.call("GET", "/openapi.json").json()
    Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]}).validate(instance)


def refusal_counts(admin: AdminProxy) -> dict[str, float]:
    text = admin.call("GET", "/metrics").text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "x402_proxy_refusals"
        for sample in family.samples
        if sample.name == "x402_proxy_refusals_total"
    }


def refusals(admin: AdminProxy, query: str = "") -> list[dict[str, Any]]:
    response = admin.call("GET", f"/refusals{query}")
    assert response.status_code == 200, response.text[:500]
    rows: list[dict[str, Any]] = response.json()["refusals"]
    return rows


def assert_refused(response: requests.Response, code: str) -> None:
    assert response.status_code == 402, response.text[:300]
    assert response.headers.get(ERROR) == code, dict(response.headers)
    assert PAYMENT not in response.headers


def test_budget_exhausted_and_host_not_allowed_are_on_record(
    x402_stack: Stack, admin: AdminProxy, denied_server: PyServer
) -> None:
    stack = x402_stack
    paid = get(admin, f"{stack.py}/paid/a")
    assert paid.status_code == 200, paid.text[:300] + admin.log_text()[-2000:]
    before = time.time()
    assert_refused(get(admin, f"{stack.py}/paid/b"), "budget_exhausted")
    assert_refused(get(admin, f"{denied_server.url}/paid/a?x=1"), "host_not_allowed")
    assert [r["state"] for r in ledger(admin)] == ["settled"]  # refusals are no ledger rows

    rows = refusals(admin)
    assert [r["reason"] for r in rows] == ["host_not_allowed", "budget_exhausted"]  # newest first
    denied, exhausted = rows
    for row in rows:
        conforms(admin, "Refusal", row)
        assert before - 1 <= row["created_at"] <= time.time() + 1
        assert row["method"] == "GET" and row["session_id"] is None and row["payment_id"] is None
        # The price asked: the stack's one offer, in TestUSDC atomic units.
        assert (row["amount"], row["decimals"], row["asset"], row["network"], row["pay_to"]) == (
            str(stack.price), stack.token_decimals, stack.token, stack.network_v2, stack.pay_to
        ), row
    assert denied["host"] == DENIED and denied["url"] == f"{denied_server.url}/paid/a?x=1"
    assert denied["detail"] == f"host {DENIED} is not allowed by policy"
    assert exhausted["host"] == "127.0.0.1" and exhausted["url"] == f"{stack.py}/paid/b"
    assert "would exceed daily_budget 0.0015" in exhausted["detail"], exhausted

    # Filters; the host in canonical form whatever its spelling; bad filters are problems.
    assert [r["id"] for r in refusals(admin, "?reason=budget_exhausted")] == [exhausted["id"]]
    assert [r["id"] for r in refusals(admin, f"?host={DENIED}")] == [denied["id"]]
    assert [r["id"] for r in refusals(admin, "?host=127.0.0.3.")] == [denied["id"]]
    assert [r["id"] for r in refusals(admin, "?limit=1")] == [denied["id"]]
    assert refusals(admin, f"?since={time.time() + 60:.0f}") == []
    assert refusals(admin, "?reason=over_max_per_payment") == []
    for query, code in (("?reason=dry_run", "invalid_parameter"), ("?reason=nope", "invalid_parameter"),
                        ("?limit=0", "invalid_parameter"), ("?state=settled", "unknown_field")):
        problem = admin.call("GET", f"/refusals{query}")
        assert problem.status_code == 400 and problem.json()["code"] == code, (query, problem.text)

    # The CLI: a table, and the API's JSON.
    table = admin.admin_cli("refusals")
    assert table.returncode == 0, table.stderr
    assert "host_not_allowed" in table.stdout and "budget_exhausted" in table.stdout
    assert f"GET {denied_server.url}/paid/a?x=1" in table.stdout and "0.001" in table.stdout
    filtered = admin.admin_cli("refusals", "--reason", "host_not_allowed", "--host", DENIED, "--json")
    assert filtered.returncode == 0, filtered.stderr
    assert json.loads(filtered.stdout) == {"refusals": [denied]}
    since = admin.admin_cli("refusals", "--since", f"{time.time() + 60:.0f}", "--limit", "5")
    assert since.returncode == 0 and "(none)" in since.stdout
    bad = admin.admin_cli("refusals", "--reason", "nope")
    assert bad.returncode == 1 and "invalid_parameter (400)" in bad.stderr

    # Metrics: a counter per reason.
    counts = refusal_counts(admin)
    assert counts["budget_exhausted"] == 1 and counts["host_not_allowed"] == 1, counts
    assert counts["over_max_per_payment"] == 0 and "dry_run" not in counts
    assert "# TYPE x402_proxy_refusals_total counter" in admin.call("GET", "/metrics").text

    # The budget counts them per host; the denied host, which never spent, is listed too.
    budget = admin.call("GET", "/budget").json()
    conforms(admin, "Budget", budget)
    assert budget["hosts"]["127.0.0.1"] == {"spent": "0.001", "remaining": "0.499", "refusals_24h": 1}, budget
    assert budget["hosts"][DENIED] == {"spent": "0", "remaining": "0.5", "refusals_24h": 1}, budget
    cli_budget = admin.admin_cli("budget")
    assert cli_budget.returncode == 0 and f"{DENIED}: spent 0, remaining 0.5, refused 1" in cli_budget.stdout


def test_dry_run_answers_are_ledger_rows_not_refusals(x402_stack: Stack, tmp_path: Path) -> None:
    proxy = start(x402_stack, tmp_path / "home", "dry_run = true")
    try:
        assert_dry = get(proxy, f"{x402_stack.py}/paid/a")
        assert assert_dry.status_code == 402 and assert_dry.headers[ERROR] == "dry_run"
        assert [r["state"] for r in ledger(proxy)] == ["dry_run"]
        assert refusals(proxy) == []
        assert "dry_run" not in refusal_counts(proxy)
        assert proxy.call("GET", "/budget").json()["hosts"] == {}
    finally:
        proxy.stop()


# -- a refusal that cannot be written ------------------------------------------------------------------

HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class LockHolder:
    """Another process with the database's write lock (what a second proxy on this home would hold)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.close()
            self.proc.wait(10)


def set_file_size_limit(pid: int, limit: int) -> None:
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


@pytest.mark.parametrize("fault", ["locked", "file_size_limit"])
def test_a_refusal_that_cannot_be_written_still_answers_the_client(
    x402_stack: Stack, admin: AdminProxy, denied_server: PyServer, fault: str
) -> None:
    url = f"{denied_server.url}/paid/a"
    db = admin.home / "state.db"
    holder: LockHolder | None = None
    if fault == "locked":
        holder = LockHolder(db)
    else:
        wal = admin.home / "state.db-wal"
        # Every write past the WAL's current end now fails with EFBIG (the log file is smaller: it still grows).
        assert admin.log_path.stat().st_size < wal.stat().st_size
        set_file_size_limit(admin.pid(), wal.stat().st_size)
    try:
        started = time.monotonic()
        response = get(admin, url)
        waited = time.monotonic() - started
        assert_refused(response, "host_not_allowed")
        assert response.content == b"{}"  # the server's own 402 body, as always
        assert waited < 3.0, f"the answer waited {waited:.1f} s on the refusal's write"
        assert refusal_counts(admin)["host_not_allowed"] == 1  # counted although not kept
        assert refusals(admin) == []  # reading still works; nothing was kept
    finally:
        if holder is not None:
            holder.release()
        else:
            set_file_size_limit(admin.pid(), resource.RLIM_INFINITY)
    expected = "is locked by another process" if fault == "locked" else "cannot write ledger"
    line = next((x for x in admin.log_text().splitlines() if "not recorded" in x), "")
    assert f"refusal host_not_allowed for GET {url} not recorded" in line and expected in line, line
    # Once the fault clears, the same process keeps refusals again.
    assert_refused(get(admin, url), "host_not_allowed")
    (kept,) = refusals(admin)
    assert kept["reason"] == "host_not_allowed" and kept["host"] == DENIED
    assert refusal_counts(admin)["host_not_allowed"] == 2
    assert "Traceback" not in admin.log_text()
