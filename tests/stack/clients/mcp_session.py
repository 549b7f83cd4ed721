"""One MCP session with the official Python SDK client over Streamable HTTP, configured by the environment only.

    python mcp_session.py URL [TICKS INTERVAL]

Initialises, lists the tools, calls `add(2, 3)`, then `ticks(TICKS, INTERVAL)` timing each progress
notification as it arrives, and closes the session (the SDK sends DELETE with its Mcp-Session-Id).
The SDK's default HTTP client is used as is: it reads HTTPS_PROXY and SSL_CERT_FILE from the environment.
Prints {"tools", "add", "ticks", "progress": [{"progress", "message", "arrived_at"}], "warnings"}, where
"warnings" are the SDK transport's log records at WARNING or above (e.g. "Session termination failed").
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


def text_of(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def session(url: str, ticks: int, interval: float) -> dict[str, Any]:
    arrivals: list[dict[str, Any]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append({"progress": progress, "total": total, "message": message, "arrived_at": time.time()})

    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        tools = sorted(tool.name for tool in (await client.list_tools()).tools)
        added = await client.call_tool("add", {"a": 2, "b": 3})
        ticked = await client.call_tool(
            "ticks", {"count": ticks, "interval": interval}, progress_callback=on_progress
        )
    return {"tools": tools, "add": text_of(added), "ticks": text_of(ticked), "progress": arrivals}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    url = sys.argv[1]
    ticks = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3
    warnings = Collect()
    logging.getLogger("mcp").addHandler(warnings)
    out = asyncio.run(session(url, ticks, interval))
    json.dump({**out, "warnings": warnings.messages}, sys.stdout)


if __name__ == "__main__":
    main()
