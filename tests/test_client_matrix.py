"""Real-client matrix: each client, configured only by `x402-proxy env`, buys a paid HTTPS resource.

The resources are the stack's reference servers (PyPI x402 middleware, Sign-In-With-X on) serving
HTTPS on 127.0.0.2 with a certificate from the tests' upstream CA, which the proxy trusts through
`upstream.extra_ca_bundle`. Every client runs in a fresh process whose environment is exactly what
`x402-proxy env` printed (plus PATH), and a fresh proxy per case starts with no session, so each case
must show: 200 and the right body, exactly one ledger row (settled, one price), the payee richer by
exactly one price on chain, and later requests riding the session (SIWX) without paying again.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.stack import PyServer, Stack
from tests.support.certs import IssuedCert, UpstreamCA
from tests.support.paying_proxy import ledger, start_paying_proxy
from tests.support.proxy_process import ProxyProcess

CLIENTS_DIR = Path(__file__).parent / "stack" / "clients"
PAID_PATH = "/paid/a"
HOST = "127.0.0.2"  # loopback, but not in the NO_PROXY list `x402-proxy env` prints
EVENT_COUNT = 5
EVENT_INTERVAL = 0.3  # seconds between the server's events


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: str

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Answer:
        return cls(raw["status"], {k.lower(): v for k, v in raw["headers"].items()}, raw["body"])


@dataclass
class Paying:
    proxy: ProxyProcess
    env: dict[str, str]  # the client processes' whole environment


def run_client(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv[:3]} failed:\n{result.stderr[-3000:]}"
    return result.stdout


# -- the clients: each GETs the URLs in order and returns what it received ------------------------------


def curl(env: dict[str, str], urls: list[str]) -> list[Answer]:
    answers = []
    with tempfile.TemporaryDirectory() as tmp:
        head, body = Path(tmp) / "head", Path(tmp) / "body"
        for url in urls:  # one process per URL, like a shell script calling curl twice
            status = run_client(
                [
                    "curl",
                    "-sS",
                    "--suppress-connect-headers",
                    "-D",
                    str(head),
                    "-o",
                    str(body),
                    "-w",
                    "%{http_code}",
                    url,
                ],
                env,
            )
            lines = head.read_text().splitlines()[1:]  # the status line first
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
            answers.append(Answer(int(status), headers, body.read_text()))
    return answers


def python_client(name: str) -> Callable[[dict[str, str], list[str]], list[Answer]]:
    def fetch(env: dict[str, str], urls: list[str]) -> list[Answer]:
        out = run_client([sys.executable, str(CLIENTS_DIR / "py_fetch.py"), name, *urls], env)
        return [Answer.of(raw) for raw in json.loads(out)]

    return fetch


def node_fetch(env: dict[str, str], urls: list[str]) -> list[Answer]:
    return [
        Answer.of(json.loads(run_client(["node", str(CLIENTS_DIR / "node_fetch.mjs"), url], env)))
        for url in urls
    ]


CLIENTS: dict[str, Callable[[dict[str, str], list[str]], list[Answer]]] = {
    "curl": curl,
    "requests": python_client("requests"),
    "httpx": python_client("httpx"),
    "aiohttp": python_client("aiohttp"),
    "node-fetch-undici": node_fetch,
}


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_cert(upstream_ca: UpstreamCA, tmp_path_factory: pytest.TempPathFactory) -> IssuedCert:
    return upstream_ca.issue(tmp_path_factory.mktemp("matrix-tls"), [HOST])


@pytest.fixture(scope="module")
def paid_https(x402_stack: Stack, server_cert: IssuedCert) -> Iterator[PyServer]:
    server = x402_stack.start_py_server(
        siwx=True, host=HOST, ssl_certfile=server_cert.cert_path, ssl_keyfile=server_cert.key_path
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def paid_mcp(x402_stack: Stack, server_cert: IssuedCert) -> Iterator[PyServer]:
    server = x402_stack.start_py_server(
        script="server_mcp.py",
        siwx=True,
        host=HOST,
        ssl_certfile=server_cert.cert_path,
        ssl_keyfile=server_cert.key_path,
    )
    yield server
    server.stop()


@pytest.fixture
def paying(x402_stack: Stack, upstream_ca: UpstreamCA, tmp_path: Path) -> Iterator[Paying]:
    """A fresh paying proxy (no session yet) and the environment its `env` command prints."""
    proxy = start_paying_proxy(x402_stack, tmp_path / "home", upstream_ca=upstream_ca.cert_path)
    yield Paying(proxy, {"PATH": os.environ["PATH"], **proxy.env_exports()})
    proxy.stop()


class Money:
    """On-chain balances of payer and payee around one case."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.pay_to = stack.balance_of(stack.pay_to)
        self.payer = stack.balance_of(stack.payer_address)

    def assert_one_price_moved(self) -> None:
        stack = self.stack
        assert stack.balance_of(stack.pay_to) - self.pay_to == stack.price
        assert self.payer - stack.balance_of(stack.payer_address) == stack.price


def assert_one_settled_payment(proxy: ProxyProcess, stack: Stack, url: str) -> dict[str, Any]:
    rows = ledger(proxy)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["state"] == "settled" and int(row["amount"]) == stack.price
    assert row["url"] == url and row["tx_hash"].startswith("0x")
    return row


