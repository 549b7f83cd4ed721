"""The admin listener: REST routes over the control plane, `/metrics`, and the MCP endpoint at `/mcp`.

Every route first passes the Host/Origin guard (`auth.ListenerGuard`: 421 for a Host that does not name
this listener, 403 for another origin), then needs `Authorization: Bearer <token>` (compared in
constant time), except the orchestrators' probes `GET /healthz` and `GET /readyz`, which answer
without it (a token that is sent must be right) and say only ok / ready / not ready. Input is JSON checked
against the schemas in `schemas.py` (unknown fields refused); every error is a problem document. The
listener is never reachable through the proxy listener: its address joins the proxy's self-target list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.admin import dashboard, openapi, operations, schemas
from proxy.admin.auth import ListenerGuard, token_matches
from proxy.admin.dashboard import is_dashboard_path
from proxy.admin.mcp_loader import McpEndpoint, package_version  # the MCP SDK loads at the first /mcp call
from proxy.admin.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.admin.metrics import AdminMetrics
from proxy.admin.problems import Problem, problem_response
from proxy.admin.service import ControlError, ControlPlane
from proxy.engine.responses import classify_request_error
from proxy.store.base import PaymentState, StoreError

log = logging.getLogger("x402_proxy.admin")

MAX_BODY = 1024 * 1024
BEARER_CHALLENGE = 'Bearer realm="x402-proxy-admin"'
# Answered without the bearer token: liveness and readiness, nothing else (see _auth).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
READY_STORE_TIMEOUT = 2.0  # seconds for the store's ping
READY_CONNECT_TIMEOUT = 1.0  # seconds for the proxy listener to accept
JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Request line and header limits; beyond them the request is refused with a problem document (431/400).
HANDLER_KWARGS: dict[str, Any] = {"access_log": None, "max_line_size": 65536, "max_field_size": 16384}


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse with problem documents."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        status, code, detail = classify_request_error(exc, status)
        if status >= 500:
            log.error("admin connection error", exc_info=exc)
        response = problem_response(code, status, detail)
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __init__(self, made: web.Server, kwargs: dict[str, Any]) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory, **kwargs)
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class _AdminRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        # The application's server, with a connection handler that speaks problem+json on parse errors.
        return _ProblemServer(await super()._make_server(), HANDLER_KWARGS)


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type=JSON, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole body, refusing (413) anything over `limit` before and while reading it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Problem("body_too_large", 413, f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise Problem("body_too_large", 413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request) -> Any:
    media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise Problem("unsupported_media_type", 415, "send the body as Content-Type: application/json")
    raw = await read_body(request)
    if not raw.strip():
        raise Problem("invalid_json", 400, "request body must be a JSON object")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise Problem("invalid_json", 400, "request body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 JSON"
        raise Problem("invalid_json", 400, f"request body is not valid JSON: {message}") from None


def _query(request: web.Request, spec: dict[str, schemas.Schema]) -> dict[str, Any]:
    """Query parameters checked against `spec` (name -> schema); unknown or repeated ones are refused."""
    out: dict[str, Any] = {}
    for name in request.query:
        if name not in spec:
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise Problem("unknown_field", 400, f"query parameter {shown!r} is not accepted")
        values = request.query.getall(name)
        if len(values) > 1:
            raise Problem("invalid_parameter", 400, f"query parameter {name} given more than once")
        schema = spec[name]
        raw = values[0]
        value: Any = raw
        kind = schema.get("type")
        try:
            if kind == "integer":
                value = int(raw)
            elif kind == "number":
                value = float(raw)
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError
        except ValueError:
            raise Problem("invalid_parameter", 400, f"query parameter {name} must be {kind}") from None
        try:
            out[name] = schemas.validate(schema, value, name)
        except schemas.SchemaViolation as exc:
            raise Problem(exc.code, 400, exc.detail) from None
    return out


class AdminServer:
    def __init__(
        self,
        control: ControlPlane,
        token: str,
        metrics: AdminMetrics,
        ca_pem_path: Path,
        host: str,
        port: int,
    ) -> None:
        self.control = control
        self._token = token
        self.metrics = metrics
        self._ca_pem_path = ca_pem_path
        self._host = host
        self._port = port
        self.mcp = McpEndpoint(control, MAX_BODY)
        self._runner: web.AppRunner | None = None
        self._addresses: list[tuple[str, int]] = []
        self._guard: ListenerGuard | None = None  # set once the listener's ports are known
        # /readyz: where the proxy listens (it must accept a connection) and the store's ping.
        self._listeners: Callable[[], list[tuple[str, int]]] | None = None
        self._store_ping: Callable[[], Awaitable[None]] | None = None
        self.app = self._build_app()

    def set_readiness(
        self, listeners: Callable[[], list[tuple[str, int]]], store_ping: Callable[[], Awaitable[None]]
    ) -> None:
        self._listeners, self._store_ping = listeners, store_ping

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return list(self._addresses)

    @property
    def url(self) -> str:
        host, port = self._addresses[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    async def start(self) -> None:
        await self.mcp.start()
        runner = _AdminRunner(self.app, shutdown_timeout=2.0, **HANDLER_KWARGS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port, shutdown_timeout=2.0, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self.mcp.stop()
            raise
        self._runner = runner
        self._addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        self._guard = ListenerGuard.for_listener(self._host, self._addresses)

    async def stop(self) -> None:
        await self.mcp.stop()  # ends MCP streams first, so the listener's drain is quick
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- app -----------------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._guarded, self._auth], client_max_size=MAX_BODY)
        routes = [
            web.post("/sessions", self._start_session),
            web.get("/sessions", self._list_sessions, allow_head=False),
            web.get("/sessions/{id}", self._get_session, allow_head=False),
            web.delete("/sessions/{id}", self._end_session),
            web.post("/sessions/{id}/fetch", self._fetch),
            web.get("/payments", self._payments, allow_head=False),
            web.post("/payments/reconcile", self._reconcile),
            web.get("/refusals", self._refusals, allow_head=False),
            web.get("/audit", self._audit, allow_head=False),
            web.get("/approvals", self._approvals, allow_head=False),
            web.post("/approvals/{id}", self._decide_approval),
            *dashboard.routes(),
            web.get("/budget", self._budget, allow_head=False),
            web.get("/healthz", self._healthz, allow_head=False),
            web.get("/readyz", self._readyz, allow_head=False),
            web.get("/metrics", self._metrics, allow_head=False),
            web.get("/ca.pem", self._ca_pem, allow_head=False),
            web.get("/openapi.json", self._openapi, allow_head=False),
            web.route("POST", "/mcp", self._mcp),
            web.route("GET", "/mcp", self._mcp),
            web.route("DELETE", "/mcp", self._mcp),
        ]
        app.add_routes(routes)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Problem as exc:
            return exc.response()
        except ControlError as exc:
            return problem_response(exc.code, exc.status, exc.detail)
        except web.HTTPException as exc:
            return _http_exception_problem(request, exc)
        except Exception:
            log.exception("admin %s %s failed", request.method, request.path)
            return problem_response("internal_error", 500, "internal error; see the proxy log")

    @web.middleware
    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Host and Origin first, on every route (/mcp too): see `ListenerGuard`."""
        if self._guard is not None:
            refused = self._guard.refusal(request.headers.get("Host"), request.headers.get("Origin"))
            if refused is not None:
                status, code, detail = refused
                raise Problem(code, status, detail)
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_dashboard_path(request.path):  # static page and script only: every API call sends the token
            return await handler(request)
        if request.path in PROBE_PATHS and request.method == "GET" and "Authorization" not in request.headers:
            # Orchestrators' probes (a compose health check, a Kubernetes httpGet) carry no secret; the
            # answers say ok / ready / not ready and nothing else. A token that is sent is still checked:
            # a wrong one is refused, never ignored.
            return await handler(request)
        if not token_matches(request.headers.get("Authorization"), self._token):
            raise Problem(
                "unauthorized",
                401,
                "send Authorization: Bearer <token> (the token is in <home>/admin-token or "
                "X402_PROXY_ADMIN_TOKEN)",
                {"WWW-Authenticate": BEARER_CHALLENGE},
            )
        return await handler(request)

    # -- sessions ------------------------------------------------------------------------------------

    async def _start_session(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        try:
            args = operations.check_start(await read_json(request))
        except schemas.SchemaViolation as exc:
            raise Problem(exc.code, 400, exc.detail) from None
        status, result = await operations.start_session(self.control, args)
        headers = {"Location": f"/sessions/{result['session']['id']}"} if status == 201 else None
        return _json_response(result, status, headers)

    async def _list_sessions(self, request: web.Request) -> web.StreamResponse:
        query = _query(
            request,
            {
                "state": {"type": "string", "enum": ["active", "expired", "ended"]},
                "origin": {"type": "string", "maxLength": 2048},
            },
        )
        sessions = await self.control.list_sessions(state=query.get("state"), origin=query.get("origin"))
        return _json_response({"sessions": sessions})

    async def _get_session(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        return _json_response(await self.control.get_session(request.match_info["id"]))

    async def _end_session(self, request: web.Request) -> web.StreamResponse:
        query = _query(request, {"notify_upstream": {"type": "string", "enum": ["true", "false", "1", "0"]}})
        notify = query.get("notify_upstream") in ("true", "1")
        return _json_response(
            await self.control.end_session(request.match_info["id"], notify_upstream=notify)
        )

    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        try:
            args = operations.check_fetch(await read_json(request))
        except schemas.SchemaViolation as exc:
            raise Problem(exc.code, 400, exc.detail) from None
        return _json_response(await operations.fetch(self.control, request.match_info["id"], args))

    # -- payments, budget, health --------------------------------------------------------------------

    async def _payments(self, request: web.Request) -> web.StreamResponse:
        query = _query(
            request,
            {
                "state": {"type": "string", "enum": [s.value for s in PaymentState]},
                "host": {"type": "string", "maxLength": 2048},
                "since": {"type": "number", "minimum": 0},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
            },
        )
        payments = await self.control.list_payments(
            state=query.get("state"),
            host=query.get("host"),
            since=query.get("since"),
            limit=query.get("limit", 100),
        )
        return _json_response({"payments": payments})

    async def _refusals(self, request: web.Request) -> web.StreamResponse:
        query = _query(request, schemas.REFUSALS_QUERY)
        refusals = await self.control.list_refusals(
            host=query.get("host"),
            reason=query.get("reason"),
            since=query.get("since"),
            limit=query.get("limit", 100),
        )
        return _json_response({"refusals": refusals})

    async def _reconcile(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        return _json_response(await self.control.reconcile())

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        query = _query(request, {"since": {"type": "number", "minimum": 1, "maximum": 31_536_000}})
        return _json_response(await self.control.audit(float(query.get("since", 86_400))))

    async def _approvals(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        return _json_response({"approvals": self.control.list_approvals()})

    async def _decide_approval(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        try:
            args = schemas.validate(schemas.DECIDE_APPROVAL, await read_json(request))
        except schemas.SchemaViolation as exc:
            raise Problem(exc.code, 400, exc.detail) from None
        decided = self.control.decide_approval(
            request.match_info["id"],
            args["decision"],
            via=args.get("via", "api"),
            remember_for=args.get("remember_for"),
            hours=args.get("hours"),
        )
        return _json_response(decided)

    async def _budget(self, request: web.Request) -> web.StreamResponse:
        _query(request, {})
        return _json_response(await self.control.budget())

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return _json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        # Open to anyone who reaches the listener: say whether, never why (the log says why).
        if self.control.draining:
            raise Problem("not_ready", 503, "not ready")
        if self._listeners is not None and not await _accepting(self._listeners()):
            log.warning("readyz: the proxy listener does not accept connections")
            raise Problem("not_ready", 503, "not ready")
        if self._store_ping is not None:
            try:
                await asyncio.wait_for(self._store_ping(), READY_STORE_TIMEOUT)
            except (StoreError, TimeoutError) as exc:
                log.warning("readyz: the store does not answer: %s", exc)
                raise Problem("not_ready", 503, "not ready") from None
        return _json_response({"status": "ready"})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        await self.metrics.refresh()
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def _ca_pem(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._ca_pem_path.read_bytes(), content_type="application/x-pem-file")

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return _json_response(openapi.build(self.url, package_version()))

    # -- MCP -----------------------------------------------------------------------------------------

    async def _mcp(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request) if request.method == "POST" else b""
        return await self.mcp.handle(request, body)


async def _accepting(addresses: list[tuple[str, int]]) -> bool:
    """Does the proxy's first listening address accept a TCP connection (a wildcard bind via loopback)?"""
    if not addresses:
        return False
    host, port = addresses[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), READY_CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _http_exception_problem(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        return problem_response("not_found", 404, f"no route {request.method} {request.path[:200]}")
    if exc.status == 405:
        allowed = getattr(exc, "allowed_methods", None) or set()
        headers = {"Allow": ", ".join(sorted(allowed))} if allowed else None
        return problem_response(
            "method_not_allowed", 405, f"{request.method} is not allowed on {request.path[:200]}", headers
        )
    if exc.status == 413:
        return problem_response("body_too_large", 413, f"request body over {MAX_BODY} bytes")
    code = "invalid_request" if 400 <= exc.status < 500 else "internal_error"
    return problem_response(code, exc.status, exc.reason or "request failed")
