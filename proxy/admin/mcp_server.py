"""MCP tools over Streamable HTTP at `/mcp` on the admin listener, with the official `mcp` SDK.

The SDK's low-level `Server` holds the four session tools (names and input schemas after the seed
tools); its `StreamableHTTPSessionManager` speaks the transport (stateful sessions, `Mcp-Session-Id`,
DELETE to terminate). The admin listener is aiohttp, so `/mcp` reaches the manager's ASGI entry point
through `asgi_bridge.call_asgi` after the listener's Host/Origin guard and bearer token check. The
manager's task group runs in a task of its own for the listener's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import mcp_types as types
from aiohttp import web
from mcp.server import Server, ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from proxy.admin import operations, schemas
from proxy.admin.asgi_bridge import call_asgi
from proxy.admin.problems import problem_body
from proxy.admin.service import ControlError, ControlPlane

log = logging.getLogger("x402_proxy.admin")

TEXT_BODY_LIMIT = 4000

TOOLS: list[types.Tool] = [
    types.Tool(
        name="x402_session_start",
        description=(
            "Establish an x402 session: make at most ONE payment (within the proxy's spending policy and "
            "max_payment) and keep the credentials the server grants for it (Sign-In-With-X, cookies, lease "
            "headers, a signed session token). Later calls inside the session's scope use x402_session_fetch "
            "(or simply go through the proxy) without paying again, for as long as the server honours the "
            "credential. Returns a session_id. A free endpoint returns payment_required: false and opens no "
            "session."
        ),
        input_schema=schemas.START_SESSION,
        annotations=types.ToolAnnotations(
            title="Start a paid session",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    ),
    types.Tool(
        name="x402_session_fetch",
        description=(
            "Request a URL inside an active session's scope with the session's credentials attached. "
            "Pays again only when allow_renew is true and the server no longer honours the session."
        ),
        input_schema=schemas.TOOL_FETCH,
        annotations=types.ToolAnnotations(
            title="Fetch within a session", read_only_hint=False, destructive_hint=False, open_world_hint=True
        ),
    ),
    types.Tool(
        name="x402_session_status",
        description=(
            "Show one session (state, scope, expiry, calls made, amount paid; never its secrets), or "
            "list the active sessions when session_id is omitted."
        ),
        input_schema=schemas.TOOL_STATUS,
        annotations=types.ToolAnnotations(title="Session status", read_only_hint=True, open_world_hint=False),
    ),
    types.Tool(
        name="x402_session_end",
        description=(
            "Explicitly close an x402 session before it expires naturally; its credentials are forgotten "
            "at once. After calling this, x402_session_fetch will return an error for the closed session. "
            "Useful for security hygiene or when you know a session is no longer needed. Ending twice is "
            "harmless."
        ),
        input_schema=schemas.TOOL_END,
        annotations=types.ToolAnnotations(
            title="End a session",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    ),
]


TOOLS += [
    types.Tool(
        name="x402_approval_list",
        description=(
            "List the payments waiting for a person's decision (their price is above the proxy's "
            "ask_above threshold), then recent decisions. Each waiting request is held until decided or "
            "until ask_timeout."
        ),
        input_schema=schemas.TOOL_APPROVAL_LIST,
        annotations=types.ToolAnnotations(
            title="Waiting approvals", read_only_hint=True, open_world_hint=False
        ),
    ),
    types.Tool(
        name="x402_approval_decide",
        description=(
            "Approve or deny one waiting payment by id. remember_for ('host' or 'scope') with hours approves "
            "later payments to that host, or for that need, without asking (policy and budgets still apply)."
        ),
        input_schema=schemas.TOOL_APPROVAL_DECIDE,
        annotations=types.ToolAnnotations(
            title="Decide an approval", read_only_hint=False, destructive_hint=False, open_world_hint=False
        ),
    ),
]


def package_version() -> str:
    try:
        return metadata.version("x402-proxy")
    except metadata.PackageNotFoundError:
        return "0"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _body_block(response: dict[str, Any]) -> str:
    body = str(response.get("body", ""))
    cut = len(body) > TEXT_BODY_LIMIT or bool(response.get("body_truncated"))
    return "```\n" + body[:TEXT_BODY_LIMIT] + ("\n... [truncated]" if cut else "") + "\n```"


def _session_lines(session: dict[str, Any]) -> list[str]:
    scope = session.get("scope") or {}
    lines = [
        f"  Session ID: {session['id']}",
        f"  State: {session['state']}",
        f"  Scope: {scope.get('kind')} {scope.get('url')}",
    ]
    if session.get("label"):
        lines.append(f"  Label: {session['label']}")
    lines += [
        f"  Expires: {_when(session.get('expires_at'))} (in {session.get('expires_in', 0)} s)",
        f"  Calls made: {session.get('call_count', 0)}",
        f"  Amount paid: {session.get('amount_paid')} (atomic units of {session.get('asset') or '-'}, "
        f"{session.get('decimals')} decimals)",
    ]
    return lines


def start_text(status: int, result: dict[str, Any]) -> str:
    response = result["response"]
    if status == 200:
        return (
            "No payment required\n\n"
            f"  Status: {response['status']}\n\n"
            "The endpoint answered without asking for payment, so no session was opened; "
            "request it directly through the proxy.\n\n" + _body_block(response)
        )
    session = result["session"]
    payment = result.get("payment") or {}
    lines = ["x402 session established", "", *_session_lines(session), "", "Payment"]
    lines += [
        f"  Amount: {payment.get('amount')} (atomic units) on {payment.get('network')}",
        f"  Recipient: {payment.get('pay_to')}",
        f"  Transaction: {payment.get('tx_hash') or '-'}",
        "",
        f'Use x402_session_fetch with session_id="{session["id"]}" for requests inside the scope.',
        "",
        f"Initial response ({response['status']})",
        _body_block(response),
    ]
    return "\n".join(lines)


def fetch_text(result: dict[str, Any]) -> str:
    return f"Response ({result['status']})\n" + _body_block(result)


def status_text(result: dict[str, Any]) -> str:
    if "session" in result:
        return "\n".join(["x402 session", *_session_lines(result["session"])])
    sessions = result["sessions"]
    if not sessions:
        return "No active sessions."
    out = [f"{len(sessions)} active session(s)"]
    for session in sessions:
        out += ["", *_session_lines(session)]
    return "\n".join(out)


def end_text(result: dict[str, Any]) -> str:
    session = result["session"]
    if result["already_ended"]:
        head = f"Session {session['id']} was already over ({session['state']}); nothing changed."
    else:
        head = f"Session closed\n\n  Session ID: {session['id']}\n  Scope: {session['scope']['url']}"
    lines = [head, f"  Calls made: {result['calls_made']}"]
    upstream = result.get("upstream")
    if upstream is not None:
        lines.append(f"  Upstream notified: {'ok' if upstream.get('ok') else 'failed'}")
    lines.append("Its credentials are forgotten; x402_session_fetch now fails for it.")
    return "\n".join(lines)


def _ok(text: str, structured: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], structured_content=structured
    )


def _error(tool: str, code: str, status: int, detail: str) -> types.CallToolResult:
    problem = problem_body(code, status, detail)
    text = f"{tool} failed [{code}]: {detail}"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)], structured_content=problem, is_error=True
    )


class McpTools:
    """Tool dispatch, independent of the transport (unit-testable without HTTP)."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    async def call(self, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
        args: Any = {} if arguments is None else arguments
        try:
            if name == "x402_session_start":
                status, result = await operations.start_session(self.control, operations.check_start(args))
                return _ok(start_text(status, result), result)
            if name == "x402_session_fetch":
                checked = operations.check_fetch(args, schemas.TOOL_FETCH)
                fetched = await operations.fetch(self.control, checked["session_id"], checked)
                return _ok(fetch_text(fetched), fetched)
            if name == "x402_session_status":
                checked = schemas.validate(schemas.TOOL_STATUS, args)
                if checked.get("session_id") is not None:
                    one = {"session": await self.control.get_session(checked["session_id"])}
                    return _ok(status_text(one), one)
                listing = {"sessions": await self.control.list_sessions(state="active")}
                return _ok(status_text(listing), listing)
            if name == "x402_session_end":
                checked = schemas.validate(schemas.TOOL_END, args)
                ended = await self.control.end_session(checked["session_id"])
                return _ok(end_text(ended), ended)
            if name == "x402_approval_list":
                schemas.validate(schemas.TOOL_APPROVAL_LIST, args)
                listing = {"approvals": self.control.list_approvals()}
                lines = [
                    f"{a['id']} {a['state']}: {a['price']} for {a['method']} {a['url']}"
                    for a in listing["approvals"]
                ]
                return _ok("\n".join(lines) or "no approvals", listing)
            if name == "x402_approval_decide":
                checked = schemas.validate(schemas.TOOL_APPROVAL_DECIDE, args)
                decided = self.control.decide_approval(
                    checked["id"],
                    checked["decision"],
                    via="mcp",
                    remember_for=checked.get("remember_for"),
                    hours=checked.get("hours"),
                )
                return _ok(f"approval {decided['id']}: {decided['state']}", decided)
            return _error(name, "unknown_tool", 404, f"no tool named {name[:100]!r}")
        except schemas.SchemaViolation as exc:
            return _error(name, exc.code, 400, exc.detail)
        except ControlError as exc:
            return _error(name, exc.code, exc.status, exc.detail)
        except Exception:
            log.exception("MCP tool %s failed", name)
            return _error(name, "internal_error", 500, "internal error; see the proxy log")


