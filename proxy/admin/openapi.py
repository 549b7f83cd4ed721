"""The OpenAPI 3.1 document at `/openapi.json`, built from the same schemas the routes validate with."""

from __future__ import annotations

import copy
from typing import Any

from proxy.admin import schemas

PROBLEM_REF = {"$ref": "#/components/responses/Problem"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problems(*statuses: int) -> dict[str, Any]:
    """Every route may answer 401 (no or wrong token), 421 (a Host that does not name the listener),
    403 (an Origin that is not the listener's own) and any problem (`default`)."""
    out: dict[str, Any] = {str(s): PROBLEM_REF for s in sorted({400, 401, 403, 421, 431, *statuses})}
    out["default"] = PROBLEM_REF
    return out


def _probe_problems(*statuses: int) -> dict[str, Any]:
    """The probes need no token, so never answer 401; the Host/Origin checks still apply."""
    out = _problems(*statuses)
    del out["401"]
    return out


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


SESSION_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": 100},
    "description": "Session ID",
}


def build(server_url: str, version: str) -> dict[str, Any]:
    request_errors = (400, 413, 415)
    paths: dict[str, Any] = {
        "/sessions": {
            "post": {
                "operationId": "startSession",
                "summary": "Open a session: one unpaid try, then at most one payment under max_payment",
                "description": "Mirrors the MCP tool x402_session_start. 201: paid and a session opened. "
                "200: the endpoint asked for no payment (payment_required: false, no session). A refusal "
                "(e.g. over_request_cap) is a problem and nothing is paid.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("StartSessionRequest")}},
                },
                "responses": {
                    "201": _json(_ref("StartSessionPaid"), "Paid; session opened")
                    | {
                        "headers": {
                            "Location": {"schema": {"type": "string"}, "description": "/sessions/{id}"}
                        }
                    },
                    "200": _json(_ref("StartSessionFree"), "No payment was required; no session"),
                    **_problems(*request_errors, 402, 409, 422, 502, 504),
                },
            },
            "get": {
                "operationId": "listSessions",
                "summary": "List sessions (newest first, at most 1000)",
                "parameters": [
                    _query(
                        "state",
                        {"type": "string", "enum": ["active", "expired", "ended"]},
                        "Only sessions in this state",
                    ),
                    _query("origin", {"type": "string", "maxLength": 2048}, "Only sessions on this origin"),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["sessions"],
                            "properties": {"sessions": {"type": "array", "items": _ref("Session")}},
                        },
                        "Sessions",
                    ),
                    **_problems(400, 409),
                },
            },
        },
        "/sessions/{id}": {
            "parameters": [SESSION_ID_PARAM],
            "get": {
                "operationId": "getSession",
                "summary": "One session (never its secrets)",
                "responses": {"200": _json(_ref("Session"), "The session"), **_problems(404, 409)},
            },
            "delete": {
                "operationId": "endSession",
                "summary": "End a session; idempotent (already_ended: true the second time)",
                "description": "The local session ends whatever the upstream answers. With notify_upstream, "
                "a DELETE carrying the session's credentials goes to the scope URL first (MCP Streamable "
                "HTTP rule: 2xx, 404 and 405 count as success).",
                "parameters": [
                    _query(
                        "notify_upstream",
                        {"type": "string", "enum": ["true", "false", "1", "0"]},
                        "Send a DELETE to the scope URL first",
                    )
                ],
                "responses": {"200": _json(_ref("EndSession"), "Ended"), **_problems(400, 404, 409)},
            },
        },
        "/sessions/{id}/fetch": {
            "parameters": [SESSION_ID_PARAM],
            "post": {
                "operationId": "fetchInSession",
                "summary": "Request a URL in the session's scope with its credentials",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("FetchRequest")}},
                },
                "responses": {
                    "200": _json(_ref("FetchedResponse"), "The upstream's answer (any status)"),
                    **_problems(*request_errors, 404, 409, 422, 502, 504),
                },
            },
        },
        "/payments": {
            "get": {
                "operationId": "listPayments",
                "summary": "Ledger rows, newest first",
                "parameters": [
                    _query("state", schemas.PAYMENT["properties"]["state"], "Only payments in this state"),
                    _query("host", {"type": "string", "maxLength": 2048}, "Only payments to this host"),
                    _query("since", {"type": "number", "minimum": 0}, "Created at or after (Unix seconds)"),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
                        "At most this many rows",
                    ),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["payments"],
                            "properties": {"payments": {"type": "array", "items": _ref("Payment")}},
                        },
                        "Payments",
                    ),
                    **_problems(400),
                },
            },
        },
        "/refusals": {
            "get": {
                "operationId": "listRefusals",
                "summary": "402s the proxy refused to pay, newest first (the newest 10000, at most 30 days)",
                "description": "Policy refusals (budget_exhausted, host_not_allowed, over_max_per_payment, "
                "payment_in_doubt, ...), each with the amount asked when known. dry_run answers are ledger "
                "rows (GET /payments?state=dry_run), not refusals.",
                "parameters": [
                    _query("host", schemas.REFUSALS_QUERY["host"], "Only refusals for this host"),
                    _query("reason", schemas.REFUSALS_QUERY["reason"], "Only refusals with this reason code"),
                    _query("since", schemas.REFUSALS_QUERY["since"], "At or after (Unix seconds)"),
                    _query(
                        "limit", schemas.REFUSALS_QUERY["limit"] | {"default": 100}, "At most this many rows"
                    ),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["refusals"],
                            "properties": {"refusals": {"type": "array", "items": _ref("Refusal")}},
                        },
                        "Refusals",
                    ),
                    **_problems(400),
                },
            },
        },
        "/payments/reconcile": {
            "post": {
                "operationId": "reconcilePayments",
                "summary": "Resolve every payment whose money could have moved from the chain, now",
                "responses": {
                    "200": _json(schemas.RECONCILE_REPORT, "Payment ids by outcome"),
                    **_problems(503),
                },
            }
        },
        "/audit": {
            "get": {
                "operationId": "audit",
                "summary": "Compare the ledger with the chain for the wallet (networks with an [rpc] URL)",
                "parameters": [
                    _query(
                        "since",
                        {"type": "number", "minimum": 1, "maximum": 31536000, "default": 86400},
                        "Window in seconds, ending now",
                    )
                ],
                "responses": {"200": _json(schemas.AUDIT, "The audit"), **_problems(400, 409, 502)},
            }
        },
        "/approvals": {
            "get": {
                "operationId": "listApprovals",
                "summary": "Payments waiting for a decision (above ask_above), then recent decisions",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["approvals"],
                            "properties": {"approvals": {"type": "array", "items": schemas.APPROVAL}},
                        },
                        "Approvals",
                    ),
                    **_problems(),
                },
            }
        },
        "/approvals/{id}": {
            "post": {
                "operationId": "decideApproval",
                "summary": "Approve (optionally remember for the host or scope) or deny a waiting payment",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 100},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": schemas.DECIDE_APPROVAL}},
                },
                "responses": {
                    "200": _json(schemas.APPROVAL, "The decided approval"),
                    **_problems(400, 404, 409, 413, 415),
                },
            }
        },
        "/budget": {
            "get": {
                "operationId": "getBudget",
                "summary": "Spending policy limits, what the rolling 24 h window has used, refusals per host",
                "responses": {"200": _json(_ref("Budget"), "Budget"), **_problems()},
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "200 while the process runs (no token needed: for orchestrators' probes)",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "Alive"), **_probe_problems()},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "200 while taking new work: the proxy listener accepts and the store answers; "
                "503 (not_ready) while draining or when either does not (no token needed)",
                "security": [],
                "responses": {"200": _json(_ref("Health"), "Ready"), **_probe_problems(503)},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text exposition",
                "responses": {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_problems(),
                },
            }
        },
        "/ca.pem": {
            "get": {
                "operationId": "caCertificate",
                "summary": "The proxy's CA certificate (PEM), to trust its HTTPS interception",
                "responses": {
                    "200": {
                        "description": "PEM certificate",
                        "content": {"application/x-pem-file": {"schema": {"type": "string"}}},
                    },
                    **_problems(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document"), **_problems()},
            }
        },
        "/mcp": {
            "summary": "MCP Streamable HTTP endpoint (JSON-RPC; see the MCP specification)",
            "description": "Tools: x402_session_start, x402_session_fetch, x402_session_status, "
            "x402_session_end. POST sends JSON-RPC messages (Accept: application/json, text/event-stream); "
            "GET opens the server's SSE stream; DELETE with Mcp-Session-Id ends the MCP session.",
            "post": {
                "operationId": "mcpPost",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {"default": {"description": "JSON-RPC response, SSE stream or error"}},
            },
            "get": {
                "operationId": "mcpStream",
                "responses": {"default": {"description": "SSE stream or error"}},
            },
            "delete": {
                "operationId": "mcpTerminate",
                "responses": {"default": {"description": "Session terminated, or error"}},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "x402-proxy admin API",
            "version": version,
            "description": "Sessions, payments and budget of a local x402 paying proxy. Every route needs "
            "`Authorization: Bearer <token>`. Errors are RFC 9457 problem details whose `type` is "
            "`urn:x402-proxy:<code>`.",
        },
        "servers": [{"url": server_url}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Problem": {
                    "description": "RFC 9457 problem details",
                    "content": {"application/problem+json": {"schema": _ref("Problem")}},
                }
            },
            "schemas": copy.deepcopy(
                {
                    "StartSessionRequest": schemas.START_SESSION,
                    "FetchRequest": schemas.FETCH,
                    "StartSessionPaid": schemas.START_PAID,
                    "StartSessionFree": schemas.START_FREE,
                    "Session": schemas.SESSION,
                    "Payment": schemas.PAYMENT,
                    "Refusal": schemas.REFUSAL,
                    "FetchedResponse": schemas.FETCHED,
                    "EndSession": schemas.END,
                    "Budget": schemas.BUDGET,
                    "Problem": schemas.PROBLEM,
                    "Health": schemas.HEALTH,
                }
            ),
        },
    }
