#!/usr/bin/env python3
"""`make bench`: x402-proxy side by side with direct, tinyproxy and mitmproxy.

Everything runs on this machine and talks only to 127.0.0.1:

* origin: nginx (generated config under .bench/nginx) serving a 100-byte body
  over HTTP and HTTPS (self-signed CA under .bench/pki) plus a large sparse file
  for the streaming test;
* contenders, all started once and kept running, measured round-robin so slow
  drift of the machine hits every contender alike: direct (no proxy),
  x402-proxy, tinyproxy, mitmproxy (mitmdump from its own venv .bench/mitm-venv);
* load generators: wrk (plain HTTP throughput and single-connection latency),
  bench/loadclient.py (CONNECT + TLS keep-alive throughput, and the same client
  for plain HTTP so the HTTPS/HTTP ratio is apples to apples), curl (streaming).

CPU pinning (2-core machine): load generator, origin and this orchestrator on
the first CPU; every proxy on the second CPU, so each proxy gets one whole core
to itself and never competes with the load it is measured under. Exceptions,
each explained where it happens: the latency scenario puts everything on one
CPU (no cross-CPU wakeups), the streaming reference gives direct two CPUs.

Prints a table (medians of N rounds, and ratios) and writes .bench/results.json.
Stdlib + `cryptography` (a project dependency); run with the project venv's
interpreter (uvloop is used by the load client when importable).
`bash bench/setup.sh` installs the tools. Method and results: docs/benchmarks.md.
Scenario 5 runs bench/paid_overhead.py (the x402 stack from tests/stack).
"""

# ruff: noqa: S603, S607  (the harness runs fixed local tools by design; argv lists, never a shell)
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bench"
WORK = ROOT / ".bench"
LOOP = "127.0.0.1"
SMALL_BODY = b"x" * 100

# Proxy variables in the environment must never steer any benchmark process.
_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    env.update(extra or {})
    return env


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Processes: everything is started here, in its own process group, with
# PDEATHSIG so it dies with us even on SIGKILL; teardown kills by process group
# id of the processes we started, never by name.
# --------------------------------------------------------------------------------------

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc
    _libc = None
_PR_SET_PDEATHSIG = 1
PIDFILE = WORK / "pids.json"


NICE = 0  # set from --nice; applied to every benchmark process
ALL_CPUS: set[int] = set(os.sched_getaffinity(0))  # before the orchestrator pins itself


def _renice_self(nice: int) -> None:
    """Nice this process and, with sched_autogroup on, its session's autogroup.

    Every service runs in its own session, hence (autogroup) its own scheduling
    group: a plain nice value only ranks threads inside that group, so the
    group's nice (/proc/self/autogroup) is what ranks it against other sessions.
    """
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text(str(nice))


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def fn() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if NICE:
            _renice_self(NICE)
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return fn


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _group_alive(pgid: int, leader: subprocess.Popen[bytes] | None = None) -> bool:
    if leader is not None:
        leader.poll()  # reap an exited leader: a zombie would keep the group "alive"
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_groups(groups: list[tuple[int, subprocess.Popen[bytes] | None]], grace: float = 3.0) -> None:
    """SIGTERM every group at once, give them `grace` seconds together, then SIGKILL."""
    for pgid, _ in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    alive = groups
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [(g, p) for g, p in alive if _group_alive(g, p)]
    for pgid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    end = time.monotonic() + 2.0
    while alive and time.monotonic() < end:
        time.sleep(0.02)
        alive = [(g, p) for g, p in alive if _group_alive(g, p)]


def _kill_group(pgid: int, grace: float = 3.0, leader: subprocess.Popen[bytes] | None = None) -> None:
    _kill_groups([(pgid, leader)], grace)


