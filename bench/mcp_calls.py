"""MCP payments (issue 16): a free `tools/call` with the proxy's MCP inspection on vs off, and the
proxy-side overhead of a paid tool call.

Throughput. Two proxies from one generated config, but for `[mcp] pay_tools` (true: every `tools/call`
answer is scanned; false: relayed untouched), no wallet, both pinned to CPU 1 (one at a time is busy);
wrk (`-t1 -cN`, CPU 0) POSTs one JSON-RPC `tools/call` of the free tool, in interleaved rounds, to two
upstreams on CPU 0:
  * `canned`: nginx answering every POST with the same `application/json` tools/call result, so the
    proxy is the bottleneck (what the ratio is about: the price of inspection);
  * `mcp_server`: tests/stack/server_mcp_sse.py (`--framing json --events 0`, uvicorn), a real MCP
    server, which is the bottleneck here (one uvicorn worker on the load generator's CPU).
Also the proxy's CPU per call (utime+stime over wrk's request count).

Paid overhead. The local x402 stack (anvil, TestUSDC, facilitator) and server_mcp_sse.py (SSE framing,
no notifications), reached through a timing relay (bench/harness.py); a proxy paying from the dev
wallet makes N sequential calls of the paid tool `forecast`. Per call, the relay gives the time from the
server's payment-required result being handed to the proxy to the proxy's paid `tools/call` (with
`_meta["x402/payment"]`) reaching the server: the proxy's side of a paid call (scan, challenge, policy,
ledger row, signing, the re-sent request). The proxy logs no per-payment overhead line for MCP, as it
does for HTTP (`payment #N overhead`), so the wire is where it is read. The same proxy then pays N
HTTP 402s (@x402/express V2) through a relay too, to set the relay's reading against that log line
(`calibration_http`: the relay reads ~0.5-0.6 ms more, one loopback hop and the relay's wake-up).

    .venv/bin/python bench/mcp_calls.py [--rounds 5 --duration 4 --connections 50 --paid-calls 40 --nice -15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from tests.stack import Stack, start_stack  # noqa: E402
from tests.stack._proc import STACK_DIR, ManagedProcess, http_ready, wait_all  # noqa: E402
from tests.support.paying_proxy import start_paying_proxy  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.proxy_process import ProxyProcess  # noqa: E402

CALL = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}'
CANNED = (
    '{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"echo: hi"}],'
    '"structuredContent":{"echo":"hi"}}}'
)
MCP_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}
THROUGHPUT_TARGET = 0.9
PAID_TARGET_MS = 5.0
OVERHEAD = re.compile(r"payment #\d+ overhead ([0-9.]+) ms")


def start_mcp_sse(
    work: Path, *, facilitator: str, asset: str, pay_to: str, price: int, framing: str
) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = [
        sys.executable,
        str(STACK_DIR / "server_mcp_sse.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--facilitator",
        facilitator,
        "--asset",
        asset,
        "--pay-to",
        pay_to,
        "--price",
        str(price),
        "--framing",
        framing,
        "--events",
        "0",
    ]
    proc = ManagedProcess(f"mcp_sse_{framing}-{port}", argv, work / f"mcp_sse_{framing}-{port}.log")
    url = f"http://127.0.0.1:{port}"
    wait_all([(proc, http_ready(f"{url}/free"), "serving /free")], 60)
    os.sched_setaffinity(proc.pid, {harness.LOADGEN_CPU})
    return proc, url


def mcp_session(url: str, via: dict[str, str] | None = None) -> str:
    """An MCP session at `url` (initialize + initialized), its Mcp-Session-Id."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        },
    }
    answer = requests.post(f"{url}/mcp", json=init, headers=MCP_HEADERS, proxies=via, timeout=30)
    answer.raise_for_status()
    sid = answer.headers["Mcp-Session-Id"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    headers = {**MCP_HEADERS, "Mcp-Session-Id": sid}
    requests.post(f"{url}/mcp", json=note, headers=headers, proxies=via, timeout=30)
    return sid


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    nginx_port = free_port()
    nginx = harness.start_nginx(
        work,
        nginx_port,
        f"    location / {{ default_type application/json; return 200 '{CANNED}'; }}",
    )
    server, server_url = start_mcp_sse(
        work,
        facilitator="http://127.0.0.1:9",
        asset="0x" + "11" * 20,
        pay_to="0x" + "22" * 20,
        price=1000,
        framing="json",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    base = '[log]\nlevel = "warning"\naccess_log = false\n[sessions]\nenabled = false\n'
    proxies: dict[str, ProxyProcess] = {}
    try:
        for mode, flag in (("on", "true"), ("off", "false")):
            home = work / f"home-{mode}"
            home.mkdir(mode=0o700)
            proxies[mode] = ProxyProcess(home, f"{base}[mcp]\npay_tools = {flag}\n", env).start()
            harness.pin_proxy(proxies[mode].pid(), args.nice)
        sid = mcp_session(server_url)
        upstreams = {
            "canned": harness.wrk_script(
                f"http://127.0.0.1:{nginx_port}/mcp",
                method="POST",
                body=CALL,
                headers={**MCP_HEADERS, "Host": f"127.0.0.1:{nginx_port}"},
            ),
            "mcp_server": harness.wrk_script(
                f"{server_url}/mcp",
                method="POST",
                body=CALL,
                headers={**MCP_HEADERS, "Host": server_url.removeprefix("http://"), "Mcp-Session-Id": sid},
            ),
        }
        # Both proxies answer the call (the inspecting one reads a JSON result of known length whole and
        # relays it with its own Content-Length: proxy/mcp_pay/stage.py `_whole`).
        check = requests.post(
            f"http://127.0.0.1:{nginx_port}/mcp",
            data=CALL,
            headers=MCP_HEADERS,
            proxies={"http": proxies["on"].url},
            timeout=10,
        )
        assert check.status_code == 200 and check.json().get("result") is not None, check.text
        rounds: dict[str, dict[str, list[harness.WrkRound]]] = {u: {"on": [], "off": []} for u in upstreams}
        for script in upstreams.values():
            for mode in ("on", "off"):
                proxy = proxies[mode]
                harness.wrk(proxy.port, script, args.warmup, args.connections, work, proxy.pid())
        for _ in range(args.rounds):
            for upstream, script in upstreams.items():
                for mode in ("off", "on"):
                    proxy = proxies[mode]
                    rounds[upstream][mode].append(
                        harness.wrk(proxy.port, script, args.duration, args.connections, work, proxy.pid())
                    )
        out: dict[str, Any] = {}
        for upstream, by_mode in rounds.items():
            on = [r.rps for r in by_mode["on"]]
            off = [r.rps for r in by_mode["off"]]
            ratio = harness.median(on) / harness.median(off)
            cpu_on = harness.median([r.proxy_us_per_request for r in by_mode["on"]])
            cpu_off = harness.median([r.proxy_us_per_request for r in by_mode["off"]])
            out[upstream] = {
                "inspection_on_rps_median": round(harness.median(on)),
                "inspection_off_rps_median": round(harness.median(off)),
                "ratio": round(ratio, 3),
                "spread_on": harness.spread(on),
                "spread_off": harness.spread(off),
                "proxy_us_per_call_on": round(cpu_on, 1),
                "proxy_us_per_call_off": round(cpu_off, 1),
                "proxy_cpu_ratio_off_over_on": round(cpu_off / cpu_on, 3) if cpu_on else None,
                "target": THROUGHPUT_TARGET,
                "status": harness.verdict(ratio >= THROUGHPUT_TARGET),
                "rounds": {"on": on, "off": off},
            }
        return out
    finally:
        for proxy in proxies.values():
            proxy.stop()
        server.stop()
        harness.stop(nginx)


def calibrate(stack: Stack, proxy: ProxyProcess, n: int) -> dict[str, Any]:
    """The relay's reading against the proxy's own: N paid HTTP requests (@x402/express V2) through a
    relay, whose 402 -> paid-retry gap is set against the `payment #N overhead` debug line of each."""
    port = int(stack.express_v2.rsplit(":", 1)[1])
    relay = harness.TimingRelay(("127.0.0.1", port)).start()
    try:
        url = f"http://127.0.0.1:{relay.port}/paid/a"
        via = {"http": proxy.url}
        requests.get(url, proxies=via, timeout=60)  # warm
        logged_before = len(OVERHEAD.findall(proxy.log_text()))
        relay.clear()
        for _ in range(n):
            assert requests.get(url, proxies=via, timeout=60).status_code == 200
        wire = [g * 1000 for g in relay.gaps(b" 402 ", b"payment-signature:")]
        logged = [float(m) for m in OVERHEAD.findall(proxy.log_text())[logged_before:]]
    finally:
        relay.stop()
    if len(wire) != len(logged):
        return {"error": f"{len(wire)} retries on the wire, {len(logged)} logged"}
    return {
        "requests": n,
        "relay_ms_median": round(statistics.median(wire), 3),
        "proxy_log_ms_median": round(statistics.median(logged), 3),
        "relay_minus_log_ms_median": round(
            statistics.median([w - x for w, x in zip(wire, logged, strict=True)]), 3
        ),
    }


def paid_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack: Stack = start_stack(work / "stack")
    server = None
    relay = None
    proxy = None
    try:
        server, server_url = start_mcp_sse(
            work,
            facilitator=stack.facilitator_url,
            asset=stack.token,
            pay_to=stack.pay_to,
            price=stack.price,
            framing="sse",
        )
        port = int(server_url.rsplit(":", 1)[1])
        relay = harness.TimingRelay(("127.0.0.1", port)).start()
        relayed = f"http://127.0.0.1:{relay.port}"
        proxy = start_paying_proxy(
            stack,
            work / "paying-home",
            policy='daily_budget = "1000"\nper_host_daily_budget = "1000"',
            extra='[sessions]\nenabled = false\n[log]\nlevel = "debug"\naccess_log = false\n',
        )
        harness.pin_proxy(proxy.pid(), args.nice)
        via = {"http": proxy.url}
        calibration = calibrate(stack, proxy, args.calibration_requests)
        sid = mcp_session(relayed, via)
        headers = {**MCP_HEADERS, "Mcp-Session-Id": sid}

        def call(i: int, tool: str, arguments: dict[str, str]) -> tuple[float, dict[str, Any]]:
            body = {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments},
            }
            t = time.perf_counter()
            answer = requests.post(f"{relayed}/mcp", json=body, headers=headers, proxies=via, timeout=60)
            elapsed = time.perf_counter() - t
            assert answer.status_code == 200, answer.status_code
            data = answer.text.split("data: ", 1)[-1] if "data: " in answer.text else answer.text
            return elapsed, dict(json.loads(data))

        call(1, "forecast", {"city": "Oslo"})  # warm: first payment, connections, caches
        relay.clear()
        paid_times, free_times = [], []
        for i in range(args.paid_calls):
            elapsed, message = call(100 + 2 * i, "forecast", {"city": f"Oslo-{i}"})
            result = message.get("result") or {}
            assert result.get("isError") is not True and "x402-proxy/payment" in (
                result.get("_meta") or {}
            ), message
            paid_times.append(elapsed)
            elapsed, _ = call(101 + 2 * i, "echo", {"text": "hi"})
            free_times.append(elapsed)
        gaps = relay.gaps(b"Payment required to access this tool", b'"x402/payment"')
        if len(gaps) != args.paid_calls:
            raise RuntimeError(f"{len(gaps)} paid retries seen on the wire for {args.paid_calls} paid calls")
        ms = [g * 1000 for g in gaps]
        med = statistics.median(ms)
        return {
            "paid_calls": len(ms),
            "overhead_ms_median": round(med, 3),
            "overhead_ms_p90": round(statistics.quantiles(ms, n=10)[-1], 3),
            "paid_call_ms_median": round(statistics.median(paid_times) * 1000, 2),
            "free_call_ms_median": round(statistics.median(free_times) * 1000, 2),
            "target_ms": PAID_TARGET_MS,
            "status": harness.verdict(med <= PAID_TARGET_MS),
            "overheads_ms": [round(x, 3) for x in ms],
            "calibration_http": calibration,
        }
    finally:
        if proxy is not None:
            proxy.stop()
        if relay is not None:
            relay.stop()
        if server is not None:
            server.stop()
        stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--paid-calls", type=int, default=40)
    parser.add_argument("--calibration-requests", type=int, default=15)
    parser.add_argument("--only", choices=("throughput", "paid"), default=None)
    parser.add_argument("--nice", type=int, default=None, help="priority mode (root), as bench/run.py")
    args = parser.parse_args()
    missing = harness.require("nginx", "wrk", "taskset")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    harness.setup_cpus(args.nice)
    work = Path(tempfile.mkdtemp(prefix="x402-mcp-bench-"))
    result: dict[str, Any] = {}
    try:
        if args.only in (None, "throughput"):
            result["free_call_throughput"] = throughput(args, work)
        if args.only in (None, "paid"):
            result["paid_call_overhead"] = paid_overhead(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = []
    for name, row in (result.get("free_call_throughput") or {}).items():
        lines.append(
            f"free tools/call, {name}: inspection on {row['inspection_on_rps_median']} req/s, off "
            f"{row['inspection_off_rps_median']} req/s, ratio {row['ratio']} (>= {THROUGHPUT_TARGET}) "
            f"{row['status']}"
        )
    paid = result.get("paid_call_overhead")
    if paid:
        lines.append(
            f"paid tools/call proxy-side overhead median {paid['overhead_ms_median']} ms "
            f"(<= {PAID_TARGET_MS} ms) {paid['status']}; HTTP paid overhead on the same proxy: proxy log "
            f"{paid['calibration_http'].get('proxy_log_ms_median')} ms, relay "
            f"{paid['calibration_http'].get('relay_ms_median')} ms"
        )
    result["verdicts"] = lines
    harness.write_results("mcp_calls", result)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
