"""GET each URL with one Python HTTP client, configured by nothing but the environment.

    python py_fetch.py requests|httpx|aiohttp URL [URL ...]

Run in a fresh process whose environment is the output of `x402-proxy env`, so each library reads the
proxy and CA bundle variables the way it does for a user (aiohttp, for one, builds its default TLS
context at import time). One client object serves all URLs (keep-alive, one tunnel where the library
reuses it). Prints a JSON list of {"status", "headers", "body"}, one per URL.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


def with_requests(urls: list[str]) -> list[dict[str, Any]]:
    import requests

    with requests.Session() as session:  # trust_env is on by default
        answers = [session.get(url, timeout=60) for url in urls]
    return [{"status": r.status_code, "headers": dict(r.headers), "body": r.text} for r in answers]


def with_httpx(urls: list[str]) -> list[dict[str, Any]]:
    import httpx

    with httpx.Client(trust_env=True, timeout=60) as client:
        answers = [client.get(url) for url in urls]
    return [{"status": r.status_code, "headers": dict(r.headers), "body": r.text} for r in answers]


async def with_aiohttp(urls: list[str]) -> list[dict[str, Any]]:
    import aiohttp

    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(trust_env=True) as session:
        for url in urls:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as r:
                out.append({"status": r.status, "headers": dict(r.headers), "body": await r.text()})
    return out


def main() -> None:
    client, urls = sys.argv[1], sys.argv[2:]
    if client == "requests":
        answers = with_requests(urls)
    elif client == "httpx":
        answers = with_httpx(urls)
    elif client == "aiohttp":
        answers = asyncio.run(with_aiohttp(urls))
    else:
        raise SystemExit(f"unknown client {client!r}")
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
