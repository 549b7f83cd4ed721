"""Read a server-sent event stream with httpx (configured by the environment only) and time each event.

    python sse_events.py URL

Prints {"status", "headers", "events": [{"id", "data", "arrived_at"}]}: `arrived_at` is the wall-clock
time (time.time()) at which the event's blank-line terminator reached this process, so a test can set
it against the `sent_at` the server put in the event.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx


def main() -> None:
    url = sys.argv[1]
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with httpx.Client(trust_env=True, timeout=60) as client, client.stream("GET", url) as response:
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append({**current, "arrived_at": time.time()})
                    current = {}
                continue
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
        json.dump(
            {"status": response.status_code, "headers": dict(response.headers), "events": events}, sys.stdout
        )


if __name__ == "__main__":
    main()
