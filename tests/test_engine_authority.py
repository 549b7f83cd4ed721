"""`parse_authority` (CONNECT targets, config values): ASCII digits only in the port, 1..65535."""

from __future__ import annotations

import pytest
import requests

from proxy.engine.http_semantics import Authority, TargetError, parse_authority
from tests.support import raw
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:443", Authority("example.com", 443)),
        ("Example.COM.:8080", Authority("example.com", 8080)),
        ("[::1]:1", Authority("::1", 1)),
        ("127.0.0.1:65535", Authority("127.0.0.1", 65535)),
        ("h:00080", Authority("h", 80)),
    ],
)
def test_ascii_ports_in_range_are_accepted(text: str, expected: Authority) -> None:
    assert parse_authority(text) == expected


@pytest.mark.parametrize(
    "port",
    [
        "\u0668\u0660",  # ARABIC-INDIC DIGIT EIGHT, ZERO: str.isdigit() and int() both accept (-> 80)
        "\uff18\uff10",  # FULLWIDTH DIGIT EIGHT, ZERO (-> 80)
        "\u09ea\u09ea\u09e9",  # BENGALI 443
        "8\u0660",  # mixed
        "\u00b9",  # SUPERSCRIPT ONE: isdigit() is true but int() raises
        "\u00b2\u00b2",
        "0",
        "65536",
        "99999999999999999999",
        "+80",
        "8_0",
        "-1",
    ],
)
def test_non_ascii_digits_and_out_of_range_ports_are_refused(port: str) -> None:
    for text in (f"example.com:{port}", f"[::1]:{port}"):
        with pytest.raises(TargetError, match="invalid port"):
            parse_authority(text)


@pytest.mark.parametrize(
    "port",
    [
        b"\xb9",  # SUPERSCRIPT ONE in latin-1, as which the front door reads the request line
        b"\xb2\xb2",
        "\u0668\u0660".encode(),  # UTF-8 bytes, seen as latin-1 text
        "\uff18\uff10".encode(),
    ],
)
def test_connect_with_a_non_ascii_port_is_a_clear_400(
    proxy: ProxyProcess, upstream: Upstream, port: bytes
) -> None:
    answer = raw.exchange(proxy.address, b"CONNECT 127.0.0.2:" + port + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.status_of(answer) == 400, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nX-402-Proxy-Error: bad_connect\r\n" in head, head
    assert body.startswith(b"x402-proxy: malformed CONNECT request: invalid port"), body
    # the proxy is unharmed
    response = requests.get(f"{upstream.http_url}/echo/after", proxies={"http": proxy.url}, timeout=10)
    assert response.status_code == 200
