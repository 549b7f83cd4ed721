"""Validated inputs -> control plane calls, shared by the REST routes and the MCP tools."""

from __future__ import annotations

from typing import Any

from proxy.admin import schemas
from proxy.admin.service import ControlPlane, StartRequest

_OLD_CAP_FIELD = "max_payment_eth"


def check_start(args: Any) -> dict[str, Any]:
    if isinstance(args, dict) and _OLD_CAP_FIELD in args:
        # The seed tool compared ETH wei with token units; silently ignoring the field would drop the cap.
        raise schemas.SchemaViolation(
            "unknown_field",
            "max_payment_eth is not accepted: give max_payment, a decimal string in the asset's units "
            '(e.g. "0.01" for 0.01 USDC)',
        )
    checked: dict[str, Any] = schemas.validate(schemas.START_SESSION, args)
    return checked


def check_fetch(args: Any, schema: schemas.Schema = schemas.FETCH) -> dict[str, Any]:
    checked: dict[str, Any] = schemas.validate(schema, args)
    return checked


async def start_session(control: ControlPlane, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    start = StartRequest(
        endpoint=args["endpoint"],
        scope=args.get("scope", "prefix"),
        ttl_seconds=args.get("ttl_seconds"),
        label=args.get("label"),
        max_payment=args.get("max_payment"),
        method=args.get("method", "GET"),
        headers=dict(args.get("headers") or {}),
        body=args.get("body"),
        timeout_ms=args.get("timeout_ms", 30000),
    )
    return await control.start_session(start)


async def fetch(control: ControlPlane, session_id: str, args: dict[str, Any]) -> dict[str, Any]:
    return await control.fetch(
        session_id,
        args["url"],
        method=args.get("method", "GET"),
        headers=dict(args.get("headers") or {}),
        body=args.get("body"),
        timeout_ms=args.get("timeout_ms", 30000),
        allow_renew=bool(args.get("allow_renew", False)),
    )
