#!/usr/bin/env python3
"""Small HTTP/1.1 load client for the benchmark (plain HTTP or CONNECT + TLS through a proxy).

Two sub-commands, stdlib only (uvloop is used when importable):

``probe``  one CONNECT + TLS handshake + GET, verifying the server chain against
           exactly one CA file.  Used to *prove* that a proxy intercepts: if the
           only trusted CA is the proxy's own CA and the handshake verifies, the
           leaf certificate was minted by the proxy, not by the origin.
           Prints one JSON object.

``load``   N concurrent keep-alive connections; each does CONNECT once (when a
           proxy is given and the URL is https), the TLS handshake once
           (verifying against --cafile when given), then sequential GETs until
           the deadline; with a proxy and an http URL it sends absolute-form
           requests instead.  Connection set-up happens before the clock starts,
           so the figure is steady-state keep-alive throughput.  Prints one JSON
           object with requests/s.  With uvloop one process does ~90k plain /
           ~30k TLS req/s against nginx on one core, far above any proxy here,
           so it is not the bottleneck (run.py reports per-CPU busy to show it).

Every address must be loopback: the benchmark never leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
import sys
import time
from urllib.parse import urlsplit


def _loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise SystemExit(f"refusing non-loopback address {host!r}")


def _split(url: str) -> tuple[str, str, int, str]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SystemExit(f"bad url {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    _loopback(u.hostname)
    return u.scheme, u.hostname, port, (u.path or "/") + (f"?{u.query}" if u.query else "")


def _ctx(cafile: str | None) -> ssl.SSLContext:
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
    else:  # load mode without a CA: behave like hey (no verification)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _read_head(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before end of head ({buf[:80]!r})")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v.strip())
    return -1


def _name(rdns: object) -> dict[str, str]:
    """A certificate name from `getpeercert()` (a tuple of RDNs of (key, value) pairs) as a dict."""
    out: dict[str, str] = {}
    for rdn in rdns if isinstance(rdns, tuple) else ():
        for key, value in rdn:
            out[str(key)] = str(value)
    return out


def probe(url: str, proxy: str | None, cafile: str, timeout: float) -> dict[str, object]:
    scheme, host, port, path = _split(url)
    out: dict[str, object] = {"url": url, "proxy": proxy, "cafile": cafile, "ok": False}
    try:
        if proxy:
            _, phost, pport, _ = _split(proxy)
            sock = socket.create_connection((phost, pport), timeout=timeout)
            sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head, rest = _read_head(sock)
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            out["connect_status"] = status
            if status.split()[1:2] != ["200"] or rest:
                out["error"] = f"CONNECT refused: {status}"
                sock.close()
                return out
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
        if scheme != "https":
            raise SystemExit("probe is for https urls")
        tls = _ctx(cafile).wrap_socket(sock, server_hostname=host)
        cert = tls.getpeercert() or {}
        out["leaf_issuer"] = _name(cert.get("issuer", ()))
        out["leaf_subject"] = _name(cert.get("subject", ()))
        out["tls_version"] = tls.version()
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head, rest = _read_head(tls)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        out["status"] = status
        n = _content_length(head)
        while n >= 0 and len(rest) < n:
            chunk = tls.recv(65536)
            if not chunk:
                break
            rest += chunk
        out["body_len"] = len(rest)
        out["ok"] = status.split()[1:2] == ["200"]
        tls.close()
    except (OSError, ssl.SSLError, ValueError, IndexError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


async def _connect(
    scheme: str, host: str, port: int, path: str, proxy: tuple[str, int] | None, ctx: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open one connection ready for requests; returns (reader, writer, request bytes)."""
    if proxy:
        reader, writer = await asyncio.open_connection(*proxy)
        if scheme == "https":
            writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ", 2)[1:2] != [b"200"]:
                writer.close()
                raise ConnectionError(f"CONNECT: {head[:60]!r}")
            await writer.start_tls(ctx, server_hostname=host)  # type: ignore[arg-type]
            target = path
        else:
            target = f"http://{host}:{port}{path}"
    else:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=ctx if scheme == "https" else None,
            server_hostname=host if scheme == "https" else None,
        )
        target = path
    return reader, writer, f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


_CONN_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ssl.SSLError,
    ConnectionError,
)


async def _worker(
    scheme: str,
    host: str,
    port: int,
    path: str,
    proxy: tuple[str, int] | None,
    ctx: ssl.SSLContext | None,
    deadline: list[float],
    stats: dict[str, int],
    start_evt: asyncio.Event,
    ready_evt: asyncio.Event,
    conns: int,
) -> None:
    """One connection's worth of sequential requests; reconnects (like wrk) if the peer closes."""
    conn = None
    try:
        conn = await _connect(scheme, host, port, path, proxy, ctx)
    except _CONN_ERRORS:
        stats["connect_errors"] += 1
    stats["ready"] += 1
    if stats["ready"] >= conns:
        ready_evt.set()
    await start_evt.wait()
    while time.monotonic() < deadline[0]:
        if conn is None:
            try:
                conn = await _connect(scheme, host, port, path, proxy, ctx)
                stats["reconnects"] += 1
            except _CONN_ERRORS:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.01)
                continue
        reader, writer, req = conn
        try:
            while time.monotonic() < deadline[0]:
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                n = _content_length(head)
                if n > 0:
                    await reader.readexactly(n)
                if head[9:12] == b"200":
                    stats["ok"] += 1
                else:
                    stats["non2xx"] += 1
        except _CONN_ERRORS:
            stats["read_errors"] += 1
            writer.close()
            conn = None
    if conn is not None:
        conn[1].close()


async def _load(
    url: str, proxy: str | None, cafile: str | None, conns: int, duration: float
) -> dict[str, object]:
    scheme, host, port, path = _split(url)
    p = None
    if proxy:
        _, phost, pport, _ = _split(proxy)
        p = (phost, pport)
    ctx = _ctx(cafile) if scheme == "https" else None
    stats = {"ok": 0, "non2xx": 0, "connect_errors": 0, "read_errors": 0, "reconnects": 0, "ready": 0}
    start_evt, ready_evt = asyncio.Event(), asyncio.Event()
    t_setup = time.monotonic()
    # Connections (CONNECT + handshake) are set up before the clock starts.
    deadline = [float("inf")]
    tasks = [
        asyncio.create_task(
            _worker(scheme, host, port, path, p, ctx, deadline, stats, start_evt, ready_evt, conns)
        )
        for _ in range(conns)
    ]
    # every worker bumps "ready" once its first connection attempt is over
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ready_evt.wait(), 10)
    t0 = time.monotonic()
    deadline[0] = t0 + duration
    start_evt.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    return {
        "url": url,
        "proxy": proxy,
        "connections": conns,
        "duration_s": elapsed,
        "setup_s": t0 - t_setup,
        "requests": stats["ok"],
        "rps": stats["ok"] / elapsed,
        **stats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("probe")
    pp.add_argument("url")
    pp.add_argument("--proxy")
    pp.add_argument("--cafile", required=True)
    pp.add_argument("--timeout", type=float, default=10.0)
    lp = sub.add_parser("load")
    lp.add_argument("url")
    lp.add_argument("--proxy")
    lp.add_argument("--cafile")
    lp.add_argument("-c", "--connections", type=int, default=50)
    lp.add_argument("-d", "--duration", type=float, default=5.0)
    a = ap.parse_args()
    if a.cmd == "probe":
        res = probe(a.url, a.proxy, a.cafile, a.timeout)
    else:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        res = asyncio.run(_load(a.url, a.proxy, a.cafile, a.connections, a.duration))
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
