"""Payment channels (issue 18): the proxy-side cost of a request on an open batch-settlement channel, and
the throughput of such requests against session hits through the same proxy, in one run.

The channel stack of the tests (tests/stack/channels.py: anvil with our channel contracts, the SDK's
batch-settlement facilitator and resource server, uvicorn) and one proxy paying from the stack's payer
with `[channels] enabled` and a deposit large enough never to run out during the run. The proxy's home
is seeded (as bench/session_hits.py does) with a session scoped to the server's free `/s/` path (lease
header + signed session token): a session hit. Stack, load generator and this script on CPU 0, the
proxy alone on CPU 1 (bench/harness.py).

Overhead. N sequential requests on one open channel (`/paid/ch`: under the channel's lock the next
voucher is signed, persisted, sent; the answer's PAYMENT-RESPONSE read back), and N session hits
(`/s/x`), over one keep-alive connection from a raw-socket client, through a timing relay in front of
the server (bench/harness.py TimingRelay). Per request: the time the client waited minus the time the
relay saw the server take (the proxy's request in -> the server's answer out): the proxy's own time
plus two loopback hops. The figure for the channel is its median; the session hit's is shown next to it
(what any proxied request costs on this path) and the difference (what the channel adds).

Throughput, two ways, each channel requests against session hits in interleaved wrk rounds (`-t1 -cC`,
CPU 0), channel requests spread at random over K open channels (`/paid/many/1..K`, a scope and so a
channel each; one channel carries one request at a time, as the seller requires):

- proxy-bound (the target): the proxy is the only thing that works per request. The K channels are
  opened through an nginx in front of the SDK's server (proxy_pass: real deposits, real first
  vouchers); then nginx is reloaded to answer by itself: a voucher request with 200 and the
  PAYMENT-RESPONSE the SDK's server gave a real voucher (its `chargedAmount`, without the per-request
  `channelState`, so the proxy's table advances by one price per answer, by the SDK's rules), a
  session hit with 200. nginx checks no voucher: what the seller's check costs is the other row. So
  both rows measure the proxy's path with the same trivial upstream, as bench/session_hits.py does.
- with the SDK's seller: straight to the SDK's resource server, which checks each voucher (a signature
  recovery and its channel bookkeeping, ms of CPU on the load generator's CPU): bound by the seller.

Also, per way, the proxy's CPU per request (utime+stime over wrk's count).

    .venv/bin/python bench/channel_requests.py [--rounds 5 --duration 4 --connections 16 --channels 16
                                                --requests 200 --nice -15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.session_hits import lease_session, seed_sqlite  # noqa: E402
from tests.stack.channels import ChannelStack, start_channel_stack  # noqa: E402
from tests.support.admin import AdminProxy  # noqa: E402
from tests.support.channels import channel_config, channels  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

OVERHEAD_TARGET_MS = 2.0
THROUGHPUT_TARGET = 0.5
SESSION = b"x-402-proxy-session"


def seed_session(home: Path, origin: str, stack: ChannelStack) -> None:
    """A session on `origin/s/` in the proxy's store before it starts: a session hit."""
    session = lease_session(
        f"{origin}/s/",
        stack.payer,
        amount=stack.price,
        asset=stack.token,
        network=stack.network,
        pay_to=stack.pay_to,
    )
    seed_sqlite(home, session)


