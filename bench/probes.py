"""One-request probes: a plain GET (direct or through a proxy) and the HTTPS interception probe."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

from bench.context import Ctx
from bench.paths import HERE
from tests.support.processes import LOOP


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
