"""Requests aimed at the proxy's own listeners are refused by where the connection lands, not by name:
any name or spelling may resolve to this machine (a compose service name, 127.1, a decimal IPv4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from proxy.engine.http_semantics import is_own_listener
from tests.support.proxy_process import ProxyProcess


def test_is_own_listener_by_address() -> None:
    wildcard = [("0.0.0.0", 8403)]
    assert is_own_listener(("127.0.0.1", 8403), "127.0.0.1", wildcard)
    assert is_own_listener(("10.1.2.3", 8403), "10.1.2.3", wildcard)  # our own non-loopback address
    assert not is_own_listener(("10.1.2.4", 8403), "10.1.2.3", wildcard)  # another host, same port
    assert not is_own_listener(("127.0.0.1", 8404), "127.0.0.1", wildcard)
    assert is_own_listener(("::ffff:127.0.0.1", 9), "::ffff:127.0.0.1", [("127.0.0.1", 9)])
    assert not is_own_listener(("127.0.0.2", 9), "127.0.0.1", [("127.0.0.1", 9)])
    assert is_own_listener(("::1", 9), "::1", [("::", 9)])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = ProxyProcess(tmp_path_factory.mktemp("self") / "home", "").start()
    yield process
    process.stop()


@pytest.mark.parametrize("spelling", ["127.1", "2130706433", "[::ffff:127.0.0.1]"])
def test_admin_api_through_the_proxy_port_under_other_spellings(proxy: ProxyProcess, spelling: str) -> None:
    admin = next(line for line in proxy.startup_lines if line.startswith("admin API on "))
    port = admin.strip().rsplit(":", 1)[1]
    token = (Path(proxy.home) / "admin-token").read_text().strip()
    response = requests.get(
        f"http://{spelling}:{port}/budget",
        headers={"Authorization": f"Bearer {token}"},
        proxies={"http": proxy.url},
        timeout=30,
    )
    assert response.status_code == 400, response.text[:300]
    assert response.headers["X-402-Proxy-Error"] == "self_target"
    assert "spent" not in response.text
