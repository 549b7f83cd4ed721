"""The load generator: a few sequential workers per kind of traffic, each pausing between requests.

Kinds:
  pass_http      plain HTTP to the local upstream (every 25th request asks it for its own 503)
  pass_https     HTTPS to the local upstream, intercepted by the proxy (every 10th: a 64 KiB body)
  session_siwx   one in-scope URL on a Sign-In-With-X server: paid once, then session hits
  session_token  the same on a server that honours the proxy's signed session token
  payment        a new exact URL on a server with no reusable credential each time: a real payment
  admin          list sessions, payments, budget, metrics; now and then start (pays) and end a session

Every response is classified here: a 5xx carrying `X-402-Proxy-Error` came from the proxy (a failure);
a 5xx without it is the upstream's own (only expected from the deliberate 503s). Anything the kind does
not expect is kept, with its body's start, for the report.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.engine.exchange import ERROR_HEADER, PAYMENT_HEADER, SESSION_HEADER
from tests.soak.rig import Rig

TIMEOUT = aiohttp.ClientTimeout(total=60)
KEEP_PROBLEMS = 50  # enough examples to diagnose; a broken run must not grow the report without bound


@dataclass(frozen=True)
class LoadShape:
    """Workers per kind and the pause each takes after a request: moderate load for a 2-core box."""

    workers: dict[str, int] = field(
        default_factory=lambda: {
            "pass_http": 2,
            "pass_https": 2,
            "session_siwx": 1,
            "session_token": 1,
            "payment": 1,
            "admin": 1,
        }
    )
    pause: dict[str, float] = field(
        default_factory=lambda: {
            "pass_http": 0.05,
            "pass_https": 0.05,
            "session_siwx": 0.1,
            "session_token": 0.1,
            "payment": 1.0,
            "admin": 0.5,
        }
    )
    admin_session_every: int = 20  # admin calls between two paid start/end cycles


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # "kind status"
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    session_hits: Counter[str] = field(default_factory=Counter)  # served by a session, nothing paid
    payments: dict[int, str] = field(default_factory=dict)  # ledger id -> kind that saw it
    upstream_5xx: int = 0
    proxy_5xx: int = 0
    transport_errors: int = 0
    unexpected: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, **details: Any) -> None:
        if len(self.problems) < KEEP_PROBLEMS:
            self.problems.append(details)

    def paid_by_kind(self) -> Counter[str]:
        return Counter(self.payments.values())


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]  # case-insensitive, as HTTP header names are
    body: bytes


Expectation = Callable[[Answer], bool]


class Load:
    def __init__(self, rig: Rig, shape: LoadShape, started: float) -> None:
        self.rig = rig
        self.shape = shape
        self.started = started
        self.tally = Tally()
        self.stop = asyncio.Event()
        self._counter = itertools.count()
        self._proxy_ssl = ssl.create_default_context(cafile=str(rig.proxy_ca))
        self._admin_headers = {"Authorization": f"Bearer {rig.proxy.token}"}

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, trust_env=False, timeout=TIMEOUT) as client:
            kinds: dict[str, Callable[[aiohttp.ClientSession, int], Awaitable[None]]] = {
                "pass_http": self._pass_http,
                "pass_https": self._pass_https,
                "session_siwx": self._session_siwx,
                "session_token": self._session_token,
                "payment": self._payment,
                "admin": self._admin,
            }
            workers = [
                self._loop(kind, kinds[kind], client)
                for kind, count in self.shape.workers.items()
                for _ in range(count)
            ]
            await asyncio.gather(*workers)

    async def _loop(
        self,
        kind: str,
        step: Callable[[aiohttp.ClientSession, int], Awaitable[None]],
        client: aiohttp.ClientSession,
    ) -> None:
        pause = self.shape.pause[kind]
        for n in itertools.count():
            if self.stop.is_set():
                return
            await step(client, n)
            try:
                await asyncio.wait_for(self.stop.wait(), pause)
            except TimeoutError:
                pass

    # -- one request, classified ------------------------------------------------------------------

    async def _send(
        self,
        client: aiohttp.ClientSession,
        kind: str,
        method: str,
        url: str,
        expect: Expectation,
        *,
        via_proxy: bool = True,
        **kwargs: Any,
    ) -> Answer | None:
        if via_proxy:
            kwargs["proxy"] = self.rig.proxy.url
            if url.startswith("https:"):
                kwargs["ssl"] = self._proxy_ssl
        else:
            kwargs["headers"] = {**self._admin_headers, **kwargs.get("headers", {})}
        t0 = time.monotonic()
        self.tally.requests[kind] += 1
        try:
            async with client.request(method, url, **kwargs) as response:
                answer = Answer(response.status, CIMultiDict(response.headers), await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.tally.transport_errors += 1
            self.tally.problem(kind=kind, url=url, t=round(t0 - self.started, 1), error=repr(exc))
            return None
        self.tally.latencies[kind].append(time.monotonic() - t0)
        self.tally.statuses[f"{kind} {answer.status}"] += 1
        self._classify(kind, url, answer, expect, t0)
        return answer

    def _classify(self, kind: str, url: str, answer: Answer, expect: Expectation, t0: float) -> None:
        payment = answer.headers.get(PAYMENT_HEADER)
        if payment is not None:
            self.tally.payments[int(payment)] = kind
        elif SESSION_HEADER in answer.headers and answer.status < 400:
            self.tally.session_hits[kind] += 1
        proxy_error = answer.headers.get(ERROR_HEADER)
        if answer.status >= 500:
            if proxy_error is not None:
                self.tally.proxy_5xx += 1
            else:
                self.tally.upstream_5xx += 1
        if not expect(answer):
            self.tally.unexpected += 1
            self.tally.problem(
                kind=kind,
                url=url,
                t=round(t0 - self.started, 1),
                status=answer.status,
                proxy_error=proxy_error,
                body=answer.body[:300].decode("utf-8", "replace"),
            )

    # -- the kinds ---------------------------------------------------------------------------------

    async def _pass_http(self, client: aiohttp.ClientSession, n: int) -> None:
        base = self.rig.upstream.http_url
        if n % 25 == 24:  # the upstream's own 5xx: passed on, and not the proxy's fault
            await self._send(client, "pass_http", "GET", f"{base}/status/503", _upstream_503)
        else:
            await self._send(client, "pass_http", "GET", f"{base}/echo/soak?n={n}", _ok)

    async def _pass_https(self, client: aiohttp.ClientSession, n: int) -> None:
        base = self.rig.upstream.https_url
        url = f"{base}/bytes?size=65536" if n % 10 == 9 else f"{base}/echo/soak?n={n}"
        await self._send(client, "pass_https", "GET", url, _ok)

    async def _session_siwx(self, client: aiohttp.ClientSession, n: int) -> None:
        await self._send(client, "session_siwx", "GET", f"{self.rig.siwx.url}/paid/a", _ok)

    async def _session_token(self, client: aiohttp.ClientSession, n: int) -> None:
        await self._send(client, "session_token", "GET", f"{self.rig.token.url}/paid/a", _ok)

    async def _payment(self, client: aiohttp.ClientSession, n: int) -> None:
        url = f"{self.rig.paid.url}/paid/a?soak={next(self._counter)}"
        await self._send(client, "payment", "GET", url, _paid)

    async def _admin(self, client: aiohttp.ClientSession, n: int) -> None:
        admin = self.rig.proxy.admin_url
        if n % self.shape.admin_session_every == self.shape.admin_session_every - 1:
            await self._admin_session(client)
            return
        path = ("/sessions?state=active", "/payments?limit=50", "/budget", "/metrics")[n % 4]
        await self._send(client, "admin", "GET", f"{admin}{path}", _ok, via_proxy=False)

    async def _admin_session(self, client: aiohttp.ClientSession) -> None:
        """Start a session on a new exact URL (one payment), then end it."""
        admin = self.rig.proxy.admin_url
        body = {
            "endpoint": f"{self.rig.paid.url}/paid/b?admin={next(self._counter)}",
            "scope": "exact",
            "ttl_seconds": 60,
            "max_payment": "0.01",
            "label": "soak",
        }
        started = await self._send(
            client, "admin", "POST", f"{admin}/sessions", _started, via_proxy=False, json=body
        )
        if started is None or started.status != 201:
            return
        document = json.loads(started.body)
        self.tally.payments[int(document["payment"]["id"])] = "admin"
        session_id = document["session"]["id"]
        await self._send(client, "admin", "DELETE", f"{admin}/sessions/{session_id}", _ok, via_proxy=False)


def _ok(answer: Answer) -> bool:
    return answer.status == 200


def _upstream_503(answer: Answer) -> bool:
    return answer.status == 503 and ERROR_HEADER not in answer.headers


def _paid(answer: Answer) -> bool:
    return answer.status == 200 and PAYMENT_HEADER in answer.headers


def _started(answer: Answer) -> bool:
    return answer.status == 201