class Procs:
    """Long-running services (origin, proxies) and short tool runs."""

    def __init__(self) -> None:
        self.services: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.tools: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()

    @staticmethod
    def reap_stale() -> None:
        """Kill leftovers of a previous run that was SIGKILLed (pids we recorded)."""
        try:
            stale = json.loads(PIDFILE.read_text())
        except (OSError, ValueError):
            return
        for ent in stale:
            pid, cmd = int(ent["pid"]), str(ent["cmd"])
            if cmd and _cmdline(pid) == cmd:
                log(f"killing stale {ent['name']} (pid {pid}) from an interrupted run")
                _kill_group(pid)
        PIDFILE.unlink(missing_ok=True)

    def _record(self) -> None:
        ents = [
            {"name": n, "pid": p.pid, "cmd": _cmdline(p.pid)} for n, p in self.services if p.poll() is None
        ]
        PIDFILE.write_text(json.dumps(ents))

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: set[int] | None,
        logfile: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        replace_env: bool = False,
    ) -> subprocess.Popen[bytes]:
        out = logfile.open("wb")
        full_env = (
            clean_env()
            if not replace_env
            else {k: v for k, v in (env or {}).items() if k.lower() not in _PROXY_ENV}
        )
        if env and not replace_env:
            full_env.update(env)
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec(cpus),
            )
        finally:
            out.close()
        self.services.append((name, p))
        time.sleep(0.05)
        self._record()
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        _kill_group(p.pid, leader=p)

    def run(
        self, argv: list[str], cpus: set[int] | None, timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str, str]:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(env),
            start_new_session=True,
            preexec_fn=_preexec(cpus),
        )
        with self.lock:
            self.tools.add(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p.pid, grace=0.5, leader=p)
            out, err = p.communicate()
            return -999, out.decode(errors="replace"), err.decode(errors="replace") + "\n[timed out]"
        finally:
            if p.poll() is None:
                _kill_group(p.pid, grace=0.5, leader=p)
            with self.lock:
                self.tools.discard(p)
        return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def stop_all(self) -> None:
        with self.lock:
            tools = [(p.pid, p) for p in self.tools]
        # Tools first get SIGINT: a Python tool (loadclient, paid_overhead.py and the
        # x402 stack it runs) then unwinds through its own `finally` and cleans up.
        for pgid, _ in tools:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGINT)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and any(_group_alive(g, p) for g, p in tools):
            time.sleep(0.05)
        groups = tools + [(p.pid, p) for _, p in reversed(self.services)]
        _kill_groups(groups)
        self.services.clear()
        PIDFILE.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((LOOP, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> str | None:
    """None when the port accepts connections, else a reason."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection((LOOP, port), timeout=0.5):
            return None
        time.sleep(0.1)
    return f"port {port} not accepting after {timeout:.0f}s"


def tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def http_get_via(
    proxy_port: int | None, url_host: str, url_port: int, path: str, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One plain-HTTP GET, directly or through a forward proxy (absolute-form)."""
    port = proxy_port or url_port
    target = f"http://{url_host}:{url_port}{path}" if proxy_port else path
    with socket.create_connection((LOOP, port), timeout=timeout) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {url_host}:{url_port}\r\nConnection: close\r\n\r\n".encode()
        )
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, body


def rss_tree_kib(pid: int) -> int:
    """VmRSS of pid plus all its descendants, KiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for t in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            continue
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.peak = max(self.peak, rss_tree_kib(self.pid))
            self.stop_evt.wait(self.interval)

    def finish(self) -> int:
        self.stop_evt.set()
        self.join()
        self.peak = max(self.peak, rss_tree_kib(self.pid))
        return self.peak


class NoiseMonitor:
    """CPU accounting per round: foreign load, per-CPU busy, the proxy's own CPU.

    The machine may be shared (test suites, editors, other agents). Per round we
    compare all busy CPU ticks in /proc/stat with the ticks of our own processes
    (services' process trees + this orchestrator + reaped tool runs); the
    difference, in cores, is "foreign" load. With CONFIG_IRQ_TIME_ACCOUNTING off
    (the common default) softirq ticks are charged to the running task, so
    irq+softirq are counted as busy on both sides.

    Per-CPU busy fractions show where the bottleneck was: a proxy-bound round has
    the proxy CPU near 100 % and the load-generator CPU below it.
    """

    HZ = os.sysconf("SC_CLK_TCK")

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.budget_used = 0.0  # seconds spent waiting for quiet / repeating rounds

    @staticmethod
    def _stat() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in vals[:8])
            out[name] = (user + nice + system + irq + softirq, idle + iowait + steal, steal)
        return out  # type: ignore[return-value]

    @staticmethod
    def tree_ticks(pid: int) -> int:
        total, todo, seen = 0, [pid], set()
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            try:
                rest = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(rest[11]) + int(rest[12])
                for t in Path(f"/proc/{p}/task").iterdir():
                    with contextlib.suppress(OSError):
                        todo += [int(c) for c in (t / "children").read_text().split()]
            except (OSError, IndexError, ValueError):
                continue
        return total

    def _ours(self) -> float:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        ticks = (me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime) * self.HZ
        for _, p in self.procs.services:
            if p.poll() is None:
                ticks += self.tree_ticks(p.pid)
        return ticks

    def snapshot(self, pid: int | None = None) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "stat": self._stat(),
            "ours": self._ours(),
            "pid": pid,
            "pid_ticks": self.tree_ticks(pid) if pid else 0,
        }

    def since(self, snap: dict[str, Any]) -> dict[str, Any]:
        now = self.snapshot(snap["pid"])
        wall = max(now["t"] - snap["t"], 1e-6)
        s0, s1 = snap["stat"], now["stat"]
        busy = s1["cpu"][0] - s0["cpu"][0]
        foreign = max(0.0, busy - (now["ours"] - snap["ours"])) / self.HZ / wall
        out: dict[str, Any] = {
            "foreign_cores": round(foreign, 3),
            "steal_cores": round((s1["cpu"][2] - s0["cpu"][2]) / self.HZ / wall, 3),
            "cpu_busy": {},
        }
        for name in s1:
            if name != "cpu" and name in s0:
                b = s1[name][0] - s0[name][0]
                tot = b + s1[name][1] - s0[name][1]
                out["cpu_busy"][name[3:]] = round(b / tot, 3) if tot else 0.0
        proxy = now["pid_ticks"] - snap["pid_ticks"] if snap["pid"] else 0
        if snap["pid"]:
            out["proxy_cpu"] = round(proxy / self.HZ / wall, 3)
        # everything of ours that is not the proxy: load generator, origin, orchestrator
        out["bench_cpu"] = round((now["ours"] - snap["ours"] - proxy) / self.HZ / wall, 3)
        return out

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait (up to max_wait s) for a 1 s window with foreign load under threshold."""
        t0 = time.monotonic()
        end = t0 + max_wait
        said = False
        while True:
            snap = self.snapshot()
            time.sleep(1.0)
            f = float(self.since(snap)["foreign_cores"])
            if f < threshold or time.monotonic() >= end:
                if said:
                    state = "quiet" if f < threshold else "still busy"
                    log(f"  ...{state} after {time.monotonic() - t0:.0f}s")
                self.budget_used += time.monotonic() - t0
                return f
            if not said:
                log(f"machine busy ({f:.2f} cores used by other processes); waiting up to {max_wait:.0f}s")
                said = True


def version_of(argv: list[str], pattern: str = r"(\d+\.\d+[\w.\-+]*)") -> str:
    exe = shutil.which(argv[0]) or (argv[0] if Path(argv[0]).exists() else None)
    if not exe:
        return "missing"
    try:
        r = subprocess.run([exe, *argv[1:]], capture_output=True, timeout=20, env=clean_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (r.stdout + r.stderr).decode(errors="replace")
    m = re.search(pattern, text)
    return m.group(1) if m else text.strip().splitlines()[0][:60] if text.strip() else "?"


def git_describe() -> str:
    """Commit of the checkout being measured (read-only git calls), '+dirty' if modified."""
    try:
        head = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, timeout=10
            )
            .stdout.decode()
            .strip()
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "proxy"],
            capture_output=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def dpkg_version(pkg: str) -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, timeout=10)
        return r.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def pkg_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    """Minimal TOML writer for nested tables of scalars/lists (enough for a config file)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = ""
    if scalars:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for k, v in d.items():
        if isinstance(v, dict):
            out += to_toml(v, f"{prefix}.{k}" if prefix else k)
    return out


# --------------------------------------------------------------------------------------
# PKI and origin
# --------------------------------------------------------------------------------------


def make_pki(d: Path) -> None:
    """Self-signed CA + 127.0.0.1 leaf for the HTTPS origin (regenerated when missing/old)."""
    d.mkdir(parents=True, exist_ok=True)
    ca_p, crt_p, key_p = d / "origin-ca.pem", d / "origin.pem", d / "origin.key"
    if all(p.exists() for p in (ca_p, crt_p, key_p)) and time.time() - crt_p.stat().st_mtime < 20 * 86400:
        return
    # The tests' throwaway CA builder serves the bench origin too (one copy of the X.509 details).
    sys.path.insert(0, str(ROOT))
    from tests.support.certs import UpstreamCA

    ca = UpstreamCA.create(d, "x402-proxy-bench-origin-CA")
    leaf = ca.issue(d, ["127.0.0.1", "::1", "localhost"])
    ca.cert_path.replace(ca_p)
    leaf.cert_path.replace(crt_p)
    leaf.key_path.replace(key_p)
    key_p.chmod(0o600)


def make_docroot(d: Path, big_bytes: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    small = d / "small"
    if not small.exists() or small.read_bytes() != SMALL_BODY:
        small.write_bytes(SMALL_BODY)
    big = d / "big"
    if not big.exists() or big.stat().st_size != big_bytes:
        with big.open("wb") as f:  # sparse: no disk used, served from zero pages
            f.truncate(big_bytes)


NGINX_CONF = """\
# generated by bench/run.py
{user}worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    etag off;
    client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
    server {{
        listen {host}:{http_port} reuseport backlog=4096;
        root {www};
        location / {{ }}
    }}
    server {{
        listen {host}:{https_port} ssl reuseport backlog=4096;
        ssl_certificate {pki}/origin.pem;
        ssl_certificate_key {pki}/origin.key;
        ssl_session_cache shared:bench:1m;
        root {www};
        location / {{ }}
    }}
}}
"""

TINYPROXY_CONF = """\
# generated by bench/run.py
Port {port}
Listen {host}
Timeout 600
MaxClients 4096
LogLevel Critical
LogFile "{d}/tinyproxy.log"
PidFile "{d}/tinyproxy.pid"
Allow {host}
DisableViaHeader Yes
XTinyproxy No
"""


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------


@dataclass
class Contender:
    key: str
    label: str
    port: int | None = None  # None for direct
    proc: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # CA a client must trust for HTTPS through this contender
    unavailable: str | None = None
    https_unavailable: str | None = None
    version: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy_url(self) -> str | None:
        return f"http://{LOOP}:{self.port}" if self.port else None


@dataclass
class Ctx:
    args: argparse.Namespace
    procs: Procs
    loadgen_cpus: set[int] | None
    proxy_cpus: set[int] | None
    origin_cpus: set[int] | None = None
    http_port: int = 0
    https_port: int = 0
    origin_ca: Path = WORK / "pki" / "origin-ca.pem"
    contenders: dict[str, Contender] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    noise: NoiseMonitor | None = None


def start_origin(ctx: Ctx) -> None:
    d = WORK / "nginx"
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    make_pki(WORK / "pki")
    make_docroot(WORK / "www", ctx.args.stream_mib * 1024 * 1024)
    ctx.http_port, ctx.https_port = free_port(ctx.taken), free_port(ctx.taken)
    # As root nginx would switch its worker to "nobody", which may not be able to
    # traverse the checkout (e.g. under /root); the origin is loopback-only.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = d / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            d=d,
            host=LOOP,
            http_port=ctx.http_port,
            https_port=ctx.https_port,
            www=WORK / "www",
            pki=WORK / "pki",
        )
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    p = ctx.procs.start(
        "nginx",
        [nginx, "-p", f"{d}/", "-c", str(conf), "-e", str(d / "error.log")],
        ctx.origin_cpus,
        d / "stdout.log",
    )
    for port in (ctx.http_port, ctx.https_port):
        why = wait_port(port, p, 10)
        if why:
            raise SystemExit(
                f"origin nginx did not start: {why}: {tail(d / 'error.log')} {tail(d / 'stdout.log')}"
            )
    status, body = http_get_via(None, LOOP, ctx.http_port, "/small")
    if status != 200 or body != SMALL_BODY:
        raise SystemExit(f"origin smoke test failed: {status} {body[:60]!r}")
    pr = load_client_probe(ctx, None, ctx.origin_ca)
    if not pr.get("ok"):
        raise SystemExit(f"origin HTTPS smoke test failed: {pr}")


def load_client_probe(ctx: Ctx, proxy: str | None, cafile: Path) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "loadclient.py"),
        "probe",
        f"https://{LOOP}:{ctx.https_port}/small",
        "--cafile",
        str(cafile),
    ]
    if proxy:
        argv += ["--proxy", proxy]
    rc, out, err = ctx.procs.run(argv, ctx.loadgen_cpus, timeout=20)
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"ok": False, "error": f"probe rc={rc}: {err.strip()[-200:]}"}


def check_plain(c: Contender, ctx: Ctx) -> str | None:
    try:
        status, body = http_get_via(c.port, LOOP, ctx.http_port, "/small")
    except OSError as e:
        return f"plain HTTP smoke request failed: {e}"
    if status != 200 or body != SMALL_BODY:
        return f"plain HTTP smoke request returned {status} {body[:40]!r}"
    return None


def check_intercept(c: Contender, ctx: Ctx) -> str | None:
    """The client trusts ONLY the proxy's CA: success proves the proxy minted the leaf."""
    if c.ca_file is None or not c.ca_file.exists():
        return f"no CA file at {c.ca_file}"
    c.probe = load_client_probe(ctx, c.proxy_url, c.ca_file)
    if not c.probe.get("ok"):
        return f"interception probe failed: {c.probe.get('error') or c.probe.get('status')}"
    return None