class RawClient:
    """One keep-alive connection to the proxy; absolute-form GETs; the answer read whole (no client
    library between the clock and the socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def get(self, url: str) -> tuple[float, int, bytes]:
        """(seconds from the request's first byte out to the answer's last byte in, status, head)."""
        host = url.split("/")[2]
        request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
        start = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            rest += self._recv()
        took = time.perf_counter() - start
        self.buffer = rest[length:]
        return took, int(head.split(b" ", 2)[1]), head

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def server_times(seen: list[harness.Seen]) -> list[float]:
    """Per exchange on the relay: the proxy's request in (its first chunk) -> the answer out (its last
    chunk before the next request); sequential exchanges, so they alternate."""
    out: list[float] = []
    started: float | None = None
    answered: float | None = None
    for item in seen:
        if item.upstream_bound:
            if started is not None and answered is not None:
                out.append(answered - started)
                started, answered = None, None
            if started is None:
                started = item.when
        elif started is not None:
            answered = item.when
    if started is not None and answered is not None:
        out.append(answered - started)
    return out


def overhead(client: RawClient, relay: harness.TimingRelay, url: str, n: int) -> dict[str, Any]:
    """n sequential requests of `url`: client time minus the server's time seen on the relay (ms)."""
    time.sleep(0.3)  # the relay's last chunks from the warm-up are in
    relay.clear()
    totals = []
    for _ in range(n):
        took, status, head = client.get(url)
        if status != 200 or SESSION not in head.lower():
            raise RuntimeError(f"{url}: {status} {head[:300]!r}")
        totals.append(took)
    time.sleep(0.3)
    served = server_times(list(relay.seen))
    if len(served) != n:
        raise RuntimeError(f"the relay saw {len(served)} exchanges for {n} requests")
    own = [(t - s) * 1000 for t, s in zip(totals, served, strict=True)]
    return {
        "median_ms": round(statistics.median(own), 3),
        "p90_ms": round(statistics.quantiles(own, n=10)[-1], 3),
        "request_ms_median": round(statistics.median(totals) * 1000, 3),
        "server_ms_median": round(statistics.median(served) * 1000, 3),
    }


def many_script(base: str, k: int) -> str:
    """A wrk script: each request for one of `base`1..k at random (a channel each)."""
    return (
        f"local base = {harness.lua_string(base)}\n"
        f"math.randomseed({os.getpid()})\n"
        f'request = function() return wrk.format("GET", base .. math.random(1, {k})) end\n'
    )


def open_channels(proxy: AdminProxy, base: str, k: int, *, expected_open: int) -> None:
    """A deposit on each of `base`1..k, before any load."""
    opener = RawClient(proxy.port)
    for i in range(1, k + 1):
        _, status, head = opener.get(f"{base}{i}")
        if status != 200:
            raise RuntimeError(f"opening channel {base}{i}: {status} {head[:300]!r}")
    opener.close()
    opened = [c for c in channels(proxy) if c["state"] == "open"]
    if len(opened) != expected_open:
        raise RuntimeError(f"{len(opened)} open channels, expected {expected_open}")


