"""Small pieces the per-issue benchmarks share (bench/mcp_calls.py, bench/fleet_store.py,
bench/channel_requests.py): the CPU layout of bench/session_hits.py (this script, the load generator and
the origins on CPU 0, the proxy under test alone on CPU 1), an nginx origin with a given server block,
wrk with a Lua script, a proxy's CPU time, a timing relay that sees the bytes between the proxy and an
upstream, and the results file under .bench/."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.session_hits import prioritize  # noqa: E402
from tests.support.processes import die_with_parent  # noqa: E402

WORK = REPO / ".bench"
LOADGEN_CPU = 0
PROXY_CPU = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def require(*tools: str) -> str | None:
    """None if every tool is on the PATH, else a line naming the first missing one."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (make apt-bench)"
    return None


def setup_cpus(nice: int | None) -> None:
    """This script (and what it starts, unless re-pinned) on the load generator's CPU; nice if asked."""
    if nice is not None:
        prioritize(nice)
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {LOADGEN_CPU})


def pin_proxy(pid: int, nice: int | None) -> None:
    """The proxy under test, every thread of it, alone on CPU 1 (as bench/run.py and session_hits.py)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(PROXY_CPU), str(pid)], check=True, capture_output=True)
    if nice is not None:
        prioritize(nice, pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_nginx(work: Path, port: int, server_block: str, name: str = "nginx") -> subprocess.Popen[bytes]:
    """nginx, 1 worker, on CPU 0, listening on `port` with `server_block` inside its `server { }`."""
    conf = work / f"{name}.conf"
    conf.write_text(
        f"worker_processes 1;\npid {work}/{name}.pid;\nerror_log {work}/{name}.err;\ndaemon off;\n"
        "events { worker_connections 4096; }\n"
        "http { access_log off; keepalive_requests 1000000; client_body_buffer_size 64k;\n"
        f"  server {{ listen 127.0.0.1:{port};\n{server_block}\n  }} }}\n"
    )
    proc = subprocess.Popen(
        ["taskset", "-c", str(LOADGEN_CPU), "nginx", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not start")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(
    url: str, *, method: str = "GET", body: str | None = None, headers: dict[str, str] | None = None
) -> str:
    """A wrk script sending forward-proxy requests (absolute-form `url`) to whatever wrk is pointed at."""
    lines = [f"wrk.path = {lua_string(url)}", f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = {lua_string(body)}")
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[ {lua_string(name)} ] = {lua_string(value)}")
    return "\n".join(lines) + "\n"


@dataclass
class WrkRound:
    rps: float
    requests: int
    proxy_cpu_s: float  # CPU the proxy used during the round (0 when no proxy pid was given)

    @property
    def proxy_us_per_request(self) -> float:
        return self.proxy_cpu_s / self.requests * 1e6 if self.requests else 0.0


def wrk(
    proxy_port: int,
    script: str,
    duration: float,
    connections: int,
    work: Path,
    proxy_pid: int | None = None,
) -> WrkRound:
    """One wrk round (`-t1 -cN`, on CPU 0) through the proxy; only 2xx answers are accepted."""
    path = work / "bench.lua"
    path.write_text(script)
    before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    out = subprocess.run(
        [
            "taskset",
            "-c",
            str(LOADGEN_CPU),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "-s",
            str(path),
            f"http://127.0.0.1:{proxy_port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = (cpu_seconds(proxy_pid) - before) if proxy_pid else 0.0
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(out)
    return WrkRound(float(rps.group(1)), int(total.group(1)), used)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as docs/benchmarks.md's tables."""
    mid = median(values)
    return round((max(values) - min(values)) / mid, 3) if mid else 0.0


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    commit = (
        os.environ.get("BENCH_COMMIT")
        or subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    return {"loadavg": [round(x, 2) for x in load], "cpus": os.cpu_count(), "commit": commit}


def write_results(name: str, result: dict[str, Any]) -> Path:
    """Print `result` and keep it, with the command line and the machine's state, in .bench/<name>.json."""
    WORK.mkdir(exist_ok=True)
    result = {**result, "argv": sys.argv, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = WORK / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- a relay that times what the proxy sends after what it received ------------------------------------


@dataclass
class Seen:
    when: float  # time.perf_counter()
    upstream_bound: bool  # proxy -> upstream (else upstream -> proxy)
    data: bytes


@dataclass
class TimingRelay:
    """A TCP relay on 127.0.0.1 in front of `target`: the proxy talks to it as to the upstream, and every
    chunk that passes is kept with the time it was passed on. `gap(answer_marker, request_marker)` then
    gives, per exchange, the time from the upstream's answer (its chunk holding `answer_marker`) being
    handed to the proxy to the proxy's next request (its first chunk holding `request_marker`) reaching
    the relay: the proxy's own time between the two, measured on the wire, plus one loopback hop."""

    target: tuple[str, int]
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> TimingRelay:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                server = await asyncio.start_server(self._client, "127.0.0.1", 0)
                self._server = server
                self.port = int(server.sockets[0].getsockname()[1])
                ready.set()
                await asyncio.Event().wait()  # forever: a daemon thread

            loop.run_until_complete(serve())

        self._thread = threading.Thread(target=run, daemon=True, name="timing-relay")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream_bound: bool) -> None:
            try:
                while data := await src.read(65536):
                    if not upstream_bound:
                        dst.write(data)
                        self.seen.append(Seen(time.perf_counter(), upstream_bound, data))
                    else:
                        self.seen.append(Seen(time.perf_counter(), upstream_bound, data))
                        dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def clear(self) -> None:
        self.seen.clear()

    def gaps(self, answer_marker: bytes, request_marker: bytes) -> list[float]:
        """Seconds from each answer holding `answer_marker` to the next request holding `request_marker`
        (both matched without regard to case)."""
        out: list[float] = []
        answered: float | None = None
        answer_marker, request_marker = answer_marker.lower(), request_marker.lower()
        for item in list(self.seen):
            data = item.data.lower()
            if not item.upstream_bound and answer_marker in data:
                answered = item.when
            elif item.upstream_bound and answered is not None and request_marker in data:
                out.append(item.when - answered)
                answered = None
        return out

    def stop(self) -> None:
        """Stop accepting; the thread is a daemon and its open connections end with their peers."""
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            loop.call_soon_threadsafe(server.close)


def interleave(rounds: int, steps: Sequence[Callable[[], None]]) -> None:
    """Run every step once per round, in order: drift on the machine hits each alike."""
    for _ in range(rounds):
        for step in steps:
            step()