def wait_file(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size > 0:
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return path.exists()


def start_x402(ctx: Ctx, key: str = "x402", default_config: bool = False) -> Contender:
    """x402-proxy with a generated config. `default_config`: the logging people run (level info, the
    access log on, plain lines to the log file) instead of the quiet settings of the other contenders."""
    c = Contender(key, "x402-proxy, default config" if default_config else "x402-proxy")
    exe = Path(ctx.args.x402_bin)
    c.version = pkg_version("x402-proxy")
    if not exe.exists():
        c.unavailable = f"not startable: {exe} not found"
        return c
    d = WORK / key
    home = d / "home"
    shutil.rmtree(home, ignore_errors=True)  # fresh state (and CA) every run
    home.mkdir(parents=True)
    cfg = d / "config.toml"
    conf: dict[str, Any] = {
        # trust the bench origin's self-signed CA for upstream TLS
        "upstream": {"extra_ca_bundle": str(ctx.origin_ca)},
        # the HTTPS origin listens on a free high port; default allows only 443/8443
        "proxy": {"connect_ports": [str(ctx.https_port)]},
        # like tinyproxy (LogLevel Critical) and mitmdump (--quiet): no per-request log
        "log": {"level": "warning", "access_log": False},
        # the admin API defaults to the proxy port + 1, which may be taken: give it a free one
        "admin": {"listen": f"{LOOP}:{free_port(ctx.taken)}"},
    }
    if default_config:
        del conf["log"]
    if ctx.args.x402_config_extra:
        import tomllib

        deep_merge(conf, tomllib.loads(Path(ctx.args.x402_config_extra).read_text()))
    cfg.write_text("# generated by bench/run.py\n" + to_toml(conf))
    c.port = free_port(ctx.taken)
    argv = [str(exe), "run", "--listen", f"{LOOP}:{c.port}", "--home", str(home), "--config", str(cfg)]
    logf = d / "proxy.log"
    # X402_PROXY_* variables would override the file: keep the run reproducible
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_PROXY_")}
    c.proc = ctx.procs.start(key, argv, ctx.proxy_cpus, logf, env=env, replace_env=True)
    why = wait_port(c.port, c.proc, ctx.args.start_timeout)
    if why:
        c.unavailable = f"not startable: {why}; log: {tail(logf)[:300]}"
        ctx.procs.stop(c.proc)
        return c
    c.unavailable = check_plain(c, ctx)
    c.ca_file = home / "ca.pem"
    wait_file(c.ca_file, c.proc, 5)
    c.https_unavailable = check_intercept(c, ctx)
    return c


def start_tinyproxy(ctx: Ctx) -> Contender:
    c = Contender("tinyproxy", "tinyproxy")
    exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    c.version = version_of([exe, "-v"])
    if not Path(exe).exists():
        c.unavailable = "not installed (bash bench/setup.sh)"
        return c
    d = WORK / "tinyproxy"
    d.mkdir(parents=True, exist_ok=True)
    c.port = free_port(ctx.taken)
    (d / "tinyproxy.conf").write_text(TINYPROXY_CONF.format(port=c.port, host=LOOP, d=d))
    c.proc = ctx.procs.start(
        "tinyproxy", [exe, "-d", "-c", str(d / "tinyproxy.conf")], ctx.proxy_cpus, d / "stdout.log"
    )
    why = wait_port(c.port, c.proc, 10)
    c.unavailable = f"not startable: {why}; {tail(d / 'stdout.log')}" if why else check_plain(c, ctx)
    c.https_unavailable = "not an intercepting proxy"
    return c


def start_mitm(ctx: Ctx) -> Contender:
    c = Contender("mitmproxy", "mitmproxy")
    exe = WORK / "mitm-venv" / "bin" / "mitmdump"
    if not exe.exists():
        c.unavailable = "not installed (bash bench/setup.sh creates .bench/mitm-venv)"
        return c
    c.version = version_of([str(exe), "--version"], r"Mitmproxy:\s*(\S+)")
    d = WORK / "mitmproxy"
    conf = d / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    c.port = free_port(ctx.taken)
    argv = [
        str(exe),
        "--quiet",
        "--mode",
        "regular",
        "--listen-host",
        LOOP,
        "--listen-port",
        str(c.port),
        "--set",
        f"confdir={conf}",
        # fair tuning: no upstream connection before it is needed, no upstream
        # certificate sniffing (x402-proxy mints from CONNECT host/SNI too),
        # HTTP/1.1 only like every other contender, no flow logging, stream large bodies
        "--set",
        "connection_strategy=lazy",
        "--set",
        "upstream_cert=false",
        "--set",
        "http2=false",
        "--set",
        "termlog_verbosity=error",
        "--set",
        "flow_detail=0",
        "--set",
        "stream_large_bodies=1m",
        "--set",
        f"ssl_verify_upstream_trusted_ca={ctx.origin_ca}",
    ]
    c.proc = ctx.procs.start("mitmdump", argv, ctx.proxy_cpus, d / "stdout.log")
    why = wait_port(c.port, c.proc, 30)
    c.unavailable = f"not startable: {why}; {tail(d / 'stdout.log')}" if why else check_plain(c, ctx)
    c.ca_file = conf / "mitmproxy-ca-cert.pem"
    if not c.unavailable:
        wait_file(c.ca_file, c.proc, 10)
        c.https_unavailable = check_intercept(c, ctx)
    return c


# --------------------------------------------------------------------------------------
# Load runners: each returns {"value": float, ...details} or raises RunError
# --------------------------------------------------------------------------------------


class RunError(Exception):
    pass


def run_wrk(
    ctx: Ctx, c: Contender, conns: int, duration: int, cpus: set[int] | str | None = "loadgen"
) -> dict[str, Any]:
    origin = f"{LOOP}:{ctx.http_port}"
    env = {"BENCH_HOST": origin, "BENCH_PATH": f"http://{origin}/small" if c.port else "/small"}
    target = c.proxy_url or f"http://{origin}"
    argv = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(conns),
        "-d",
        f"{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(HERE / "wrk.lua"),
        f"{target}/",
    ]
    pin = ctx.loadgen_cpus if cpus == "loadgen" else cpus
    rc, out, err = ctx.procs.run(argv, pin, timeout=duration + 30, env=env)  # type: ignore[arg-type]
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCHJSON ")), None)
    if rc != 0 or line is None:
        raise RunError(f"wrk rc={rc}: {(err or out).strip()[-200:]}")
    r = json.loads(line[len("BENCHJSON ") :])
    secs = r["duration_us"] / 1e6
    ok = r["requests"] - r["errors"]["status"]
    if ok <= 0:
        raise RunError(f"wrk: no successful responses ({r['errors']})")
    r["rps"] = ok / secs
    r["value"] = r["rps"]
    return r


