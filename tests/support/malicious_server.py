"""A hostile origin for the security matrix: several loopback listeners that each speak HTTP *and* HTTPS
on one port, record every request exactly as it arrived, sell sessions for real money on the local
stack, and serve malicious 402 challenges.

Every listener ("front") sniffs the first byte of a connection: a TLS ClientHello (0x16) is spliced to
an internal HTTPS site, anything else to an internal HTTP site. So `http://127.0.0.2:P` and
`https://127.0.0.2:P` are the same host and port with different schemes, which is what a scheme
downgrade needs. Whatever the proxy sends, a test can ask what *arrived* (`hits`).

Routes (any front, any scheme):
- a protected path (`protect(scheme, port, path)`): 402 with a real x402 V2 challenge naming the stack's
  token and payTo; a paid retry is settled through the real facilitator and answered 200 with a
  receipt, a session cookie and an `X-X402-Lease` header; later requests with either get 200.
- `/hostile/<name>`: a 402 built by `HOSTILE_CHALLENGES[name]` from an honest requirement; a payment
  sent anyway is settled (the worst case: the attacker takes the money) and answered 200.
- `/switch`: an honest 402; the paid retry is settled, then answered with a *fresh* 402 naming
  another payTo (`switch_pay_to`).
- `.../go?to=URL`: 302 to URL.
- `.../siwx-challenge`: a 402 whose Sign-In-With-X challenge (bound to this origin) lists other
  origins' URLs among its `resources`; a `SIGN-IN-WITH-X` answering its nonce gets 200.
- `.../renew`: a 402 (an honest requirement) whose Sign-In-With-X offer is bound to this origin but
  names a chain nobody can sign for; a payment is settled and answered 200: a session renewal.
- anything else: 200 with what was received.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import errno
import json
import random
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import ClientSession, web

from tests.stack import Stack

LEASE_HEADER = "X-X402-Lease"
COOKIE_NAME = "sid"
# Every header through which a session credential or a payment could travel.
CREDENTIAL_HEADERS = frozenset(
    {
        "cookie",
        LEASE_HEADER.lower(),
        "x-session-token",
        "x-session-wallet",
        "payment-session",
        "sign-in-with-x",
        "payment-signature",
        "x-payment",
        "authorization",
    }
)

Requirement = dict[str, Any]
HOSTILE_CHALLENGES: dict[str, Callable[[Requirement], list[Requirement]]] = {
    "huge-amount": lambda r: [{**r, "amount": "1" + "0" * 30}],
    "amount-over-uint256": lambda r: [{**r, "amount": str(2**256)}],
    "amount-exponent": lambda r: [{**r, "amount": "1e3"}],
    "negative-amount": lambda r: [{**r, "amount": "-1000"}],
    "fractional-amount": lambda r: [{**r, "amount": "1000.5"}],
    "zero-amount": lambda r: [{**r, "amount": "0"}],
    "timeout-ten-years": lambda r: [{**r, "maxTimeoutSeconds": 10 * 365 * 24 * 3600}],
    "timeout-negative": lambda r: [{**r, "maxTimeoutSeconds": -1}],
    "timeout-thirty-days": lambda r: [{**r, "maxTimeoutSeconds": 30 * 24 * 3600}],
    "unknown-network": lambda r: [{**r, "network": "eip155:999999"}],
    "mainnet-network": lambda r: [{**r, "network": "eip155:8453"}],
    "non-evm-network": lambda r: [{**r, "network": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"}],
    "ten-thousand-accepts": lambda r: [r] * 10_000,
}


@dataclass
class Hit:
    """One request as the hostile origin received it."""

    origin: str  # scheme://host:port of the front it arrived at
    method: str
    raw_path: str
    headers: list[tuple[str, str]]

    def credential_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers if k.lower() in CREDENTIAL_HEADERS}


@dataclass
class Sale:
    """A session this origin sold: the secrets it issued, and the payments it settled."""

    cookie: str
    lease: str


@dataclass
class HostileOrigin:
    stack: Stack
    tls: ssl.SSLContext
    switch_pay_to: str
    hits: list[Hit] = field(default_factory=list)
    sales: list[Sale] = field(default_factory=list)
    settlements: list[dict[str, Any]] = field(default_factory=list)
    siwx_nonces: list[str] = field(default_factory=list)  # issued by /siwx-challenge
    fronts: dict[tuple[str, int], int] = field(default_factory=dict)  # (host, port) -> index
    _protected: set[tuple[str, int, str]] = field(default_factory=set)
    _internal: dict[int, str] = field(default_factory=dict)  # internal port -> origin label
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> HostileOrigin:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True, name="hostile-origin")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("hostile origin did not start")
        return self

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self._app(), access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        async def cleanup() -> None:
            for server in self._servers:
                server.close()
            # Splices of kept-alive proxy connections would otherwise outlive the loop.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def add_front(self, sock: socket.socket) -> None:
        """Serve HTTP and HTTPS on an already bound, listening socket."""
        asyncio.run_coroutine_threadsafe(self._add_front(sock), self._loop).result(10)

    async def _add_front(self, sock: socket.socket) -> None:
        assert self._runner is not None
        host, port = sock.getsockname()[:2]
        internal: dict[bool, int] = {}
        for secure in (False, True):
            inner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            inner.bind(("127.0.0.1", 0))
            inner.listen(128)
            inner.setblocking(False)
            await web.SockSite(self._runner, inner, ssl_context=self.tls if secure else None).start()
            inner_port = inner.getsockname()[1]
            internal[secure] = inner_port
            self._internal[inner_port] = f"{'https' if secure else 'http'}://{host}:{port}"

        async def sniff(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                first = await reader.read(1)
                if not first:
                    return
                inner_reader, inner_writer = await asyncio.open_connection(
                    "127.0.0.1", internal[first == b"\x16"]
                )
                inner_writer.write(first)
                await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
            except OSError:
                pass
            finally:
                writer.close()

        sock.setblocking(False)
        self._servers.append(await asyncio.start_server(sniff, sock=sock))
        self.fronts[(host, port)] = len(self.fronts)

    def protect(self, scheme: str, port: int, path: str) -> None:
        """Sell access to exactly this path on (scheme, any front host on `port`)."""
        self._protected.add((scheme, port, path))

    # -- what arrived -------------------------------------------------------------------------------

    def hits_since(self, index: int) -> list[Hit]:
        return list(self.hits[index:])

    def issued_secrets(self) -> list[str]:
        return [value for sale in self.sales for value in (sale.cookie, sale.lease)]

    # -- the app ------------------------------------------------------------------------------------

    def requirement(self, pay_to: str | None = None) -> Requirement:
        stack = self.stack
        return {
            "scheme": "exact",
            "network": stack.network_v2,
            "asset": stack.token,
            "amount": str(stack.price),
            "payTo": pay_to or stack.pay_to,
            "maxTimeoutSeconds": 60,
            "extra": {"name": stack.token_name, "version": stack.token_version},
        }

    def _challenge(
        self, url: str, accepts: list[Requirement], extensions: dict[str, Any] | None = None
    ) -> str:
        document: dict[str, Any] = {
            "x402Version": 2,
            "error": "Payment required",
            "resource": {"url": url, "description": "hostile origin", "mimeType": "application/json"},
            "accepts": accepts,
        }
        if extensions:
            document["extensions"] = extensions
        return _b64(document)

    async def _settle(self, signature: str) -> tuple[dict[str, Any], str]:
        payload = json.loads(base64.b64decode(signature))
        body = {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": payload["accepted"]}
        async with (
            ClientSession() as session,
            session.post(f"{self.stack.facilitator_url}/settle", json=body) as answer,
        ):
            result: dict[str, Any] = await answer.json()
        self.settlements.append({"payload": payload, "result": result})
        return result, _b64(result)

    def _app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            origin = self._internal.get(sockname[1] if sockname else 0, "unknown")
            await request.read()
            self.hits.append(Hit(origin, request.method, request.raw_path, list(request.headers.items())))
            scheme, _, authority = origin.partition("://")
            url = f"{origin}{request.raw_path}"
            signature = request.headers.get("PAYMENT-SIGNATURE")
            path = request.raw_path.split("?")[0]
            if path.startswith("/hostile/"):
                return await self._hostile(path.removeprefix("/hostile/"), url, signature)
            if path == "/switch":
                return await self._switch(url, signature)
            if path.endswith("/go") and "to" in request.query:
                raise web.HTTPFound(request.query["to"])
            if path.endswith("/siwx-challenge"):
                return self._siwx_challenge(request, url, authority)
            if path.endswith("/renew"):
                return await self._renew(url, authority, signature)
            port = int(authority.rsplit(":", 1)[1])
            if (scheme, port, path) in self._protected:
                return await self._sell(request, url, authority, signature)
            return web.json_response({"origin": origin, "path": request.raw_path})

        app = web.Application(client_max_size=1024 * 1024)
        # [\s\S]: a decoded %0A must still reach the handler (".*" stops at a newline).
        app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
        return app

    async def _sell(
        self, request: web.Request, url: str, authority: str, signature: str | None
    ) -> web.Response:
        lease = request.headers.get(LEASE_HEADER)
        if any(request.cookies.get(COOKIE_NAME) == sale.cookie or lease == sale.lease for sale in self.sales):
            return web.json_response({"access": "session"})
        if signature:
            result, receipt = await self._settle(signature)
            if result.get("success"):
                sale = Sale(cookie=secrets.token_urlsafe(16), lease=secrets.token_urlsafe(16))
                self.sales.append(sale)
                response = web.json_response({"access": "paid"}, headers={"PAYMENT-RESPONSE": receipt})
                response.headers[LEASE_HEADER] = sale.lease
                response.headers["Set-Cookie"] = f"{COOKIE_NAME}={sale.cookie}; Path=/; HttpOnly"
                return response
        origin = url.split("/", 3)
        siwx = {
            "info": {
                "domain": authority,
                "uri": f"{origin[0]}//{authority}",
                "version": "1",
                "nonce": secrets.token_hex(8),
                "issuedAt": "2025-01-01T00:00:00Z",
            },
            "supportedChains": [{"chainId": self.stack.network_v2, "type": "eip191"}],
        }
        header = self._challenge(url, [self.requirement()], {"sign-in-with-x": siwx})
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    def _siwx_info(self, url: str, authority: str, **extra: Any) -> dict[str, Any]:
        return {
            "domain": authority,
            "uri": f"{url.split('/', 3)[0]}//{authority}",
            "version": "1",
            "nonce": secrets.token_hex(8),
            "issuedAt": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            **extra,
        }

    def _siwx_challenge(self, request: web.Request, url: str, authority: str) -> web.Response:
        answered = request.headers.get("SIGN-IN-WITH-X")
        if answered and json.loads(base64.b64decode(answered)).get("nonce") in self.siwx_nonces:
            return web.json_response({"access": "siwx"})
        scheme = url.split(":", 1)[0]
        resources = [
            url,
            f"{scheme}://127.0.0.3:{authority.rsplit(':', 1)[1]}/steal",
            "https://evil.example/x",
        ]
        info = self._siwx_info(url, authority, resources=resources)
        self.siwx_nonces.append(info["nonce"])
        siwx = {"info": info, "supportedChains": [{"chainId": self.stack.network_v2, "type": "eip191"}]}
        header = self._challenge(url, [self.requirement()], {"sign-in-with-x": siwx})
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    async def _renew(self, url: str, authority: str, signature: str | None) -> web.Response:
        if signature:
            _, receipt = await self._settle(signature)
            return web.json_response({"access": "renewed"}, headers={"PAYMENT-RESPONSE": receipt})
        siwx = {
            "info": self._siwx_info(url, authority),
            "supportedChains": [{"chainId": "eip155:not-a-chain", "type": "eip191"}],
        }
        header = self._challenge(url, [self.requirement()], {"sign-in-with-x": siwx})
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})

    async def _hostile(self, name: str, url: str, signature: str | None) -> web.Response:
        if signature:
            _, receipt = await self._settle(signature)
            return web.json_response({"access": "paid"}, headers={"PAYMENT-RESPONSE": receipt})
        accepts = HOSTILE_CHALLENGES[name](copy.deepcopy(self.requirement()))
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": self._challenge(url, accepts)})

    async def _switch(self, url: str, signature: str | None) -> web.Response:
        pay_to = None
        if signature:
            await self._settle(signature)  # take the money, then ask again for someone else
            pay_to = self.switch_pay_to
        header = self._challenge(url, [self.requirement(pay_to)])
        return web.json_response({}, status=402, headers={"PAYMENT-REQUIRED": header})


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass


def _b64(document: Any) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def bind_twin_ports(
    hosts: list[str], twin_host: str, tries: int = 200
) -> tuple[int, int, list[socket.socket]]:
    """Listening sockets on port P for every host in `hosts`, and on port P*10+d for `twin_host`.

    P's decimal text is a prefix of the twin's ("…:4123" vs "…:41237"): a proxy that compared origins
    as strings would take one for the other.
    """
    for _ in range(tries):
        port = random.randint(2000, 6553)
        twin = port * 10 + random.randint(0, min(9, 65535 - port * 10))
        bound: list[socket.socket] = []
        try:
            for host, p in [*((h, port) for h in hosts), (twin_host, twin)]:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                bound.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, p))
                sock.listen(128)
            return port, twin, bound
        except OSError as exc:
            for sock in bound:
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError("no free pair of twin ports")
