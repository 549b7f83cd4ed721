"""`/mcp` without the MCP SDK at startup.

The SDK (with starlette, anyio and its pydantic models) takes 0.5-1.3 s and 20+ MiB to import, and most
runs never call `/mcp`. This endpoint has the interface of `mcp_server.McpEndpoint`; the first call
imports `mcp_server` in a worker thread (the event loop keeps serving meanwhile), starts the real
endpoint and hands every call to it from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from proxy.admin.service import ControlPlane


def package_version() -> str:
    try:
        return metadata.version("x402-proxy")
    except metadata.PackageNotFoundError:
        return "0"


class McpEndpoint:
    def __init__(self, control: ControlPlane, max_body: int) -> None:
        self._control = control
        self._max_body = max_body
        self._endpoint: Any = None  # mcp_server.McpEndpoint once loaded
        self._loading: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        """Nothing to start until `/mcp` is first called."""

    async def _load(self) -> Any:
        module = await asyncio.to_thread(importlib.import_module, "proxy.admin.mcp_server")
        endpoint = module.McpEndpoint(self._control, self._max_body)
        await endpoint.start()
        self._endpoint = endpoint
        return endpoint

    async def handle(self, request: web.Request, body: bytes) -> web.StreamResponse:
        endpoint = self._endpoint
        if endpoint is None:
            if self._loading is None:
                self._loading = asyncio.create_task(self._load(), name="mcp-load")
            endpoint = await asyncio.shield(self._loading)
        response: web.StreamResponse = await endpoint.handle(request, body)
        return response

    async def stop(self) -> None:
        loading = self._loading
        if loading is not None and not loading.done():
            with contextlib.suppress(Exception):
                await loading
        if self._endpoint is not None:
            await self._endpoint.stop()