def run_loadclient(ctx: Ctx, c: Contender, scheme: str, conns: int, duration: float) -> dict[str, Any]:
    port = ctx.https_port if scheme == "https" else ctx.http_port
    argv = [
        sys.executable,
        str(HERE / "loadclient.py"),
        "load",
        f"{scheme}://{LOOP}:{port}/small",
        "-c",
        str(conns),
        "-d",
        str(duration),
    ]
    if c.port:
        argv += ["--proxy", c.proxy_url or ""]
    if scheme == "https":
        argv += ["--cafile", str(c.ca_file or ctx.origin_ca)]
    rc, out, err = ctx.procs.run(argv, ctx.loadgen_cpus, timeout=duration + 60)
    try:
        r = dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError) as e:
        raise RunError(f"loadclient rc={rc}: {err.strip()[-200:]}") from e
    if r["requests"] <= 0:
        raise RunError(f"loadclient: no successful responses ({r})")
    r["errors"] = {
        "connect": r["connect_errors"],
        "read": r["read_errors"],
        "timeout": 0,
        "status": r["non2xx"],
    }
    r["value"] = r["rps"]
    return r


def run_hey(ctx: Ctx, c: Contender, scheme: str, conns: int, duration: int) -> dict[str, Any]:
    """Cross-check client (--https-client hey). hey never verifies certificates."""
    port = ctx.https_port if scheme == "https" else ctx.http_port
    argv = ["hey", "-c", str(conns), "-z", f"{duration}s", "-disable-compression"]
    if c.port:
        argv += ["-x", c.proxy_url or ""]
    argv.append(f"{scheme}://{LOOP}:{port}/small")
    rc, out, err = ctx.procs.run(argv, ctx.loadgen_cpus, timeout=duration + 60)
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    codes = {k: int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    if rc != 0 or not m:
        raise RunError(f"hey rc={rc}: {(err or out).strip()[-200:]}")
    total = sum(codes.values())
    ok = codes.get("200", 0)
    if ok == 0:
        raise RunError(f"hey: no 200 responses ({codes}) {out[-200:]}")
    rps = float(m.group(1)) * ok / max(total, 1)
    return {"rps": rps, "value": rps, "codes": codes, "errors": "Error distribution" in out}


def run_curl_stream(ctx: Ctx, c: Contender) -> dict[str, Any]:
    size = ctx.args.stream_mib * 1024 * 1024
    argv = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "300",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    if c.port:
        argv += ["-x", c.proxy_url or ""]
    else:
        argv += ["--noproxy", "*"]
    argv.append(f"http://{LOOP}:{ctx.http_port}/big")
    sampler = None
    before = 0
    if c.proc is not None:
        before = rss_tree_kib(c.proc.pid)
        sampler = RssSampler(c.proc.pid)
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        start_new_session=True,
        preexec_fn=_preexec(ctx.loadgen_cpus),
    )
    with ctx.procs.lock:
        ctx.procs.tools.add(p)
    if sampler:
        sampler.start()
    try:
        out_b, err_b = p.communicate(timeout=320)
    except subprocess.TimeoutExpired:
        _kill_group(p.pid, 0.5, leader=p)
        out_b, err_b = p.communicate()
    finally:
        with ctx.procs.lock:
            ctx.procs.tools.discard(p)
        peak = sampler.finish() if sampler else 0
    wall = time.monotonic() - t0
    parts = out_b.decode().split()
    if p.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
        raise RunError(f"curl rc={p.returncode} out={out_b.decode()!r} err={err_b.decode()[-200:]!r}")
    secs = float(parts[2]) or wall
    r: dict[str, Any] = {"bytes": size, "seconds": secs, "mb_s": size / secs / 1e6}
    r["value"] = r["mb_s"]
    if sampler:
        r.update(rss_before_kib=before, rss_peak_kib=peak, rss_growth_mib=(peak - before) / 1024)
    return r


# --------------------------------------------------------------------------------------
# Measurement: warmup, then rounds interleaved across contenders
# --------------------------------------------------------------------------------------

Runner = Callable[[float], dict[str, Any]]


@dataclass
class Case:
    key: str  # row key in results
    label: str
    why: str | None  # reason it cannot run, or None
    fn: Runner | None  # fn(duration) -> {"value": ..., ...}
    pid: int | None = None  # proxy process whose CPU use is reported


