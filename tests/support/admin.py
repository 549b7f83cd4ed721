"""A proxy subprocess with its admin API, and small loopback servers for admin tests."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import requests
from aiohttp import web

from tests.stack import Stack
from tests.support.paying_proxy import stack_config
from tests.support.proxy_process import ProxyProcess

ADMIN_RE = re.compile(r"admin API on (http://\S+)")
TOKEN_FILE_RE = re.compile(r"admin token file: (\S+)")


class AdminProxy(ProxyProcess):
    """`x402-proxy run` that also records the admin API address and token printed at startup."""

    admin_url = ""
    token = ""
    startup_lines: list[str]

    def start(
        self, listen: str = "127.0.0.1:0", timeout: float = 20, extra: tuple[str, ...] = ()
    ) -> AdminProxy:
        super().start(listen, timeout, extra)
        # The admin address is printed before the proxy's "listening on" line.
        for line in self.startup_lines:
            if match := ADMIN_RE.search(line):
                self.admin_url = match.group(1)
        self.token = self._token()
        return self

    def _token(self) -> str:
        if "X402_PROXY_ADMIN_TOKEN" in self.env:
            return self.env["X402_PROXY_ADMIN_TOKEN"]
        for line in self.startup_lines:
            if match := TOKEN_FILE_RE.search(line):
                return Path(match.group(1)).read_text().strip()
        return ""

    @property
    def admin_address(self) -> str:
        return self.admin_url.removeprefix("http://")

    def http(self) -> requests.Session:
        """A client that sends the token and never uses *_proxy settings."""
        session = requests.Session()
        session.trust_env = False
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        with self.http() as client:
            kwargs.setdefault("timeout", 90)
            return client.request(method, f"{self.admin_url}{path}", **kwargs)

    def admin_cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.cli(*args, "--admin", self.admin_address, check=check)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedApp:
    """An aiohttp app served from a thread with its own loop, on 127.0.0.1 (a fresh port)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test server did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def setup() -> None:
            self._runner = web.AppRunner(self._app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        self._loop.run_until_complete(setup())
        ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if not self._loop.is_running():
            return

        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def front_app(backend: str, deletes: list[tuple[str, dict[str, str]]]) -> web.Application:
    """A reverse proxy in front of `backend`: `/s<status>/<path>` forwards GET/POST to `<backend>/<path>`
    and answers DELETE with <status> (recording it), so a session's scope can sit on this origin."""
    import aiohttp

    async def handle(request: web.Request) -> web.StreamResponse:
        prefix, _, rest = request.path.lstrip("/").partition("/")
        if request.method == "DELETE":
            deletes.append((request.path, dict(request.headers)))
            return web.Response(status=int(prefix[1:]), text="deleted\n")
        target = f"{backend}/{rest}" + (f"?{request.query_string}" if request.query_string else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with (
            aiohttp.ClientSession() as client,
            client.request(request.method, target, headers=headers, data=body or None) as upstream,
        ):
            payload = await upstream.read()
            out = web.Response(status=upstream.status, body=payload)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP:
                    out.headers.add(name, value)
            return out

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def start_paying_admin(stack: Stack, home: Path) -> AdminProxy:
    """A proxy with its admin API, paying from the stack's funded wallet, with room for a few payments."""
    config = stack_config(stack, policy='daily_budget = "5"\nper_host_daily_budget = "5"')
    return AdminProxy(home, config, {"X402_PROXY_PRIVATE_KEY": stack.payer_key}).start()
