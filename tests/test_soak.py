"""A 60-second soak inside `make test`: the same driver as `make soak` (10 minutes), with windows scaled.

One real proxy under mixed load (pass-through HTTP and intercepted HTTPS, session hits on SIWX and
signed-token servers, real payments on new exact URLs, admin calls) must answer no 5xx of its own, keep
RSS and open fds flat (mean of s 50-60 within 10% of s 10-20), and account for every payment on chain.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.soak import run_soak, start_rig
from tests.stack import Stack
from tests.support.certs import UpstreamCA
from tests.support.upstream import Upstream

DURATION = 60.0


def test_soak_60s(x402_stack: Stack, upstream: Upstream, upstream_ca: UpstreamCA, tmp_path: Path) -> None:
    rig = start_rig(x402_stack, upstream, upstream_ca.cert_path, tmp_path)
    try:
        result = asyncio.run(run_soak(rig, DURATION))
    finally:
        rig.stop()
    result.write(tmp_path / "results.json")
    print(result.table())
    assert result.passed, result.table()
    # The session kinds paid once for their scope and were then served by the session alone.
    paid = result.tally.paid_by_kind()
    assert paid["session_siwx"] == paid["session_token"] == 1, result.table()
    assert result.tally.session_hits["session_siwx"] == result.tally.requests["session_siwx"] - 1
    assert result.tally.session_hits["session_token"] == result.tally.requests["session_token"] - 1
    # Every request of the payment kind paid, and the deliberate upstream 503s were not blamed on the proxy.
    assert paid["payment"] == result.tally.requests["payment"] > 10
    assert result.tally.upstream_5xx > 0 and result.tally.proxy_5xx == 0