def measure(
    ctx: Ctx, scenario: str, cases: list[Case], warmup: float, duration: float, rounds: int, unit: str
) -> dict[str, Any]:
    """Warm every case up once, then run `rounds` rounds, interleaving the cases.

    A round during which other processes on the machine used more than
    --noise-threshold cores is repeated (after waiting for quiet) up to
    --noise-retries times while the --noise-budget lasts; if it stays noisy it
    is kept and flagged.
    """
    a = ctx.args
    rows: dict[str, Any] = {}
    live = []
    for c in cases:
        rows[c.key] = {"label": c.label, "unit": unit, "rounds": [], "details": [], "errors": []}
        if c.why or c.fn is None:
            rows[c.key].update(status="n/a", reason=c.why or "not run")
        else:
            live.append(c)
    if warmup > 0:
        for c in live:
            try:
                assert c.fn is not None
                c.fn(warmup)
            except RunError as e:
                rows[c.key]["errors"].append(f"warmup: {e}")
    noise = ctx.noise
    for rnd in range(rounds):
        for c in live:
            assert c.fn is not None
            r: dict[str, Any] | None = None
            for attempt in range(a.noise_retries + 1):
                if attempt and noise is not None:
                    noise.wait_quiet(a.noise_threshold, a.quiet_wait)
                snap = noise.snapshot(c.pid) if noise else None
                t0 = time.monotonic()
                try:
                    r = c.fn(duration)
                except RunError as e:
                    rows[c.key]["errors"].append(str(e))
                    log(f"{scenario} round {rnd + 1}/{rounds} {c.key}: ERROR {e}")
                    r = None
                    break
                if noise is not None and snap is not None:
                    r.update(noise.since(snap))
                # In priority mode (--nice < 0) the benchmark pre-empts other work, so
                # their CPU use is reported but does not make a round noisy.
                noisy = NICE >= 0 and r.get("foreign_cores", 0.0) > a.noise_threshold
                r["noisy"] = noisy
                cpu = ""
                if "proxy_cpu" in r:
                    cpu = f"  proxy {100 * r['proxy_cpu']:.0f}% CPU"
                tag = f"  NOISY: other processes used {r['foreign_cores']:.2f} cores" if noisy else ""
                log(f"{scenario} round {rnd + 1}/{rounds} {c.key}: {r['value']:,.2f} {unit}{cpu}{tag}")
                if not noisy:
                    break
                if noise is not None:
                    noise.budget_used += time.monotonic() - t0
                if attempt < a.noise_retries and noise is not None and noise.budget_used < a.noise_budget:
                    log("  -> round discarded, will repeat it")
                    rows[c.key].setdefault("discarded", []).append(r["value"])
                else:
                    break
            if r is None:
                continue
            rows[c.key]["rounds"].append(r["value"])
            rows[c.key]["details"].append({k: v for k, v in r.items() if k != "value"})
    for c in live:
        row = rows[c.key]
        if row["rounds"]:
            row["median"] = statistics.median(row["rounds"])
            row["status"] = "ok"
            lo, hi = min(row["rounds"]), max(row["rounds"])
            row["spread_pct"] = 100.0 * (hi - lo) / row["median"] if row["median"] else 0.0
            row["noisy_rounds"] = sum(1 for d in row["details"] if d.get("noisy"))
            pc = [d["proxy_cpu"] for d in row["details"] if "proxy_cpu" in d]
            if pc:
                row["proxy_cpu"] = statistics.median(pc)
            lg = [d["bench_cpu"] for d in row["details"] if "bench_cpu" in d]
            if lg:
                row["loadgen_cpu"] = statistics.median(lg)
        else:
            row.update(status="n/a", reason=f"failed: {row['errors'][-1] if row['errors'] else '?'}")
    return rows


def median_of(row: dict[str, Any], path: Callable[[dict[str, Any]], float]) -> float | None:
    vals = [path(d) for d in row.get("details", [])]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------

ORDER = ("direct", "x402", "tinyproxy", "mitmproxy")
# Contenders that only scenario 1 measures: x402-proxy as people run it (access log on).
PLAIN_ONLY = ("x402default",)


def _cases(
    ctx: Ctx,
    keys: tuple[str, ...],
    make: Callable[[Contender], Runner],
    https: bool = False,
    suffix: str = "",
    label_suffix: str = "",
) -> list[Case]:
    out = []
    for k in keys:
        c = ctx.contenders.get(k)
        if c is None:
            continue
        why = c.unavailable or (c.https_unavailable if https else None)
        pid = c.proc.pid if c.proc is not None else None
        out.append(Case(k + suffix, c.label + label_suffix, why, None if why else make(c), pid))
    return out


def scenario_plain_http(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    keys = ("direct", "x402", "x402default", "tinyproxy", "mitmproxy")
    cases = _cases(ctx, keys, lambda c: lambda d: run_wrk(ctx, c, a.connections, int(d)))
    rows = measure(ctx, "plain_http", cases, a.warmup, a.duration, a.rounds, "req/s")
    return {
        "title": f"1. Plain HTTP keep-alive throughput (wrk, {a.connections} conns)",
        "unit": "req/s",
        "rows": rows,
    }


def scenario_https(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    conns = a.connections

    def mk(scheme: str) -> Callable[[Contender], Runner]:
        if a.https_client == "hey":
            return lambda c: lambda d: run_hey(ctx, c, scheme, conns, int(d))
        return lambda c: lambda d: run_loadclient(ctx, c, scheme, conns, d)

    cases = _cases(
        ctx, ("direct", "x402", "mitmproxy"), mk("https"), https=True, suffix="_https", label_suffix=" HTTPS"
    )
    cases += _cases(ctx, ("direct", "x402"), mk("http"), suffix="_http", label_suffix=" plain HTTP")
    rows = measure(ctx, "https", cases, a.warmup, a.duration, a.rounds, "req/s")
    client = "hey" if a.https_client == "hey" else "bench/loadclient.py"
    return {
        "title": f"2. Intercepted HTTPS keep-alive throughput via CONNECT ({client}, {conns} conns)",
        "unit": "req/s",
        "rows": rows,
    }


def set_tree_affinity(pid: int, cpus: set[int]) -> None:
    """Re-pin every thread of a running process tree."""
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError):
            for t in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(t.name), cpus)
                    todo += [int(c) for c in (t / "children").read_text().split()]


