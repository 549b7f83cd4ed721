"""pytest fixture for the local x402 stack.

Register it once for the whole test session, e.g. in `tests/conftest.py`:

    pytest_plugins = ["stack.fixtures"]   # or import x402_stack from this module

The stack is started at most once per pytest session even if this module is registered or imported
from several places (the instance is cached on the pytest config, not in this module, so importing
it under two module names does not start two stacks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from . import Stack, start_stack
from ._proc import STACK_DIR, ManagedProcess, StackStartupError, free_port, http_ready, wait_all

if TYPE_CHECKING:
    from .channels import ChannelStack

_CONFIG_ATTR = "_x402_local_stack"


@pytest.fixture(scope="session")
def x402_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """Session-wide local x402 stack: anvil + TestUSDC + facilitator + py/express_v2/express_v1 servers."""
    config = request.config
    stack: Stack | None = getattr(config, _CONFIG_ATTR, None)
    if stack is None:
        stack = start_stack(tmp_path_factory.mktemp("x402-stack"))
        setattr(config, _CONFIG_ATTR, stack)
        config.add_cleanup(stack.stop)
    return stack


_CHANNELS_ATTR = "_x402_local_channel_stack"


@pytest.fixture(scope="session")
def x402_channel_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ChannelStack:
    """Session-wide batch-settlement stack on its own anvil: our channel contracts at the SDK's
    addresses, the SDK's channel facilitator and a channel resource server (tests/stack/channels.py)."""
    config = request.config
    stack: ChannelStack | None = getattr(config, _CHANNELS_ATTR, None)
    if stack is None:
        from .channels import start_channel_stack  # only sessions that use channels load it

        stack = start_channel_stack(tmp_path_factory.mktemp("x402-channels"))
        setattr(config, _CHANNELS_ATTR, stack)
        config.add_cleanup(stack.stop)
    return stack


# -- x402 over MCP (issue 16): paid MCP servers whose price is in the tool result, not an HTTP 402 ---------

MCP1_PYTHON = STACK_DIR / ".venv-mcp1" / "bin" / "python"
# Loopback, but not in the NO_PROXY list `x402-proxy env` prints: clients reach it through a proxy.
MCP_HOST = "127.0.0.2"
MCP_SERVER_KINDS = ("x402", "sse")


@dataclass
class McpServer:
    """A paid MCP server of the stack. `kind` "x402": the reference SDK's `x402.mcp` wrapper on FastMCP
    (tests/stack/server_mcp_x402.py, tools `add` free and `weather` paid); "sse": the wire-level server
    (server_mcp_sse.py, tools `echo` free and `forecast` paid, --mode faults)."""

    kind: str
    url: str  # origin, e.g. http://127.0.0.2:PORT
    price: int
    proc: ManagedProcess = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    @property
    def free_tool(self) -> tuple[str, dict[str, Any]]:
        return ("add", {"a": 2, "b": 3}) if self.kind == "x402" else ("echo", {"text": "hi"})

    @property
    def paid_tool(self) -> tuple[str, dict[str, Any]]:
        return ("weather", {"city": "Oslo"}) if self.kind == "x402" else ("forecast", {"city": "Oslo"})

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.url}/__stats", timeout=10, trust_env=False, verify=False
        ).json()
        return data

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> McpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mcp_server(
    stack: Stack,
    kind: str,
    *,
    host: str = MCP_HOST,
    price: int | None = None,
    mode: str = "normal",
    framing: str = "sse",
    events: int = 3,
    event_interval: float = 0.05,
    ssl_certfile: str | Path | None = None,
    ssl_keyfile: str | Path | None = None,
    timeout: float = 60.0,
) -> McpServer:
    """Start one paid MCP server on the stack's chain, token and facilitator and wait until it serves.

    `mode`, `events` and `event_interval` apply to kind "sse" only; `framing="json"` makes either kind
    answer POSTs as application/json instead of SSE. Stop it with `.stop()` (or use it as a context
    manager); the session fixtures below stop theirs at the end of the run."""
    if kind not in MCP_SERVER_KINDS:
        raise ValueError(f"unknown MCP server kind {kind!r}")
    if kind == "x402" and not MCP1_PYTHON.exists():
        raise StackStartupError(f"{MCP1_PYTHON} is missing; run `make mcp1-venv` (mcp<2 for x402.mcp)")
    price = stack.price if price is None else price
    port = free_port(host)
    script = "server_mcp_x402.py" if kind == "x402" else "server_mcp_sse.py"
    python = str(MCP1_PYTHON) if kind == "x402" else sys.executable
    argv = [
        python,
        str(STACK_DIR / script),
        "--host",
        host,
        "--port",
        str(port),
        "--facilitator",
        stack.facilitator_url,
        "--asset",
        stack.token,
        "--pay-to",
        stack.pay_to,
        "--price",
        str(price),
    ]
    if kind == "sse":
        argv += [
            "--mode",
            mode,
            "--framing",
            framing,
            "--events",
            str(events),
            "--event-interval",
            str(event_interval),
        ]
        if ssl_certfile is not None:
            argv += ["--ssl-certfile", str(ssl_certfile), "--ssl-keyfile", str(ssl_keyfile or ssl_certfile)]
    elif framing == "json":
        argv.append("--json-response")
    if kind == "x402" and ssl_certfile is not None:
        raise ValueError("server_mcp_x402.py serves plain HTTP only")
    name = f"mcp_{kind}_{mode}-{port}"
    proc = ManagedProcess(name, argv, stack.workdir / f"{name}.log")
    url = f"{'https' if ssl_certfile else 'http'}://{host}:{port}"
    server = McpServer(kind, url, price, proc, {"mode": mode, "framing": framing, "host": host})
    try:
        wait_all([(proc, http_ready(f"{url}/free"), "serving /free")], timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def mcp_x402_server(x402_stack: Stack) -> Iterator[McpServer]:
    """The reference SDK's paid MCP server (x402.mcp, mcp 1.x venv), SSE answers, on 127.0.0.2."""
    with start_mcp_server(x402_stack, "x402") as server:
        yield server


@pytest.fixture(scope="session")
def mcp_sse_server(x402_stack: Stack) -> Iterator[McpServer]:
    """The wire-level paid MCP server (mode normal, SSE answers with 3 notifications first), on 127.0.0.2."""
    with start_mcp_server(x402_stack, "sse") as server:
        yield server


@pytest.fixture(scope="session")
def mcp_server_factory(x402_stack: Stack) -> Iterator[Callable[..., McpServer]]:
    """`factory(kind, **options)` starts another MCP server (e.g. `("sse", mode="hang")`); all are stopped
    at the end of the session."""
    started: list[McpServer] = []

    def factory(kind: str, **options: Any) -> McpServer:
        server = start_mcp_server(x402_stack, kind, **options)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
