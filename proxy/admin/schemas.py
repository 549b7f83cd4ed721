"""JSON Schemas shared by the REST routes, the OpenAPI document and the MCP tools, and a validator.

One schema per input, used three ways: to validate a request (so REST and MCP refuse the same things),
to describe it in `/openapi.json`, and as an MCP tool's `inputSchema`. The validator implements the
subset of JSON Schema these schemas use; integral numbers such as 3600.0 count as integers, as in
JSON Schema itself.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.payments.refusals import RECORDED_REASONS
from proxy.sessions.model import LABEL_MAX, TTL_MAX, TTL_MIN

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
DECIMAL_PATTERN = r"^[0-9]{1,30}(\.[0-9]{1,30})?$"
URL_MAX = 8192
MAX_HEADERS = 100

Schema = dict[str, Any]


def _headers_schema(description: str) -> Schema:
    return {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": URL_MAX},
        "maxProperties": MAX_HEADERS,
        "description": description,
    }


def _timeout_schema() -> Schema:
    return {
        "type": "integer",
        "minimum": 1000,
        "maximum": 60000,
        "default": 30000,
        "description": "Request timeout in milliseconds (default: 30000)",
    }


def _method_schema(description: str) -> Schema:
    return {"type": "string", "enum": list(METHODS), "default": "GET", "description": description}


# The seed tool `x402_session_start`, property for property, except `max_payment_eth` -> `max_payment`.
START_SESSION: Schema = {
    "type": "object",
    "properties": {
        "endpoint": {
            "type": "string",
            "minLength": 1,
            "maxLength": URL_MAX,
            "description": 'Base URL to establish a session for (e.g., "https://api.example.com/v1")',
        },
        "scope": {
            "type": "string",
            "enum": ["prefix", "exact"],
            "default": "prefix",
            "description": '"prefix": covers all paths under this URL (default). "exact": single URL only.',
        },
        "ttl_seconds": {
            "type": "integer",
            "minimum": TTL_MIN,
            "maximum": TTL_MAX,
            "description": "Session TTL in seconds (default: 3600 / 1 hour). Max: 30 days.",
        },
        "label": {
            "type": "string",
            "maxLength": LABEL_MAX,
            "description": 'Optional label for this session (e.g., "Premium API session")',
        },
        "max_payment": {
            "type": "string",
            "pattern": DECIMAL_PATTERN,
            "description": "Maximum to pay for this session, as a decimal string in the asset's units "
            '(e.g. "0.01" for 0.01 USDC). Rejects if the price exceeds this; nothing is paid then.',
        },
        "method": _method_schema("HTTP method for the initial request (default: GET)"),
        "headers": _headers_schema("Additional request headers"),
        "body": {"type": "string", "description": "Request body for POST/PUT/PATCH session-start requests"},
        "timeout_ms": _timeout_schema(),
    },
    "required": ["endpoint"],
    "additionalProperties": False,
}

_FETCH_PROPERTIES: Schema = {
    "url": {
        "type": "string",
        "minLength": 1,
        "maxLength": URL_MAX,
        "description": "URL to fetch; must be inside the session's scope",
    },
    "method": _method_schema("HTTP method (default: GET)"),
    "headers": _headers_schema("Additional request headers"),
    "body": {"type": "string", "description": "Request body for POST/PUT/PATCH"},
    "timeout_ms": _timeout_schema(),
    "allow_renew": {
        "type": "boolean",
        "default": False,
        "description": "Pay again (a renewal, within the policy and the session's cap) if the server no "
        "longer honours the session. Default false: a rejected session returns the 402.",
    },
}

FETCH: Schema = {
    "type": "object",
    "properties": _FETCH_PROPERTIES,
    "required": ["url"],
    "additionalProperties": False,
}

_SESSION_ID: Schema = {
    "type": "string",
    "maxLength": 100,
    "description": "Session ID (from x402_session_start)",
}

TOOL_FETCH: Schema = {
    "type": "object",
    "properties": {"session_id": _SESSION_ID, **_FETCH_PROPERTIES},
    "required": ["session_id", "url"],
    "additionalProperties": False,
}

# The seed tool `x402_session_end`.
TOOL_END: Schema = {
    "type": "object",
    "properties": {
        "session_id": {
            "type": "string",
            "maxLength": 100,
            "description": "Session ID to close (from x402_session_start)",
        }
    },
    "required": ["session_id"],
    "additionalProperties": False,
}

TOOL_STATUS: Schema = {
    "type": "object",
    "properties": {
        "session_id": {
            "type": "string",
            "maxLength": 100,
            "description": "Session ID to inspect; omit to list the active sessions",
        }
    },
    "additionalProperties": False,
}

_APPROVAL_ID: Schema = {"type": "string", "pattern": "^apr_[0-9a-f]{12}$", "maxLength": 16}
_DECISION_PROPERTIES: Schema = {
    "decision": {"type": "string", "enum": ["approve", "deny"]},
    "remember_for": {
        "type": "string",
        "enum": ["host", "scope"],
        "description": "approve and remember: later payments to this host, or for this need, are not asked",
    },
    "hours": {"type": "number", "minimum": 0.01, "maximum": 720, "description": "how long to remember (1)"},
}

DECIDE_APPROVAL: Schema = {
    "type": "object",
    "properties": {
        **_DECISION_PROPERTIES,
        "via": {"type": "string", "enum": ["ui", "cli", "api"], "description": "who decides (recorded)"},
    },
    "required": ["decision"],
    "additionalProperties": False,
}

TOOL_APPROVAL_LIST: Schema = {"type": "object", "properties": {}, "additionalProperties": False}

TOOL_APPROVAL_DECIDE: Schema = {
    "type": "object",
    "properties": {"id": _APPROVAL_ID, **_DECISION_PROPERTIES},
    "required": ["id", "decision"],
    "additionalProperties": False,
}

# GET /refusals (the route validates with it, /openapi.json describes it).
REFUSALS_QUERY: dict[str, Schema] = {
    "host": {"type": "string", "maxLength": 2048},
    "reason": {"type": "string", "enum": list(RECORDED_REASONS)},
    "since": {"type": "number", "minimum": 0},
    "limit": {"type": "integer", "minimum": 1, "maximum": 10000},
}

# -- responses ------------------------------------------------------------------------------------------

_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_NULLABLE_NUMBER: Schema = {"type": ["number", "null"]}
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}

SESSION: Schema = {
    "type": "object",
    "required": ["id", "state", "scope", "expires_at", "amount_paid", "call_count", "credentials"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["active", "expired", "ended"]},
        "scope": {
            "type": "object",
            "required": ["kind", "url"],
            "properties": {
                "kind": {"type": "string", "enum": ["prefix", "exact"]},
                "url": {"type": "string"},
            },
        },
        "label": _NULLABLE_STRING,
        "ttl_seconds": {"type": "integer"},
        "created_at": {"type": "number"},
        "expires_at": {"type": "number"},
        "expires_in": {"type": "integer"},
        "last_used_at": _NULLABLE_NUMBER,
        "call_count": {"type": "integer"},
        "payment_ids": {"type": "array", "items": {"type": "integer"}},
        "amount_paid": {"type": "string", "description": "atomic units of `asset`"},
        "asset": _NULLABLE_STRING,
        "network": _NULLABLE_STRING,
        "decimals": _NULLABLE_INT,
        "pay_to": _NULLABLE_STRING,
        "payer": _NULLABLE_STRING,
        "ended_at": _NULLABLE_NUMBER,
        "ended_reason": _NULLABLE_STRING,
        "credentials": {
            "type": "array",
            "items": {"type": "string"},
            "description": "credential kinds held (never their values)",
        },
        "cookie_count": {"type": "integer"},
        "renewals": {"type": "integer"},
        "rejected_count": {"type": "integer"},
        "max_session_payment": _NULLABLE_STRING,
    },
}

PAYMENT: Schema = {
    "type": "object",
    "required": ["id", "state", "amount", "decimals", "asset", "network", "host", "url"],
    "properties": {
        "id": {"type": "integer"},
        "state": {
            "type": "string",
            "enum": [
                "pending",
                "settled",
                "in_doubt",
                "settled_undelivered",
                "rejected",
                "unsettled",
                "dry_run",
            ],
        },
        "amount": {"type": "string", "description": "atomic units of `asset`"},
        "decimals": {"type": "integer"},
        "asset": {"type": "string"},
        "network": {"type": "string"},
        "pay_to": {"type": "string"},
        "host": {"type": "string"},
        "method": {"type": "string"},
        "url": {"type": "string"},
        "scheme": {"type": "string"},
        "x402_version": {"type": "integer"},
        "tx_hash": _NULLABLE_STRING,
        "payer": _NULLABLE_STRING,
        "reason": _NULLABLE_STRING,
        "session_id": _NULLABLE_STRING,
        "created_at": {"type": "number"},
        "updated_at": {"type": "number"},
        "delivered": {"type": "boolean", "description": "the paid answer reached the client as a success"},
        "chain_state": {
            "type": ["string", "null"],
            "enum": ["used", "unused", None],
            "description": "the chain's final word on the authorization (null: not yet known)",
        },
        "presentations": {"type": "integer", "description": "times the signed payload was sent"},
        "valid_before": {"type": ["integer", "null"]},
        "evidence": {"description": "extension results the server or facilitator returned"},
        "approved_by": {
            "type": ["string", "null"],
            "description": "who approved a payment above ask_above (ui, cli, api, mcp, or a grant)",
        },
        "approved_at": _NULLABLE_NUMBER,
        "refunded": {
            "type": "string",
            "description": "what came back to the payer, proved on chain (a channel's refunded deposit); "
            "budgets count amount - refunded",
        },
    },
}

APPROVAL: Schema = {
    "type": "object",
    "required": [
        "id",
        "state",
        "method",
        "url",
        "host",
        "price",
        "amount",
        "reason",
        "created_at",
        "expires_at",
    ],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": ["waiting", "approved", "denied", "timeout"]},
        "need": {"type": "string"},
        "method": {"type": "string"},
        "url": {"type": "string"},
        "host": {"type": "string"},
        "price": {"type": "string"},
        "amount": {"type": "string"},
        "decimals": {"type": "integer"},
        "asset": {"type": "string"},
        "network": {"type": "string"},
        "pay_to": {"type": "string"},
        "reason": {"type": "string"},
        "created_at": {"type": "number"},
        "expires_at": {"type": "number"},
        "decided_by": _NULLABLE_STRING,
        "decided_at": _NULLABLE_NUMBER,
        "waiters": {"type": "integer"},
        "remember": {"type": ["object", "null"]},
    },
}

REFUSAL: Schema = {
    "type": "object",
    "required": ["id", "created_at", "host", "method", "url", "reason", "detail", "amount"],
    "properties": {
        "id": {"type": "integer"},
        "created_at": {"type": "number", "description": "Unix seconds"},
        "host": {"type": "string", "description": "canonical host"},
        "method": {"type": "string"},
        "url": {"type": "string"},
        "reason": {"type": "string", "enum": list(RECORDED_REASONS)},
        "detail": {"type": "string"},
        "amount": {
            "type": ["string", "null"],
            "description": "the cheapest price the challenge offered in an asset we know, in atomic units of "
            "`asset` (null: the challenge was unreadable or offered no such asset)",
        },
        "decimals": _NULLABLE_INT,
        "asset": _NULLABLE_STRING,
        "network": _NULLABLE_STRING,
        "pay_to": _NULLABLE_STRING,
        "payment_id": {
            "type": ["integer", "null"],
            "description": "the ledger row behind the refusal (payment_in_doubt, payment_undelivered)",
        },
        "session_id": _NULLABLE_STRING,
    },
}

RECONCILE_REPORT: Schema = {
    "type": "object",
    "required": ["settled", "undelivered", "never_moved", "in_doubt", "no_rpc", "errors"],
    "properties": {
        name: {"type": "array", "items": {"type": "integer"}}
        for name in ("settled", "undelivered", "never_moved", "in_doubt", "no_rpc", "errors")
    },
}

AUDIT: Schema = {
    "type": "object",
    "required": ["ok", "since", "networks"],
    "properties": {
        "ok": {"type": "boolean", "description": "no discrepancy on any network"},
        "since": {"type": "number"},
        "networks": {"type": "array", "items": {"type": "object"}},
        "skipped": {"type": "array", "items": {"type": "object"}},
    },
}

FETCHED: Schema = {
    "type": "object",
    "required": ["status", "headers", "body", "body_truncated"],
    "properties": {
        "status": {"type": "integer"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "body": {
            "type": "string",
            "description": "decoded as UTF-8 (invalid bytes replaced), at most 64 KiB",
        },
        "body_truncated": {"type": "boolean"},
    },
}

START_PAID: Schema = {
    "type": "object",
    "required": ["payment_required", "session", "payment", "response"],
    "properties": {
        "payment_required": {"const": True},
        "session": {"$ref": "#/components/schemas/Session"},
        "payment": {"oneOf": [{"$ref": "#/components/schemas/Payment"}, {"type": "null"}]},
        "response": {"$ref": "#/components/schemas/FetchedResponse"},
    },
}

START_FREE: Schema = {
    "type": "object",
    "required": ["payment_required", "session", "response"],
    "properties": {
        "payment_required": {"const": False},
        "session": {"type": "null"},
        "response": {"$ref": "#/components/schemas/FetchedResponse"},
    },
}

END: Schema = {
    "type": "object",
    "required": ["ended", "already_ended", "session", "calls_made", "amount_paid", "upstream"],
    "properties": {
        "ended": {"const": True},
        "already_ended": {"type": "boolean"},
        "session": {"$ref": "#/components/schemas/Session"},
        "calls_made": {"type": "integer"},
        "amount_paid": {"type": "string"},
        "upstream": {
            "description": "null unless notify_upstream was asked for an active session",
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "status": {"type": "integer"},
                        "error": {"type": "string"},
                    },
                },
            ],
        },
    },
}

_AMOUNTS: Schema = {
    "type": "object",
    "properties": {"limit": {"type": "string"}, "spent": {"type": "string"}, "remaining": {"type": "string"}},
}

_HOST_AMOUNTS: Schema = {
    "type": "object",
    "required": ["spent", "remaining", "refusals_24h"],
    "properties": {
        "spent": {"type": "string"},
        "remaining": {"type": "string"},
        "refusals_24h": {"type": "integer", "description": "402s refused for this host in the window"},
    },
}

BUDGET: Schema = {
    "type": "object",
    "required": ["window_seconds", "global", "per_host_limit", "hosts", "max_per_payment", "dry_run"],
    "properties": {
        "window_seconds": {"type": "integer"},
        "global": _AMOUNTS,
        "per_host_limit": {"type": "string"},
        "hosts": {
            "type": "object",
            "additionalProperties": _HOST_AMOUNTS,
            "description": "every host that spent or was refused in the window",
        },
        "max_per_payment": {"type": "string"},
        "dry_run": {"type": "boolean"},
    },
}

PROBLEM: Schema = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "description": "urn:x402-proxy:<code>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
    },
}

HEALTH: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}


# -- validation -----------------------------------------------------------------------------------------


class SchemaViolation(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _where(path: str) -> str:
    return path or "body"


def validate(schema: Schema, value: Any, path: str = "") -> Any:
    """Check `value` against `schema`; return it with integral floats turned into ints.

    Raises SchemaViolation("unknown_field", ...) for a property the schema does not allow and
    SchemaViolation("invalid_parameter", ...) for everything else.
    """
    where = _where(path)
    wanted = schema.get("type")
    if wanted is not None:
        names = wanted if isinstance(wanted, list) else [wanted]
        if not any(_is_type(value, n) for n in names):
            shown = " or ".join(names)
            raise SchemaViolation("invalid_parameter", f"{where} must be {_article(shown)} {shown}")
        if "integer" in names and isinstance(value, float):
            value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        raise SchemaViolation("invalid_parameter", f"{where} must be one of {allowed}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaViolation("invalid_parameter", f"{where} must not be empty")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaViolation(
                "invalid_parameter", f"{where} must be at most {schema['maxLength']} characters"
            )
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaViolation("invalid_parameter", f"{where} has an invalid format")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation("invalid_parameter", f"{where} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation("invalid_parameter", f"{where} must be <= {schema['maximum']}")
    if isinstance(value, dict):
        value = _validate_object(schema, value, path)
    if isinstance(value, list) and "items" in schema:
        value = [validate(schema["items"], item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _validate_object(schema: Schema, value: dict[str, Any], path: str) -> dict[str, Any]:
    where = _where(path)
    properties: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        raise SchemaViolation("invalid_parameter", f"{where} has more than {schema['maxProperties']} entries")
    for name in schema.get("required", []):
        if name not in value:
            raise SchemaViolation("invalid_parameter", f"{_join(path, name)} is required")
    out: dict[str, Any] = {}
    for name, item in value.items():
        if name in properties:
            out[name] = validate(properties[name], item, _join(path, name))
        elif extra is False:
            raise SchemaViolation("unknown_field", f"{_join(path, _shorten(name))} is not an accepted field")
        elif isinstance(extra, dict):
            out[name] = validate(extra, item, _join(path, _shorten(name)))
        else:
            out[name] = item
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shorten(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