def scenario_latency(ctx: Ctx) -> dict[str, Any]:
    """Sequential requests on one connection: only one process is ever runnable.

    Layout "onecpu" (default): wrk, the origin and the proxy all run on the
    proxy's CPU for this scenario. Nobody waits for a CPU (the exchange is
    strictly sequential) and no wakeup crosses CPUs: in this VM a cross-CPU
    wakeup costs tens of microseconds, and with the throughput layout a proxied
    request would pay four of them (wrk->proxy->origin->proxy->wrk) where a
    direct one pays none, which would be measured as "proxy latency".
    Layout "split" keeps the throughput pinning.
    """
    a = ctx.args
    origin = next((p for n, p in ctx.procs.services if n == "nginx"), None)
    wrk_cpus: set[int] | str | None = "loadgen"
    if a.latency_layout == "onecpu" and ctx.proxy_cpus and origin is not None:
        one = {min(ctx.proxy_cpus)}
        set_tree_affinity(origin.pid, one)
        for c in ctx.contenders.values():
            if c.proc is not None and c.proc.poll() is None:
                set_tree_affinity(c.proc.pid, one)
        wrk_cpus = one
    try:
        cases = _cases(
            ctx,
            ("direct", "x402", "tinyproxy"),
            lambda c: lambda d: run_wrk(ctx, c, 1, int(d), wrk_cpus),
        )
        rows = measure(ctx, "latency", cases, a.warmup, a.duration, a.rounds, "req/s")
    finally:
        if wrk_cpus != "loadgen" and origin is not None:
            set_tree_affinity(origin.pid, ctx.origin_cpus or set(os.sched_getaffinity(0)))
            for c in ctx.contenders.values():
                if c.proc is not None and c.proc.poll() is None and ctx.proxy_cpus:
                    set_tree_affinity(c.proc.pid, ctx.proxy_cpus)
    for row in rows.values():
        if row["status"] == "ok":
            row["p50_ms"] = median_of(row, lambda d: d["latency_us"]["p50"] / 1000)
            row["p99_ms"] = median_of(row, lambda d: d["latency_us"]["p99"] / 1000)
    where = f"all on CPU {min(ctx.proxy_cpus)}" if wrk_cpus != "loadgen" and ctx.proxy_cpus else "split CPUs"
    return {
        "title": f"3. Added latency, 1 connection, sequential keep-alive requests (wrk -c1, {where})",
        "unit": "ms",
        "rows": rows,
    }


def scenario_streaming(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    # warm the origin's page cache for the sparse file once, untimed
    with contextlib.suppress(RunError):
        run_curl_stream(ctx, Contender("direct", "direct"))
    origin = next((p for n, p in ctx.procs.services if n == "nginx"), None)
    two_cpus = bool(ctx.proxy_cpus) and origin is not None

    def direct_on_two_cpus(_d: float) -> dict[str, Any]:
        # A proxied download has two CPUs at work (curl+origin on one, the proxy on
        # the other); the reference gets the same two: the origin moves to the idle
        # proxy CPU for the duration.
        assert origin is not None and ctx.proxy_cpus
        set_tree_affinity(origin.pid, ctx.proxy_cpus)
        try:
            return run_curl_stream(ctx, ctx.contenders["direct"])
        finally:
            set_tree_affinity(origin.pid, ctx.origin_cpus or ALL_CPUS)

    cases = []
    if two_cpus and "direct" in ctx.contenders:
        cases.append(Case("direct", "direct (curl | origin, 2 CPUs)", None, direct_on_two_cpus))
        cases.append(
            Case(
                "direct_1cpu",
                "direct (curl+origin, 1 CPU)",
                None,
                lambda d: run_curl_stream(ctx, ctx.contenders["direct"]),
            )
        )
        cases += _cases(ctx, ("x402", "tinyproxy"), lambda c: lambda d: run_curl_stream(ctx, c))
    else:
        cases = _cases(ctx, ("direct", "x402", "tinyproxy"), lambda c: lambda d: run_curl_stream(ctx, c))
    rows = measure(ctx, "streaming", cases, 0, 0, a.stream_rounds, "MB/s")
    for row in rows.values():
        if row["status"] == "ok" and row["details"] and "rss_growth_mib" in row["details"][0]:
            row["rss_growth_mib_max"] = max(d["rss_growth_mib"] for d in row["details"])
            row["rss_peak_mib_max"] = max(d["rss_peak_kib"] for d in row["details"]) / 1024
            row["rss_before_mib"] = row["details"][0]["rss_before_kib"] / 1024
    return {"title": f"4. Streaming {a.stream_mib} MiB download (curl, 1 conn)", "unit": "MB/s", "rows": rows}


def scenario_paid(ctx: Ctx) -> dict[str, Any]:
    """Paid request overhead, via the lead's bench/paid_overhead.py.

    That script starts the local x402 stack (anvil, test token, reference
    facilitator, @x402/express V2 server, all on loopback) and a paying
    x402-proxy of its own, does N sequential paid requests and reports the
    proxy's own time from 402-in-hand to paid-retry-out (median, p90), plus
    end-to-end paid vs free request times. It is run unpinned (its stack has
    several processes) at the benchmark's priority, once.
    """
    a = ctx.args
    title = "5. Paid request overhead (402 in hand -> paid retry out, bench/paid_overhead.py)"
    script = HERE / "paid_overhead.py"
    row: dict[str, Any] = {"label": "x402-proxy paying", "unit": "ms", "rounds": [], "details": []}
    x = ctx.contenders.get("x402")
    if not script.exists():
        row.update(status="pending", reason="pending: bench/paid_overhead.py not present")
    elif x is None or x.unavailable:
        row.update(status="n/a", reason=f"x402-proxy {x.unavailable if x else 'not selected'}")
    else:
        argv = [sys.executable, str(script), "--requests", str(a.paid_requests)]
        rc, out, err = ctx.procs.run(argv, ALL_CPUS, timeout=300)
        try:
            res = dict(json.loads(out[out.index("{") : out.rindex("}") + 1]))
            row.update(
                status="ok",
                median=float(res["overhead_ms_median"]),
                p90=float(res["overhead_ms_p90"]),
                paid_ms=res.get("paid_request_ms_median"),
                free_ms=res.get("free_request_ms_median"),
                target_ms=res.get("target_ms"),
                rounds=[float(res["overhead_ms_median"])],
                details=[res],
            )
        except (ValueError, KeyError) as e:
            tail_ = (err or out).strip().splitlines()[-1:] or ["no output"]
            row.update(status="n/a", reason=f"failed (rc={rc}, {type(e).__name__}): {tail_[0][:200]}")
    return {"title": title, "unit": "paid", "rows": {"x402_paid": row}}


SCENARIOS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "plain_http": scenario_plain_http,
    "https": scenario_https,
    "latency": scenario_latency,
    "streaming": scenario_streaming,
    "paid": scenario_paid,
}


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


def _get(res: dict[str, Any], scen: str, row: str, fld: str = "median") -> float | None:
    r = res.get(scen, {}).get("rows", {}).get(row)
    if not r or r.get("status") != "ok":
        return None
    v = r.get(fld)
    return float(v) if v is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


