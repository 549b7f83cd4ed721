"""A stand-in agent for the sidecar example. It knows nothing about x402 or the proxy's CA.

It fetches AGENT_URL with urllib, which routes through HTTPS_PROXY / HTTP_PROXY (the proxy's
credentials are in that URL) and trusts SSL_CERT_FILE (the bundle the sidecar exported to the
shared volume). Then it asks the sidecar's admin API what the last 24 hours cost. Standard library
only, so it runs in a bare python:3.11-slim image. Prints one JSON line; exits 1 unless AGENT_URL
answered 2xx.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


def fetch(url: str) -> dict[str, Any]:
    try:
        response = urllib.request.urlopen(url, timeout=90)  # noqa: S310 - the URL is the operator's
    except urllib.error.HTTPError as refused:  # a 402 the proxy did not pay is still an answer
        response = refused
    with response:
        body = response.read()
        return {
            "url": url,
            "status": response.status,
            "bytes": len(body),
            # Set by the proxy when it paid (the ledger id), reused a session, or refused to pay.
            "payment": response.headers.get("X-402-Proxy-Payment"),
            "session": response.headers.get("X-402-Proxy-Session"),
            "proxy_error": response.headers.get("X-402-Proxy-Error"),
        }


def budget(admin_url: str, token: str) -> Any:
    # NO_PROXY names the sidecar: the proxy refuses requests aimed at its own admin API.
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{admin_url}/budget", headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.load(response)


def main() -> int:
    result = fetch(os.environ["AGENT_URL"])
    admin_url = os.environ.get("X402_PROXY_ADMIN_URL")
    if admin_url:
        result["budget"] = budget(admin_url, os.environ["X402_PROXY_ADMIN_TOKEN"])
    print(json.dumps(result), flush=True)
    return 0 if 200 <= result["status"] < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
