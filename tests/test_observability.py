"""Logs of a real proxy process: JSON lines or plain, request/session/payment ids, one access line per
proxied request, and no secret anywhere."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import proxy_config
from tests.stack import Stack
from tests.support import raw
from tests.support.certs import UpstreamCA
from tests.support.paying_proxy import proxies, stack_config
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream

PAYMENT = "X-402-Proxy-Payment"
SESSION = "X-402-Proxy-Session"


def start(stack: Stack, home: Path, fmt: str) -> ProxyProcess:
    env = {"X402_PROXY_PRIVATE_KEY": stack.payer_key, "X402_PROXY_LOG__FORMAT": fmt}
    return ProxyProcess(home, stack_config(stack), env).start()


def json_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = [line for line in proxy.log_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line must be JSON


def test_json_logs_carry_ids_and_one_access_line_per_request(
    x402_stack: Stack, siwx_server: Any, tmp_path: Path
) -> None:
    proxy = start(x402_stack, tmp_path / "home", "json")
    try:
        via = proxies(proxy)
        free = requests.get(f"{siwx_server.url}/free", proxies=via, timeout=30)
        paid = requests.get(f"{siwx_server.url}/paid/a", proxies=via, timeout=60)
        again = requests.get(f"{siwx_server.url}/paid/a", proxies=via, timeout=60)
        assert (free.status_code, paid.status_code, again.status_code) == (200, 200, 200), paid.text[:300]
        payment_id, session_id = paid.headers[PAYMENT], paid.headers[SESSION]
        assert PAYMENT not in again.headers and again.headers[SESSION] == session_id
    finally:
        assert proxy.stop() == 0

    records = json_lines(proxy)
    access = [r for r in records if r["logger"] == "x402_proxy.access"]
    assert len(access) == 3, access
    by_request = {r["request_id"] for r in access}
    assert len(by_request) == 3, "each request has its own id"
    first, second, third = access
    host = siwx_server.url.split("//", 1)[1].rsplit(":", 1)[0]
    assert first | {"ms": 0} == first | {"ms": 0, "method": "GET", "host": host, "status": 200}
    assert (first["paid"], first["session"]) == (False, False)
    assert "session_id" not in first and "payment_id" not in first
    assert (second["paid"], second["status"], str(second["payment_id"])) == (True, 200, payment_id)
    assert second["session_id"] == session_id
    assert (third["paid"], third["session"], third["session_id"]) == (False, True, session_id)
    assert all(isinstance(r["ms"], (int, float)) and r["ms"] >= 0 for r in access)

    # The payer's own lines ("paying #N ...") belong to the paid request and name its payment.
    paying = [r for r in records if r["msg"].startswith(f"paying #{payment_id}")]
    assert len(paying) == 1
    assert paying[0]["request_id"] == second["request_id"]
    assert str(paying[0]["payment_id"]) == payment_id

    text = proxy.log_text()
    assert x402_stack.payer_key.removeprefix("0x").lower() not in text.lower()
    token = (proxy.home / "admin-token").read_text().strip()
    assert token not in text


def test_plain_logs_are_key_value_and_access_log_can_be_off(
    x402_stack: Stack, upstream: Any, tmp_path: Path
) -> None:
    proxy = start(x402_stack, tmp_path / "plain", "plain")
    try:
        via = proxies(proxy)
        url = f"{upstream.http_url}/echo"
        assert requests.get(url, proxies=via, timeout=30).status_code == 200
    finally:
        proxy.stop()
    lines = [line for line in proxy.log_text().splitlines() if " x402_proxy.access " in line]
    assert len(lines) == 1
    assert " method=GET host=127.0.0.2 status=200 " in lines[0]
    assert " paid=False session=False" in lines[0]

    quiet = ProxyProcess(tmp_path / "quiet", "", {"X402_PROXY_LOG__ACCESS_LOG": "false"}).start()
    try:
        assert requests.get(url, proxies=proxies(quiet), timeout=30).status_code == 200
    finally:
        quiet.stop()
    assert "x402_proxy.access" not in quiet.log_text()


# -- what the access line measures --------------------------------------------------------------------------


def access_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return [r for r in json_lines(proxy) if r["logger"] == "x402_proxy.access"]


def raw_get(proxy: ProxyProcess, url: str, headers: str = "") -> bytes:
    """One request on its own connection (`Connection: close`): everything the proxy wrote, to its EOF."""
    authority = url.split("/")[2]
    with raw.connect(proxy.address, timeout=30) as sock:
        sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: {authority}\r\n{headers}Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n", body  # no trailers, nothing after the last chunk
            return out
        out, body = out + body[:size], body[size + 2 :]


def test_access_line_counts_bytes_written_and_times_the_whole_answer(
    upstream: Upstream, upstream_ca: UpstreamCA, tmp_path: Path
) -> None:
    size = 300_000  # over the lean server's whole-body limit (64 KiB): relayed as it streams
    proxy = ProxyProcess(
        tmp_path / "home", proxy_config(upstream_ca), {"X402_PROXY_LOG__FORMAT": "json"}
    ).start()
    try:
        chunked = raw_get(proxy, f"{upstream.http_url}/bytes?size={size}&chunked=1")
        sized = raw_get(proxy, f"{upstream.http_url}/bytes?size={size}")
        small = raw_get(proxy, f"{upstream.http_url}/echo/small")
        # Three events 0.3 s apart: the answer's head leaves at once, its end ~0.9 s later.
        events = raw_get(proxy, f"{upstream.http_url}/sse?count=3&delay=0.3")
    finally:
        proxy.stop()

    head, _, body = chunked.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head and len(dechunk(body)) == size
    head, _, body = sized.partition(b"\r\n\r\n")
    assert f"\r\nContent-Length: {size}\r\n".encode() in head and len(body) == size
    assert events.count(b"data: event") == 3

    lines = access_lines(proxy)
    assert [(r["method"], r["status"]) for r in lines] == [("GET", 200)] * 4, lines
    # `bytes` is what reached the client: head, body and chunk framing, to the byte.
    assert [r["bytes"] for r in lines] == [len(chunked), len(sized), len(small), len(events)], lines
    # `ms` runs to the answer's last byte, not to its head.
    assert lines[3]["ms"] >= 800, lines[3]
    assert all(0 <= r["ms"] < 800 for r in lines[:3]), lines


def test_refused_requests_get_an_access_line(
    upstream_ca: UpstreamCA, upstream: Upstream, tmp_path: Path
) -> None:
    """Refusals before the stages (proxy auth, a bad target, the proxy itself as target) are logged too."""
    config = proxy_config(upstream_ca, '[proxy.auth]\nusername = "agent"\npassword = "pw-Wq9z"\n')
    proxy = ProxyProcess(tmp_path / "home", config, {"X402_PROXY_LOG__FORMAT": "json"}).start()
    authorized = "Proxy-Authorization: Basic YWdlbnQ6cHctV3E5eg==\r\n"  # agent:pw-Wq9z
    try:
        unauthenticated = raw_get(proxy, f"{upstream.http_url}/echo/no-credentials")
        with raw.connect(proxy.address) as sock:
            sock.sendall(
                f"GET /relative HTTP/1.1\r\nHost: x\r\n{authorized}Connection: close\r\n\r\n".encode()
            )
            relative = raw.read_response(sock)
        own = raw_get(proxy, f"http://{proxy.address}/", authorized)
        fine = raw_get(proxy, f"{upstream.http_url}/echo/authorized", authorized)
    finally:
        proxy.stop()
    assert [raw.status_of(r) for r in (unauthenticated, relative, own, fine)] == [407, 400, 400, 200]

    lines = access_lines(proxy)
    got = [(r["status"], r.get("error"), r["bytes"]) for r in lines]
    assert got == [
        (407, "proxy_auth_required", len(unauthenticated)),
        (400, "bad_request_target", len(relative)),
        (400, "self_target", len(own)),
        (200, None, len(fine)),
    ], lines
    host = upstream.http_url.split("//")[1].rsplit(":", 1)[0]
    assert [r["host"] for r in lines] == [host, "-", proxy.address.rsplit(":", 1)[0], host]
    assert all(r["method"] == "GET" and r["paid"] is False and r["session"] is False for r in lines)
    assert all(isinstance(r["ms"], (int, float)) and r["ms"] >= 0 for r in lines)


def test_cut_answers_and_upgrade_handovers_get_one_line_each(
    upstream: Upstream, upstream_ca: UpstreamCA, tmp_path: Path
) -> None:
    """A client that leaves mid-stream or before any answer still gets its line; so does a request with an
    `Upgrade: h2c` offer (ignored: served as HTTP/1.1 on the same path as every request)."""
    proxy = ProxyProcess(
        tmp_path / "home", proxy_config(upstream_ca), {"X402_PROXY_LOG__FORMAT": "json"}
    ).start()
    authority = upstream.http_url.split("/")[2]
    try:
        with raw.connect(proxy.address) as sock:  # leaves after the first of 5 events (0.5 s apart)
            sock.sendall(
                f"GET {upstream.http_url}/sse?count=5&delay=0.5 HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            )
            got = b""
            while b"data: event 0" not in got:
                got += sock.recv(65536)
        time.sleep(0.2)  # the proxy sees the close and logs before the next request (lines stay in order)
        with raw.connect(proxy.address) as sock:  # leaves while the upstream is still thinking
            sock.sendall(
                f"GET {upstream.http_url}/slow?seconds=2 HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
            )
            time.sleep(0.3)
        time.sleep(0.2)
        # Pipelined: the first request, then one whose upgrade offer is ignored (it used to be handed to
        # aiohttp's server from inside the first request's task).
        plain = f"GET {upstream.http_url}/echo/lean HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        upgrade = (
            f"GET {upstream.http_url}/echo/handed-over HTTP/1.1\r\nHost: {authority}\r\n"
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        with raw.connect(proxy.address) as sock:
            sock.sendall((plain + upgrade).encode())
            answers = b""
            while not (b"/echo/handed-over" in answers and answers.endswith(b"}")):
                answers += sock.recv(65536)
        assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2, answers
        first = answers[: answers.index(b"HTTP/1.1", 1)]
    finally:
        proxy.stop()

    lines = access_lines(proxy)
    assert [(r["status"], r.get("error")) for r in lines] == [
        (200, "client_gone"),
        (499, "client_gone"),
        (200, None),
        (200, None),
    ], lines
    cut, gone, lean, handed = lines
    assert len(got) <= cut["bytes"] < len(got) + 200, (len(got), cut)  # not the 4 events it never sent
    assert gone["bytes"] == 0 and 250 <= gone["ms"] < 2000, gone
    assert lean["bytes"] == len(first)
    assert handed["request_id"] != lean["request_id"]
    # Counted like every answer: head and body (aiohttp's path used to log only the upstream's length).
    assert handed["bytes"] == len(answers[len(first) :])
    assert len(answers[len(first) :].partition(b"\r\n\r\n")[2]) < handed["bytes"]


# -- the access line built off the hot path is the line the formatters write --------------------------------


def _formatted(fmt: str, done: Any, now: float, monkeypatch: Any) -> tuple[str, str]:
    """(the fast line, what the logging formatter makes of the same record) at a fixed clock."""
    import logging

    from proxy.observability import access_log
    from proxy.observability.logs import FIELDS_ATTR, ContextFilter, JsonFormatter, PlainFormatter

    monkeypatch.setattr(access_log.time, "perf_counter", lambda: done.started + 0.0123456)
    monkeypatch.setattr(access_log.time, "time", lambda: now)
    monkeypatch.setattr(access_log.time, "time_ns", lambda: int(now * 1e9))
    build = access_log.plain_line if fmt == "plain" else access_log.json_line
    fast = build(done, now)
    message, fields = access_log.fields_of(
        done.method, done.host, done.status, done.bytes_sent, 12.3456, done.error, done.outcome
    )
    record = logging.getLogger("x402_proxy.access").makeRecord(
        "x402_proxy.access", logging.INFO, __file__, 1, "%s", (message,), None, extra={FIELDS_ATTR: fields}
    )
    ContextFilter().filter(record)
    formatter = PlainFormatter() if fmt == "plain" else JsonFormatter()
    return fast, formatter.format(record) + "\n"


def test_access_line_text_is_what_the_formatters_write(monkeypatch: Any) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.engine.exchange import Outcome
    from proxy.engine.request_handler import CompletedRequest
    from proxy.observability.context import PAYMENT_ID, REQUEST_ID, SESSION_ID

    class Answer:
        status, reason, content_length = 200, "OK", 0
        headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    paid = Outcome(Answer(), session_id="s-1", payment_id=7)  # type: ignore[arg-type]
    refused = Outcome(Answer(), error_code="budget_exhausted")  # type: ignore[arg-type]
    cases = [
        (CompletedRequest("GET", "Example.COM.", 200, 478, 100.0, None), {}),
        (
            CompletedRequest("GET", "127.0.0.2", 200, 478, 100.0, None),
            {"request": "ab12-2"},
        ),  # the usual line
        (CompletedRequest("HEAD", "127.0.0.2", 200, None, 100.0, None), {"request": "ab12-5"}),
        (CompletedRequest("POST", "127.0.0.2", 200, 99, 100.0, paid), {"request": "ab12-3"}),
        (
            CompletedRequest("GET", "127.0.0.2", 402, 512, 100.0, refused),
            {"request": "ab12-4", "session": "s-1"},
        ),
        (CompletedRequest("GET", "", 407, 308, 100.0, None, "proxy_auth_required"), {}),
        (CompletedRequest("GET", "127.0.0.2", 499, 0, 100.0, None, "client_gone"), {"payment": 7}),
    ]
    for now in (1_796_000_000.0004, 1_796_000_000.9996, 1_796_003_599.5):
        for done, ids in cases:
            tokens = [
                REQUEST_ID.set(ids.get("request")),  # type: ignore[arg-type]
                SESSION_ID.set(ids.get("session")),  # type: ignore[arg-type]
                PAYMENT_ID.set(ids.get("payment")),  # type: ignore[arg-type]
            ]
            try:
                for fmt in ("plain", "json"):
                    fast, formatted = _formatted(fmt, done, now, monkeypatch)
                    assert fast == formatted, (fmt, done)
            finally:
                REQUEST_ID.reset(tokens[0])
                SESSION_ID.reset(tokens[1])
                PAYMENT_ID.reset(tokens[2])


def test_ms_text_is_how_python_writes_the_rounded_number() -> None:
    """The access line writes `ms` from two table lookups: the text must be `str(round(ms, 3))`."""
    import random

    from proxy.observability.access_log import ms_text, whole_micros

    draws = random.Random(402)
    samples = [0, 1, 10, 100, 999, 1000, 1500, 12_346, 10**9 + 1] + [
        draws.randrange(10**12) for _ in range(5000)
    ]
    for micros in samples:
        assert ms_text(micros) == str(micros / 1000), micros
    for millis in (0.0, 0.0004, 0.0005, 1.5, 12.3456, 999.9996, draws.uniform(0, 1e6)):
        assert whole_micros(millis) / 1000 == round(millis, 3) or abs(millis * 1000 % 1 - 0.5) < 1e-6, millis
