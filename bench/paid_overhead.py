"""Paid-request overhead: the proxy's own time from receiving a 402 to sending the paid retry.

Runs the local x402 stack (anvil, test token, reference facilitator, @x402/express V2 server) on
loopback, a proxy paying from the dev wallet with sessions off (so every request pays), and N
sequential paid requests. The proxy logs each payment's overhead at debug level; we report the
median and p90 of those, and the end-to-end paid vs free request times for context.

    .venv/bin/python bench/paid_overhead.py [--requests 60]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.stack import start_stack  # noqa: E402
from tests.support.paying_proxy import start_paying_proxy  # noqa: E402

OVERHEAD = re.compile(r"payment #\d+ overhead ([0-9.]+) ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="x402-paid-bench-"))
    stack = start_stack(work)
    proxy = None
    try:
        proxy = start_paying_proxy(
            stack,
            work / "home",
            policy='daily_budget = "1000"\nper_host_daily_budget = "1000"',
            extra='[sessions]\nenabled = false\n[log]\nlevel = "debug"\naccess_log = false\n',
        )
        via = {"http": proxy.url}
        paid_url, free_url = f"{stack.express_v2}/paid/a", f"{stack.express_v2}/free"
        requests.get(paid_url, proxies=via, timeout=60)  # warm: first payment, connections, caches
        paid_times, free_times = [], []
        for _ in range(args.requests):
            t = time.perf_counter()
            response = requests.get(paid_url, proxies=via, timeout=60)
            paid_times.append(time.perf_counter() - t)
            assert response.status_code == 200, response.status_code
            t = time.perf_counter()
            requests.get(free_url, proxies=via, timeout=60)
            free_times.append(time.perf_counter() - t)
        overheads = [float(m) for m in OVERHEAD.findall(proxy.log_text())][1:]  # drop the warm-up
        result: dict[str, float | str] = {
            "paid_requests": len(overheads),
            "overhead_ms_median": round(statistics.median(overheads), 3),
            "overhead_ms_p90": round(statistics.quantiles(overheads, n=10)[-1], 3),
            "paid_request_ms_median": round(statistics.median(paid_times) * 1000, 2),
            "free_request_ms_median": round(statistics.median(free_times) * 1000, 2),
            "target_ms": 5.0,
        }
        result["status"] = "PASS" if statistics.median(overheads) <= 5.0 else "FAIL"
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if proxy is not None:
            proxy.stop()
        stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