# (name, value function, op, threshold, unit)
TARGETS: list[tuple[str, Callable[[dict[str, Any]], float | None], str, float, str]] = [
    (
        "plain HTTP: x402-proxy / tinyproxy",
        lambda r: _ratio(_get(r, "plain_http", "x402"), _get(r, "plain_http", "tinyproxy")),
        ">=",
        2.0,
        "x",
    ),
    (
        "plain HTTP: x402-proxy / mitmproxy",
        lambda r: _ratio(_get(r, "plain_http", "x402"), _get(r, "plain_http", "mitmproxy")),
        ">=",
        10.0,
        "x",
    ),
    (
        "plain HTTP: default config (access log on) / access log off",
        lambda r: _ratio(_get(r, "plain_http", "x402default"), _get(r, "plain_http", "x402")),
        ">=",
        0.85,
        "x",
    ),
    (
        "HTTPS intercepted / plain HTTP (x402-proxy, same client)",
        lambda r: _ratio(_get(r, "https", "x402_https"), _get(r, "https", "x402_http")),
        ">=",
        0.6,
        "x",
    ),
    (
        "added p50 latency over direct (ms)",
        lambda r: _diff(_get(r, "latency", "x402", "p50_ms"), _get(r, "latency", "direct", "p50_ms")),
        "<=",
        0.2,
        "ms",
    ),
    (
        "streaming: x402-proxy RSS growth (MiB, max of rounds)",
        lambda r: _get(r, "streaming", "x402", "rss_growth_mib_max"),
        "<=",
        32.0,
        "MiB",
    ),
    (
        "streaming: x402-proxy / direct throughput",
        lambda r: _ratio(_get(r, "streaming", "x402"), _get(r, "streaming", "direct")),
        ">=",
        0.5,
        "x",
    ),
    (
        "paid request: proxy overhead, median (ms)",
        lambda r: _get(r, "paid", "x402_paid"),
        "<=",
        5.0,
        "ms",
    ),
]


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, fn, op, thr, unit in TARGETS:
        v = fn(res)
        if v is None:
            status = "n/a"
        else:
            status = "PASS" if (v >= thr if op == ">=" else v <= thr) else "FAIL"
        out.append({"target": name, "value": v, "op": op, "threshold": thr, "unit": unit, "status": status})
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "MB/s":
        return f"{v:,.1f}"
    return f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def render(res: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for scen in res.values():
        rows = scen["rows"]
        lines += ["", scen["title"]]
        unit = scen["unit"]
        ref = rows.get("direct", {})
        if unit == "ms":
            lines.append(
                f"  {'contender':<32}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'req/s':>9}"
                f"{'CPU':>10}"
            )
        elif unit == "paid":
            lines.append(
                f"  {'contender':<32}{'median ms':>10}{'p90 ms':>9}{'paid req ms':>13}{'free req ms':>13}"
            )
        elif unit == "MB/s":
            lines.append(
                f"  {'contender':<32}{'MB/s':>9}{'÷direct':>9}{'RSS before':>12}{'peak':>9}{'growth':>9}"
                f"{'CPU':>10}"
            )
        elif unit:
            lines.append(f"  {'contender':<32}{'median':>9}{'x402÷':>8}{'spread':>8}{'CPU':>10}  rounds")
        for key, row in rows.items():
            label = row["label"]
            if row.get("status") != "ok":
                reason = row.get("reason", row.get("status"))
                shown = reason if row.get("status") == "pending" else f"n/a ({reason})"
                lines.append(f"  {label:<32}{shown}")
                continue
            cpu = f"{_pct(row.get('loadgen_cpu'))}/{_pct(row.get('proxy_cpu'))}"
            if unit == "paid":
                lines.append(
                    f"  {label:<32}{row['median']:>10.3f}{row['p90']:>9.3f}"
                    f"{_fmt(row.get('paid_ms'), 'ms'):>13}{_fmt(row.get('free_ms'), 'ms'):>13}"
                )
            elif unit == "ms":
                ok = ref.get("status") == "ok"
                d50 = _diff(row.get("p50_ms"), ref.get("p50_ms")) if ok else None
                d99 = _diff(row.get("p99_ms"), ref.get("p99_ms")) if ok else None
                lines.append(
                    f"  {label:<32}{_fmt(row['p50_ms'], 'ms'):>9}{_fmt(row['p99_ms'], 'ms'):>9}"
                    f"{_fmt(d50, 'ms'):>9}{_fmt(d99, 'ms'):>9}{row['median']:>9,.0f}{cpu:>10}"
                )
            elif unit == "MB/s":
                r = _ratio(row["median"], ref.get("median")) if ref.get("status") == "ok" else None
                rs = f"{'':>12}{'':>9}{'':>9}"
                if "rss_growth_mib_max" in row:
                    rs = (
                        f"{row['rss_before_mib']:>9.1f}MiB{row['rss_peak_mib_max']:>6.1f}MiB"
                        f"{row['rss_growth_mib_max']:>6.1f}MiB"
                    )
                rr = f"{r:.2f}x" if r is not None else "n/a"
                lines.append(f"  {label:<32}{_fmt(row['median'], unit):>9}{rr:>9}{rs}{cpu:>10}")
            else:
                suffix = key[len(key.split("_")[0]) :]
                x = rows.get("x402" + suffix, {})
                vs = _ratio(x.get("median"), row["median"]) if x.get("status") == "ok" else None
                rounds = ", ".join(
                    _fmt(v, unit) + ("*" if d.get("noisy") else "")
                    for v, d in zip(row["rounds"], row["details"], strict=True)
                )
                vss = f"{vs:.2f}x" if vs is not None else "n/a"
                lines.append(
                    f"  {label:<32}{_fmt(row['median'], unit):>9}{vss:>8}{row['spread_pct']:>7.1f}%"
                    f"{cpu:>10}  [{rounds}]"
                )
            errs = [d.get("errors") for d in row.get("details", []) if isinstance(d.get("errors"), dict)]
            if errs and any(
                e.get("read") or e.get("connect") or e.get("timeout") or e.get("status") for e in errs
            ):
                tot = {k: sum(e[k] for e in errs) for k in ("connect", "read", "timeout", "status")}
                why = ""
                if key == "tinyproxy" and tot["read"]:
                    why = "; tinyproxy closes the client connection after each response, wrk reconnects"
                lines.append(f"  {'':<32}(client-side errors, all rounds: {tot}{why})")
    lines += [
        "",
        "  CPU = cores used by load generator + origin / by the proxy's process tree (median of rounds);",
        "  a proxy-bound row shows the proxy near 100%.",
    ]
    foreign = [
        d["foreign_cores"]
        for scen in res.values()
        for r in scen["rows"].values()
        for d in r.get("details", [])
        if "foreign_cores" in d
    ]
    if foreign:
        lines.append(
            f"  Other processes on the machine used {statistics.mean(foreign):.2f} cores on average during"
            f" the rounds (max {max(foreign):.2f})"
            + (f"; priority mode (--nice {NICE}) was on." if NICE else ".")
        )
    noisy = sum(r.get("noisy_rounds", 0) for scen in res.values() for r in scen["rows"].values())
    if noisy:
        lines.append(
            f"  * {noisy} round(s) ran while other processes on the machine used more than the noise"
            " threshold of CPU, even after repeats; treat them with care (results.json has details)."
        )
    lines += ["", "Targets (ratios from this run)"]
    for t in targets:
        v = t["value"]
        vs = "n/a" if v is None else (f"{v:.2f}x" if t["unit"] == "x" else f"{v:.3f} {t['unit']}")
        thr = f"{t['threshold']}{'x' if t['unit'] == 'x' else ' ' + t['unit']}"
        lines.append(f"  [{t['status']:>4}] {t['target']:<58} {vs:>12}  (target {t['op']} {thr})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_cpus(s: str) -> set[int] | None:
    if s in ("", "none"):
        return None
    out: set[int] = set()
    for part in s.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def default_cpus() -> tuple[str, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "none", "none"
    return str(cpus[0]), str(cpus[1])


def main() -> int:
    lg, px = default_cpus()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured round")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of untimed warmup per row")
    ap.add_argument("--connections", type=int, default=50, help="concurrent connections (all contenders)")
    ap.add_argument("--stream-mib", type=int, default=1024)
    ap.add_argument("--stream-rounds", type=int, default=3)
    ap.add_argument("--loadgen-cpus", default=lg, help="CPUs for load generator + origin (e.g. 0, 'none')")
    ap.add_argument("--proxy-cpus", default=px, help="CPUs for the proxy under test (e.g. 1, 'none')")
    ap.add_argument(
        "--origin-cpus", default="loadgen", help="CPUs for nginx (default: same as load generator)"
    )
    ap.add_argument(
        "--latency-layout",
        choices=("onecpu", "split"),
        default="onecpu",
        help="scenario 3: everything on the proxy CPU (default) or the throughput pinning",
    )
    ap.add_argument("--only", default="", help=f"comma list of scenarios: {','.join(SCENARIOS)}")
    ap.add_argument(
        "--contenders",
        default=",".join(ORDER + PLAIN_ONLY),
        help="comma list of " + ",".join(ORDER + PLAIN_ONLY),
    )
    ap.add_argument("--https-client", choices=("python", "hey"), default="python")
    ap.add_argument("--x402-bin", default=str(ROOT / ".venv" / "bin" / "x402-proxy"))
    ap.add_argument(
        "--x402-config-extra",
        default=os.environ.get("X402_BENCH_CONFIG_EXTRA", ""),
        help="TOML file appended to the generated x402-proxy config",
    )
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument(
        "--noise-threshold",
        type=float,
        default=0.15,
        help="a round during which other processes used more CPU cores than this is noisy",
    )
    ap.add_argument("--noise-retries", type=int, default=2, help="repeat a noisy round up to N times")
    ap.add_argument(
        "--noise-budget",
        type=float,
        default=90.0,
        help="total seconds the run may spend repeating noisy rounds / waiting for quiet",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="max seconds to wait for the machine to calm down before a repeat / the start",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=int(os.environ.get("BENCH_NICE", "0")),
        help="nice value for every benchmark process (e.g. -10 on a shared machine; needs root). "
        "It slows down everything else running on the machine meanwhile.",
    )
    ap.add_argument("--paid-requests", type=int, default=60, help="paid requests in scenario 5")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 s, no warmup, 256 MiB stream")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every target PASSes")
    ap.add_argument("--json", default=str(WORK / "results.json"))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.warmup, a.stream_mib, a.stream_rounds = 1, 2, 0, 256, 1

    for tool in ("nginx", "wrk", "curl") + (("hey",) if a.https_client == "hey" else ()):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"missing {tool}: run `bash bench/setup.sh` (or `make apt-bench`)", file=sys.stderr)
            return 2

    WORK.mkdir(exist_ok=True)
    Procs.reap_stale()
    global NICE
    if a.nice:
        try:
            _renice_self(a.nice)
            NICE = a.nice
        except OSError as e:
            log(f"cannot set nice {a.nice} ({e}); running at default priority")
            a.nice = 0
    loadgen, proxy_cpus = parse_cpus(a.loadgen_cpus), parse_cpus(a.proxy_cpus)
    if loadgen:
        os.sched_setaffinity(0, loadgen)  # the orchestrator stays off the proxy's core
    origin_cpus = loadgen if a.origin_cpus == "loadgen" else parse_cpus(a.origin_cpus)
    ctx = Ctx(a, Procs(), loadgen, proxy_cpus, origin_cpus)
    ctx.noise = NoiseMonitor(ctx.procs)
    only = [s for s in a.only.split(",") if s] or list(SCENARIOS)
    wanted = [c for c in a.contenders.split(",") if c]
    t_start = time.monotonic()

    def _term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _term)

    meta: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {
            "cpu": _cpu_model(),
            "ncpu": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "config": {k: v for k, v in vars(a).items()},
        "pinning": {
            "loadgen_and_origin": sorted(loadgen) if loadgen else None,
            "proxies": sorted(proxy_cpus) if proxy_cpus else None,
            "origin": sorted(origin_cpus) if origin_cpus else None,
        },
    }
    res: dict[str, Any] = {}
    interrupted = False
    try:
        f = ctx.noise.wait_quiet(a.noise_threshold, 0 if NICE < 0 else a.quiet_wait)
        meta["foreign_cores_at_start"] = f
        log("starting origin (nginx)")
        start_origin(ctx)
        ctx.contenders["direct"] = Contender("direct", "direct (no proxy)", ca_file=ctx.origin_ca)
        starters: dict[str, Callable[[Ctx], Contender]] = {
            "x402": start_x402,
            "x402default": lambda ctx: start_x402(ctx, "x402default", default_config=True),
            "tinyproxy": start_tinyproxy,
            "mitmproxy": start_mitm,
        }
        for key, fn in starters.items():
            if key in wanted:
                log(f"starting {key}")
                c = fn(ctx)
                ctx.contenders[key] = c
                log(
                    f"{key}: {c.unavailable or 'up'}"
                    + (f"; HTTPS: {c.https_unavailable or 'intercepting'}" if key != "tinyproxy" else "")
                )
        meta["versions"] = {
            "nginx": version_of(["nginx", "-v"]),
            "tinyproxy": ctx.contenders.get("tinyproxy", Contender("", "")).version,
            "mitmproxy": ctx.contenders.get("mitmproxy", Contender("", "")).version,
            "x402-proxy": pkg_version("x402-proxy"),
            "aiohttp": pkg_version("aiohttp"),
            "uvloop": pkg_version("uvloop"),
            "wrk": dpkg_version("wrk"),
            "hey": dpkg_version("hey"),
            "curl": version_of(["curl", "--version"]),
            "openssl": version_of(["openssl", "version"]),
            "x402-proxy-git": git_describe(),
        }
        meta["contenders"] = {
            k: {
                "port": c.port,
                "unavailable": c.unavailable,
                "https_unavailable": c.https_unavailable,
                "probe": c.probe,
            }
            for k, c in ctx.contenders.items()
        }
        for name in only:
            if name not in SCENARIOS:
                raise SystemExit(f"unknown scenario {name}")
            log(f"scenario {name}")
            res[name] = SCENARIOS[name](ctx)
            # a contender that died mid-run must not be reported as fine
            for c in ctx.contenders.values():
                if c.proc is not None and c.proc.poll() is not None and not c.unavailable:
                    c.unavailable = f"died during {name} (exit {c.proc.returncode})"
                    log(f"{c.key}: {c.unavailable}")
    except KeyboardInterrupt as e:
        interrupted = True
        log(f"interrupted ({e}); tearing down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abort the teardown
        t0 = time.monotonic()
        ctx.procs.stop_all()
        log(f"all benchmark processes stopped ({time.monotonic() - t0:.1f}s)")
    targets = evaluate_targets(res)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report = render(res, targets)
    commit = meta.get("versions", {}).get("x402-proxy-git", "?")
    print(
        f"\nx402-proxy benchmark  {meta['started']}  (checkout {commit}, {meta['elapsed_s']} s,"
        f" rounds={a.rounds} x {a.duration}s after {a.warmup}s warmup, median)"
        f"\npinning: load generator on CPU {a.loadgen_cpus},"
        f" origin on CPU {a.loadgen_cpus if a.origin_cpus == 'loadgen' else a.origin_cpus},"
        f" proxy under test on CPU {a.proxy_cpus}"
    )
    print(report)
    out = {"meta": meta, "scenarios": res, "targets": targets, "interrupted": interrupted}
    Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {a.json}")
    if interrupted:
        return 130
    if a.strict and any(t["status"] != "PASS" for t in targets):
        return 1
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
