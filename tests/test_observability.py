"""Logs of a real proxy process: JSON lines or plain, request/session/payment ids, one access line per
proxied request, and no secret anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from tests.stack import Stack
from tests.support.paying_proxy import proxies, stack_config
from tests.support.proxy_process import ProxyProcess

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