# -- the matrix -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_pays_once_per_session(
    client: str, paying: Paying, paid_https: PyServer, x402_stack: Stack
) -> None:
    url = f"{paid_https.url}{PAID_PATH}"
    money = Money(x402_stack)

    first, second = CLIENTS[client](paying.env, [url, url])

    assert first.status == 200, first.body[:500] + paying.proxy.log_text()[-2000:]
    assert second.status == 200, second.body[:500]
    paid, reused = json.loads(first.body), json.loads(second.body)
    assert paid["ok"] and paid["path"] == PAID_PATH and paid["resource"] == "a"
    assert paid["paid"] and paid["payer"].lower() == x402_stack.payer_address.lower()
    # The second request rode the session: the server let it in by Sign-In-With-X, no payment attached.
    assert reused["path"] == PAID_PATH and not reused["paid"]
    assert "sign-in-with-x" in reused["headers"] and "payment-signature" not in reused["headers"]
    row = assert_one_settled_payment(paying.proxy, x402_stack, url)
    assert first.headers.get("x-402-proxy-payment") == str(row["id"]), first.headers
    assert "x-402-proxy-payment" not in second.headers
    assert first.headers["x-402-proxy-session"] == second.headers["x-402-proxy-session"]
    money.assert_one_price_moved()


# -- streams after payment ---------------------------------------------------------------------------------


def assert_spread_out(arrivals: list[float], sent: list[float], interval: float) -> None:
    """Each event reached the client soon after the server sent it, not all together at the end."""
    latencies = [a - s for a, s in zip(arrivals, sent, strict=True)]
    assert max(latencies) < interval * 0.8, latencies  # a buffered stream would be (count-1)*interval late
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > interval * 0.5, gaps
    assert arrivals[-1] - arrivals[0] > (len(arrivals) - 1) * interval * 0.8, arrivals


def test_paid_sse_events_arrive_one_by_one(paying: Paying, paid_https: PyServer, x402_stack: Stack) -> None:
    url = f"{paid_https.url}/paid/events?count={EVENT_COUNT}&interval={EVENT_INTERVAL}"
    money = Money(x402_stack)
    reader = [sys.executable, str(CLIENTS_DIR / "sse_events.py"), url]

    # The paying request: the reference middleware holds the stream until it has settled, then sends it whole.
    paid = json.loads(run_client(reader, paying.env))
    # Then the session: the proxy attaches SIWX and relays each event as the server writes it.
    streamed = json.loads(run_client(reader, paying.env))

    for answer in (paid, streamed):
        assert answer["status"] == 200
        assert answer["headers"]["content-type"].startswith("text/event-stream")
        assert [e["id"] for e in answer["events"]] == [str(i) for i in range(EVENT_COUNT)]
        assert {e["event"] for e in answer["events"]} == {"tick"}
    data = [json.loads(e["data"]) for e in streamed["events"]]
    assert [d["paid"] for d in data] == [False] * EVENT_COUNT  # let in by SIWX, not by a second payment
    assert json.loads(paid["events"][0]["data"])["paid"] is True
    assert_spread_out(
        [e["arrived_at"] for e in streamed["events"]], [d["sent_at"] for d in data], EVENT_INTERVAL
    )
    assert_one_settled_payment(paying.proxy, x402_stack, url)
    money.assert_one_price_moved()


def test_mcp_sdk_client_one_payment_per_mcp_session(
    paying: Paying, paid_mcp: PyServer, x402_stack: Stack
) -> None:
    url = f"{paid_mcp.url}/mcp"
    money = Money(x402_stack)

    out = json.loads(
        run_client(
            [sys.executable, str(CLIENTS_DIR / "mcp_session.py"), url, str(EVENT_COUNT), str(EVENT_INTERVAL)],
            paying.env,
        )
    )

    assert out["warnings"] == []  # e.g. no "Session termination failed" from the SDK
    assert out["tools"] == ["add", "ticks"]
    assert out["add"] == "5" and out["ticks"] == f"{EVENT_COUNT} ticks"
    progress = out["progress"]
    assert [p["progress"] for p in progress] == list(range(1, EVENT_COUNT + 1))
    sent = [json.loads(p["message"])["sent_at"] for p in progress]
    assert_spread_out([p["arrived_at"] for p in progress], sent, EVENT_INTERVAL)
    assert_one_settled_payment(paying.proxy, x402_stack, url)
    money.assert_one_price_moved()

    seen = paid_mcp.stats()
    exchanges = seen["exchanges"]
    assert len(seen["settlements"]) == 1 and seen["settlements"][0]["success"]
    # The first POST (initialize) was answered 402, the proxy paid it, and the server issued the session id.
    assert [e["status"] for e in exchanges[:2]] == [402, 200] and exchanges[1]["paid"]
    session_id = exchanges[1]["issued_session_id"]
    assert session_id
    later = exchanges[2:]
    assert later and all(e["siwx"] and not e["paid"] for e in later), later  # one payment per MCP session
    assert all(e["session_id"] == session_id for e in later), later
    # Answers came as SSE: POST replies and the standalone GET stream, both through the proxy's tunnel.
    assert any(e["method"] == "POST" and e["content_type"].startswith("text/event-stream") for e in later)
    assert any(e["method"] == "GET" and e["content_type"].startswith("text/event-stream") for e in later)
    # Closing the client sent DELETE with its Mcp-Session-Id; it passed the proxy and the server ended the session.
    deletes = [(e["session_id"], e["status"]) for e in later if e["method"] == "DELETE"]
    assert deletes == [(session_id, 200)], later