def throughput(
    proxy: AdminProxy,
    scripts: dict[str, str],
    args: argparse.Namespace,
    work: Path,
    warmed: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Interleaved wrk rounds of each script; medians, ratio channel / session hit, proxy CPU.
    `warmed` runs between the warm-up and the counted rounds; with --profile, py-spy samples the
    proxy during one more channel round after them."""
    for script in scripts.values():
        harness.wrk(proxy.port, script, args.warmup, args.connections, work, proxy.pid())
    warmed()
    rounds: dict[str, list[harness.WrkRound]] = {name: [] for name in scripts}
    for _ in range(args.rounds):
        for name, script in scripts.items():
            rounds[name].append(
                harness.wrk(proxy.port, script, args.duration, args.connections, work, proxy.pid())
            )
    if args.profile is not None:  # py-spy (pip install py-spy): a channel round, then a session-hit round
        spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        spy_argv = [spy_bin, "record", "-r", "500", "-d", str(args.duration), "-f", "raw", "-t"]
        for name, out in (("channel", args.profile), ("session_hit", args.profile.with_suffix(".hit"))):
            spy = subprocess.Popen([*spy_argv, "-o", str(out), "-p", str(proxy.pid())])
            harness.wrk(proxy.port, scripts[name], args.duration, args.connections, work, proxy.pid())
            spy.wait(60)
    rps = {name: [r.rps for r in rs] for name, rs in rounds.items()}
    cpu = {name: harness.median([r.proxy_us_per_request for r in rs]) for name, rs in rounds.items()}
    ratio = harness.median(rps["channel"]) / harness.median(rps["session_hit"])
    return {
        "channel_rps_median": round(harness.median(rps["channel"])),
        "session_hit_rps_median": round(harness.median(rps["session_hit"])),
        "ratio": round(ratio, 3),
        "spread_channel": harness.spread(rps["channel"]),
        "spread_session_hit": harness.spread(rps["session_hit"]),
        "proxy_us_per_channel_request": round(cpu["channel"], 1),
        "proxy_us_per_session_hit": round(cpu["session_hit"], 1),
        "rounds": rps,
        "requests": {name: [r.requests for r in rs] for name, rs in rounds.items()},
    }


def forward_block(server_port: int) -> str:
    """nginx in front of the SDK's server: everything passed through (keep-alive both sides)."""
    return (
        f"    location / {{ proxy_pass http://127.0.0.1:{server_port}; proxy_http_version 1.1;\n"
        '      proxy_set_header Connection ""; }'
    )


def settle_answer(proxy: AdminProxy, url: str) -> str:
    """The PAYMENT-RESPONSE the SDK's server gave one real voucher, without its per-request
    `channelState`: the proxy then advances its table by the answer's `chargedAmount`."""
    from x402.http.utils import safe_base64_decode, safe_base64_encode

    client = RawClient(proxy.port)
    _, status, head = client.get(url)
    client.close()
    if status != 200:
        raise RuntimeError(f"{url}: {status} {head[:300]!r}")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"payment-response":
            answer = json.loads(safe_base64_decode(value.strip().decode()))
            extra = dict(answer.get("extra") or {})
            extra.pop("channelState", None)
            if not str(extra.get("chargedAmount", "")).isdigit():
                raise RuntimeError(f"no chargedAmount in the seller's answer: {answer}")
            answer["extra"] = extra
            return safe_base64_encode(json.dumps(answer, separators=(",", ":")))
    raise RuntimeError(f"the proxy passed no PAYMENT-RESPONSE on: {head[:500]!r}")


def answer_by_itself(work: Path, origin: str, front: subprocess.Popen[bytes], answer: str) -> None:
    """Reload the front nginx to answer voucher requests (with `answer`) and session hits by itself."""
    conf = work / "front.conf"
    body = "x" * 100
    block = (
        f'    location /paid/many/ {{ add_header PAYMENT-RESPONSE "{answer}" always; '
        f'return 200 "{body}"; }}\n'
        f'    location / {{ return 200 "{body}"; }}'
    )
    text = conf.read_text()
    start = text.index("    location / {")
    conf.write_text(text[:start] + block + "\n  } }\n")
    front.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a request with no payment: 402 from the server, 200 from nginx
        with socket.create_connection(("127.0.0.1", int(origin.rsplit(":", 1)[1])), 2) as sock:
            sock.sendall(b"GET /paid/many/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    raise RuntimeError("the front nginx did not reload")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16, help="open channels the wrk load spreads over")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per overhead run")
    parser.add_argument("--overhead-runs", type=int, default=3, help="overhead runs, interleaved")
    parser.add_argument("--nice", type=int, default=None, help="priority mode (root), as bench/run.py")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy proxy-bound rounds (hits: .hit)")
    parser.add_argument("--proxy-bound-only", action="store_true", help="skip the SDK-seller rows")
    args = parser.parse_args()
    missing = harness.require("wrk", "taskset")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    harness.setup_cpus(args.nice)
    work = Path(tempfile.mkdtemp(prefix="x402-channel-bench-"))
    # Funds for every deposit of the run (K + 1 channels of 100 TUSDC each, never used up).
    stack = start_channel_stack(work / "stack", payer_funds=10**6 * 10**6)
    proxy: AdminProxy | None = None
    relay: harness.TimingRelay | None = None
    front: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {}
    try:
        server_port = int(stack.server.rsplit(":", 1)[1])
        relay = harness.TimingRelay(("127.0.0.1", server_port)).start()
        via_relay = f"http://127.0.0.1:{relay.port}"
        home = work / "home"
        home.mkdir(mode=0o700)
        seed_session(home, via_relay, stack)
        seed_session(home, stack.server, stack)
        front_port = free_port()
        seed_session(home, f"http://127.0.0.1:{front_port}", stack)
        config = channel_config(
            stack,
            '[log]\nlevel = "warning"\naccess_log = false\n'
            '[sessions]\ncredential_kinds = ["cookies", "session_token", "token_headers"]\n',
            daily_budget="100000",
            deposit_amount="100",
            max_deposit="100",
        )
        proxy = AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()
        harness.pin_proxy(proxy.pid(), args.nice)

        # -- overhead: one channel and the session hit, through the relay ------------------------
        client = RawClient(proxy.port)
        channel_url, hit_url = f"{via_relay}/paid/ch", f"{via_relay}/s/x"
        for _ in range(20):  # the deposit, then warm vouchers and hits
            client.get(channel_url)
            client.get(hit_url)
        runs: dict[str, list[dict[str, Any]]] = {"channel": [], "session_hit": []}
        for _ in range(args.overhead_runs):
            runs["channel"].append(overhead(client, relay, channel_url, args.requests))
            runs["session_hit"].append(overhead(client, relay, hit_url, args.requests))
        client.close()
        med = {name: harness.median([r["median_ms"] for r in rs]) for name, rs in runs.items()}
        result["overhead"] = {
            "channel_ms_median": round(med["channel"], 3),
            "session_hit_ms_median": round(med["session_hit"], 3),
            "channel_minus_hit_ms": round(med["channel"] - med["session_hit"], 3),
            "target_ms": OVERHEAD_TARGET_MS,
            "status": harness.verdict(med["channel"] <= OVERHEAD_TARGET_MS),
            "runs": runs,
        }

        # -- throughput, with the SDK's seller: K channels vs the session hit, straight to it -------
        base = f"{stack.server}/paid/many/"
        open_channels(proxy, base, args.channels, expected_open=args.channels + 1)
        scripts = {
            "channel": many_script(base, args.channels),
            "session_hit": harness.wrk_script(f"{stack.server}/s/x"),
        }
        if not args.proxy_bound_only:
            result["throughput_sdk_seller"] = throughput(
                proxy, scripts, argparse.Namespace(**{**vars(args), "profile": None}), work
            )

        # -- throughput, proxy-bound: the same through nginx answering by itself -------------------
        front = harness.start_nginx(work, front_port, forward_block(server_port), name="front")
        front_origin = f"http://127.0.0.1:{front_port}"
        front_base = f"{front_origin}/paid/many/"
        open_channels(proxy, front_base, args.channels, expected_open=2 * args.channels + 1)
        answer = settle_answer(proxy, f"{front_base}1")
        answer_by_itself(work, front_origin, front, answer)
        scripts = {
            "channel": many_script(front_base, args.channels),
            "session_hit": harness.wrk_script(f"{front_origin}/s/x"),
        }
        before = 0

        def warmed() -> None:
            nonlocal before
            before = sum(c["charged"] for c in channels(proxy))

        result["throughput"] = throughput(proxy, scripts, args, work, warmed)
        # Every channel request wrk counted was answered and charged by the SDK's rules: our table
        # advanced by one price per answer (read once the proxy has written its last answers).
        proxy.stop()
        after = sum(c["charged"] for c in channels(proxy))
        counted = sum(result["throughput"]["requests"]["channel"])
        result["proxy_bound_channel_requests"] = {
            "counted_by_wrk": counted,
            "charged": (after - before) // stack.price,
        }
    finally:
        if proxy is not None:
            proxy.stop()
        if relay is not None:
            relay.stop()
        harness.stop(front)
        stack.stop()
    over, thr = result["overhead"], result["throughput"]
    lines = [
        f"request on an open channel: proxy-side {over['channel_ms_median']} ms median "
        f"(session hit {over['session_hit_ms_median']} ms, +{over['channel_minus_hit_ms']} ms) "
        f"(<= {OVERHEAD_TARGET_MS} ms) {over['status']}",
        f"proxy-bound: channel requests {thr['channel_rps_median']} req/s vs session hits "
        f"{thr['session_hit_rps_median']} req/s, ratio {thr['ratio']} (>= {THROUGHPUT_TARGET}) "
        f"{harness.verdict(thr['ratio'] >= THROUGHPUT_TARGET)}; proxy CPU per request "
        f"{thr['proxy_us_per_channel_request']} us vs {thr['proxy_us_per_session_hit']} us",
    ]
    sdk = result.get("throughput_sdk_seller")
    if sdk is not None:
        lines.append(
            f"with the SDK's seller (bound by its voucher check): {sdk['channel_rps_median']} req/s vs "
            f"{sdk['session_hit_rps_median']} req/s, ratio {sdk['ratio']}; proxy CPU per request "
            f"{sdk['proxy_us_per_channel_request']} us vs {sdk['proxy_us_per_session_hit']} us"
        )
    result["throughput"]["target"] = THROUGHPUT_TARGET
    result["throughput"]["status"] = harness.verdict(thr["ratio"] >= THROUGHPUT_TARGET)
    result["verdicts"] = lines
    harness.write_results("channel_requests", result)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