class McpEndpoint:
    def __init__(self, control: ControlPlane, max_body: int) -> None:
        self.tools = McpTools(control)

        async def list_tools(
            ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            return types.ListToolsResult(tools=TOOLS)

        async def call_tool(
            ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
        ) -> types.CallToolResult:
            return await self.tools.call(params.name, params.arguments)

        self.server: Server[Any] = Server(
            "x402-proxy",
            version=package_version(),
            instructions=(
                "Tools of a local x402 paying proxy: open a paid session for a URL scope once "
                "(x402_session_start), reuse it (x402_session_fetch), inspect (x402_session_status) and "
                "close it (x402_session_end). Payments stay within the proxy's spending policy."
            ),
            on_list_tools=list_tools,
            on_call_tool=call_tool,
        )
        self.manager = StreamableHTTPSessionManager(
            app=self.server,
            security_settings=_security(),
            max_request_body_size=max_body,
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        started = asyncio.Event()

        async def run() -> None:
            async with self.manager.run():
                started.set()
                await self._stop.wait()

        self._task = asyncio.create_task(run(), name="mcp-session-manager")
        waiter = asyncio.create_task(started.wait())
        done, _ = await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raises what stopped it
            raise RuntimeError("the MCP session manager stopped while starting")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            except Exception:
                log.exception("MCP session manager failed while stopping")

    async def handle(self, request: web.Request, body: bytes) -> web.StreamResponse:
        return await call_asgi(self.manager.handle_request, request, body)


def _security() -> TransportSecuritySettings:
    """The SDK's own Host/Origin checks stay off: the admin listener's `ListenerGuard` (auth.py) runs
    them for every route, this one included, so REST and MCP share one implementation. (The SDK's
    also accepted any port on a loopback name, and no Host without a port.)"""
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)
