"""The control plane: what the admin API, the CLI and the MCP tools can do, in one place.

Routes and tools translate their inputs to these calls and their results to JSON; the rules
(validation, money safety, what is secret) live here so every front end behaves the same.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.engine import http_semantics as hs
from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.upstream import UpstreamError
from proxy.hosts import HostError, NonCanonicalHost, canonical_host
from proxy.payments.amounts import AmountError, parse_decimal
from proxy.payments.approvals import ApprovalError
from proxy.payments.audit import AuditError, run_audit
from proxy.payments.payer import BUDGET_WINDOW_SECONDS, Payer, spend_in_budget_units
from proxy.payments.policy import normalize_host
from proxy.payments.reconcile import RECONCILE_FIELDS, Reconciler
from proxy.payments.refusals import RECORDED_REASONS
from proxy.sessions.manager import SessionManager
from proxy.sessions.model import Session, SessionValueError, validate_label, validate_ttl
from proxy.sessions.scope import ScopeError, normalize_url
from proxy.sessions.stage import SessionStage, routable_url
from proxy.store.base import PaymentRecord, PaymentState
from proxy.store.refusal_store import AsyncRefusalStore, RefusalRecord

# Initial/fetched response bodies are returned up to this many bytes (the rest is cut, and said so).
MAX_RETURNED_BODY = 64 * 1024
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# C0, DEL and C1. yarl would drop a raw CR/LF and re-encode the rest into a URL nobody asked for, so
# an endpoint holding one is refused; percent-encoded bytes (%0D%0A) are data and pass as written.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ADMIN_REQUEST_IDS = iter(range(1, 1 << 62))


class ControlError(Exception):
    """A refusal with a stable code (the problem `type`) and an HTTP status for the REST front end."""

    def __init__(self, code: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.status = status
        self.detail = detail


@dataclass
class FetchedResponse:
    status: int
    headers: list[tuple[str, str]]
    body: str
    body_truncated: bool
    body_base64: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "headers": dict(self.headers),
            "body": self.body,
            "body_truncated": self.body_truncated,
        }


@dataclass
class StartRequest:
    endpoint: str
    scope: str = "prefix"
    ttl_seconds: int | None = None
    label: str | None = None
    max_payment: str | None = None
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    timeout_ms: int = 30000


class ControlPlane:
    def __init__(
        self,
        payer: Payer,
        sessions: SessionManager | None,
        stage: SessionStage | None,
        inner: Exchanger,
        clock: Any = time.time,
    ) -> None:
        self.payer = payer
        self.sessions = sessions
        self.stage = stage
        self._inner = inner
        self._clock = clock
        self.draining = False
        self.reconciler: Reconciler | None = None  # set by the app once the reconciler runs
        self.refusals: AsyncRefusalStore | None = None  # set by the app: refused 402s on record

    # -- sessions ----------------------------------------------------------------------------------

    def _require_sessions(self) -> tuple[SessionManager, SessionStage]:
        if self.sessions is None or self.stage is None:
            raise ControlError(
                "sessions_disabled", 409, "sessions are disabled in the config ([sessions] enabled)"
            )
        return self.sessions, self.stage

    async def list_sessions(
        self, state: str | None = None, origin: str | None = None
    ) -> list[dict[str, Any]]:
        manager, _ = self._require_sessions()
        if state not in (None, "active", "expired", "ended"):
            raise ControlError("invalid_parameter", 400, "state must be active, expired or ended")
        if origin is not None:
            try:
                origin = normalize_url(origin).origin_str
            except ScopeError as exc:
                raise ControlError("invalid_parameter", 400, f"origin: {exc}") from None
        now = self._clock()
        stored = await manager.list_stored(state=state, origin=origin)
        return [self._with_channel(s.id, s.describe(now)) for s in stored]

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return self._with_channel(session_id, (await self._session(session_id)).describe(self._clock()))

    def _with_channel(self, session_id: str, summary: dict[str, Any]) -> dict[str, Any]:
        """A channel session (proxy/channels/) also shows deposit, claimed, refunded and net spend."""
        channels = self.stage.channels if self.stage is not None else None
        shown = channels.describe_session(session_id) if channels is not None else None
        if shown is not None:
            summary["channel"] = shown
        return summary

    async def _session(self, session_id: str) -> Session:
        manager, _ = self._require_sessions()
        session = await manager.fetch(session_id)
        if session is None:
            raise ControlError("session_not_found", 404, f"no session {session_id!r}")
        return session

    async def start_session(self, start: StartRequest) -> tuple[int, dict[str, Any]]:
        """Mirror of `x402_session_start`: 201 paid + session, 200 no payment needed, or a ControlError."""
        _, stage = self._require_sessions()
        if start.scope not in ("prefix", "exact"):
            raise ControlError("invalid_parameter", 400, "scope must be prefix or exact")
        try:
            ttl = validate_ttl(start.ttl_seconds) if start.ttl_seconds is not None else None
            label = validate_label(start.label)
        except SessionValueError as exc:
            raise ControlError("invalid_parameter", 400, f"{exc.field}: {exc}") from None
        cap = _decimal_or_none(start.max_payment, "max_payment")
        request = self._exchange(start.method, start.endpoint, start.headers, start.body)
        try:
            routable_url(request.url)  # a path a server may read as another one opens no session
        except ScopeError as exc:
            raise ControlError("invalid_url", 400, str(exc)) from None
        result = await self._bounded(
            stage.start(request, self._inner, kind=start.scope, ttl_seconds=ttl, label=label, max_amount=cap),  # type: ignore[arg-type]
            start.timeout_ms,
        )
        response = await _collect(result.outcome)
        if result.session is not None:
            record = result.record
            if record is not None:
                # The stage attached the session to the ledger row after this copy was taken: re-read it.
                record = await self.payer.store.get(record.id) or record
            return 201, {
                "payment_required": True,
                "session": result.session.describe(self._clock()),
                "payment": _payment_json(record),
                "response": response.to_json(),
            }
        if not result.payment_required:
            return 200, {"payment_required": False, "session": None, "response": response.to_json()}
        if result.refusal is not None:
            status = 402 if result.refusal != "over_request_cap" else 422
            raise ControlError(result.refusal, status, f"not paid: {result.refusal}")
        raise ControlError(
            "payment_failed",
            502,
            f"paid request answered {response.status}; no session was opened",
        )

    async def fetch(
        self,
        session_id: str,
        url: str,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
        timeout_ms: int = 30000,
        allow_renew: bool = False,
    ) -> dict[str, Any]:
        _, stage = self._require_sessions()
        session = await self._session(session_id)
        now = self._clock()
        state = session.state(now)
        if state != "active":
            raise ControlError(f"session_{state}", 409, f"session {session_id} is {state}")
        request = self._exchange(method, url, headers or {}, body)
        try:
            scope_ok = session.scope.covers(routable_url(request.url))
        except ScopeError as exc:
            raise ControlError("invalid_url", 400, str(exc)) from None
        if not scope_ok:
            raise ControlError("url_not_in_scope", 422, f"{url} is not in the scope of session {session_id}")
        outcome = await self._bounded(
            stage.fetch(session, request, self._inner, allow_renew=allow_renew), timeout_ms
        )
        return (await _collect(outcome)).to_json()

    async def end_session(self, session_id: str, notify_upstream: bool = False) -> dict[str, Any]:
        """Mirror of `x402_session_end`; the local session ends whatever the upstream says."""
        manager, stage = self._require_sessions()
        session = await self._session(session_id)
        upstream: dict[str, Any] | None = None
        if notify_upstream and session.is_active(self._clock()):
            upstream = await self._notify_upstream(stage, session)
        # Durable (and so announced to every replica sharing the store) before this answers.
        ended, already = await manager.end_session(session_id, "ended by admin")
        assert ended is not None
        if stage.channels is not None:  # a channel session: its unused deposit comes back now
            await stage.channels.end_session(session_id)
        summary = self._with_channel(session_id, ended.describe(self._clock()))
        return {
            "ended": True,
            "already_ended": already,
            "session": summary,
            "calls_made": ended.call_count,
            "amount_paid": str(ended.amount_paid),
            "upstream": upstream,
        }

    async def _notify_upstream(self, stage: SessionStage, session: Session) -> dict[str, Any]:
        # MCP Streamable HTTP rule: DELETE with the session's credentials; 2xx/404/405 count as success.
        url = session.scope.to_url()
        request = self._exchange("DELETE", url, stage.credentials_for(session, url), None)
        try:
            outcome = await self._bounded(self._inner(request), 10000)
        except ControlError as exc:
            return {"ok": False, "error": exc.detail}
        status = outcome.response.status
        outcome.release_body()
        return {"ok": 200 <= status < 300 or status in (404, 405), "status": status}

    # -- payments and budget -----------------------------------------------------------------------

    async def list_payments(
        self, state: str | None = None, host: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        try:
            wanted = PaymentState(state) if state is not None else None
        except ValueError:
            allowed = ", ".join(s.value for s in PaymentState)
            raise ControlError("invalid_parameter", 400, f"state must be one of {allowed}") from None
        if not 1 <= limit <= 10000:
            raise ControlError("invalid_parameter", 400, "limit must be 1..10000")
        rows = await self.payer.store.list(state=wanted, host=host, since=since, limit=limit)
        return [_payment_dict(r) for r in rows]

    async def list_refusals(
        self, host: str | None = None, reason: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Refused 402s on record (newest first; the newest 10 000, none older than 30 days)."""
        if reason is not None and reason not in RECORDED_REASONS:
            allowed = ", ".join(RECORDED_REASONS)
            raise ControlError("invalid_parameter", 400, f"reason must be one of {allowed}")
        if not 1 <= limit <= 10000:
            raise ControlError("invalid_parameter", 400, "limit must be 1..10000")
        if self.refusals is None:
            return []
        wanted = normalize_host(host) if host is not None else None  # one canonical host (proxy/hosts.py)
        rows = await self.refusals.list(
            host=wanted, reason=reason, since=since, limit=limit, now=self._clock()
        )
        return [_refusal_dict(r) for r in rows]

    async def budget(self) -> dict[str, Any]:
        now = self._clock()
        since = now - BUDGET_WINDOW_SECONDS
        policy = self.payer.policy
        store, checked = self.payer.store, self.payer.chain_checked
        spent = spend_in_budget_units(await store.spent_since(since, None, now=now, chain_checked=checked))
        # Every host whose rows count, whatever their state (money the chain says moved included).
        spent_by_host = {
            h: spend_in_budget_units(await store.spent_since(since, h, now=now, chain_checked=checked))
            for h in await store.hosts_since(since)
        }
        hosts = {normalize_host(h): v for h, v in spent_by_host.items() if v > 0}
        # Refusals per host: a host that was only ever refused is listed too (spent 0).
        refused = await self.refusals.count_by_host(since) if self.refusals is not None else {}
        for host in refused:
            hosts.setdefault(host, 0)
        scale = Decimal(10) ** 18
        return {
            "window_seconds": BUDGET_WINDOW_SECONDS,
            "global": {
                "limit": str(Decimal(policy.daily_budget) / scale),
                "spent": str(Decimal(spent) / scale),
                "remaining": str(Decimal(max(0, policy.daily_budget - spent)) / scale),
            },
            "per_host_limit": str(Decimal(policy.per_host_daily_budget) / scale),
            "hosts": {
                h: {
                    "spent": str(Decimal(v) / scale),
                    "remaining": str(Decimal(max(0, policy.per_host_daily_budget - v)) / scale),
                    "refusals_24h": refused.get(h, 0),
                }
                for h, v in sorted(hosts.items())
            },
            "max_per_payment": str(Decimal(policy.max_per_payment) / scale),
            "dry_run": policy.dry_run,
        }

    # -- approvals -----------------------------------------------------------------------------------

    def list_approvals(self) -> list[dict[str, Any]]:
        return self.payer.approvals.describe_all()

    def decide_approval(
        self,
        approval_id: str,
        decision: str,
        *,
        via: str,
        remember_for: str | None = None,
        hours: float | None = None,
    ) -> dict[str, Any]:
        try:
            approval = self.payer.approvals.decide(
                approval_id,
                decision == "approve",
                via=via,
                remember_for="host" if remember_for == "host" else "scope" if remember_for else None,
                hours=hours,
            )
        except ApprovalError as exc:
            raise ControlError(exc.code, exc.status, exc.detail) from None
        return approval.describe()

    async def reconcile(self) -> dict[str, Any]:
        """One reconciliation pass now (the same as the periodic one; never two at once)."""
        if self.reconciler is None:
            raise ControlError("not_ready", 503, "the reconciler is not running yet")
        report = await self.reconciler.run_once()
        return {name: list(getattr(report, name)) for name in RECONCILE_FIELDS}

    async def audit(self, since_seconds: float) -> dict[str, Any]:
        """Ledger against chain for the wallet on every network with an [rpc] URL (a reconcile first)."""
        if self.payer.wallet is None:
            raise ControlError("no_wallet", 409, "no wallet configured: there is nothing to audit")
        if self.reconciler is not None:
            await self.reconciler.run_once()
        try:
            return await run_audit(
                self.payer.store,
                self.reconciler.rpc_urls if self.reconciler else {},
                self.payer.wallet.address,
                self._clock() - since_seconds,
            )
        except AuditError as exc:
            raise ControlError("chain_unavailable", 502, str(exc)) from None

    # -- plumbing ----------------------------------------------------------------------------------

    def _exchange(self, method: str, url: str, headers: Mapping[str, str], body: str | None) -> Exchange:
        method = method.upper()
        if method not in METHODS:
            raise ControlError("invalid_parameter", 400, f"method must be one of {', '.join(METHODS)}")
        if (bad := _CONTROL_CHARS.search(url)) is not None:
            raise ControlError(
                "invalid_url", 400, f"URL holds a control character ({bad.group()!r} at {bad.start()})"
            )
        try:
            target = URL(url)
        except ValueError as exc:
            raise ControlError("invalid_url", 400, f"invalid URL: {exc}") from None
        if target.scheme not in ("http", "https") or not target.host or target.user or target.password:
            raise ControlError("invalid_url", 400, "endpoint must be an http(s) URL without credentials")
        try:
            canonical_host(target.raw_host or "")  # the front door's rule (proxy/hosts.py), here too
        except NonCanonicalHost as exc:
            raise ControlError("non_canonical_host", 400, str(exc)) from None
        except HostError:
            pass  # left to the resolver, as for proxied requests
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in headers.items():
            if not _token(name) or any(c in value for c in "\r\n\x00"):
                raise ControlError(
                    "invalid_header", 400, f"header {name[:50]!r} has a forbidden name or value"
                )
            if name.lower() in hs.HOP_BY_HOP or name.lower() in ("host", "content-length"):
                continue
            out.add(name, value)
        data = body.encode() if body is not None else None
        if data is not None and method in ("POST", "PUT", "PATCH") and "Content-Type" not in out:
            out["Content-Type"] = "application/json"
        out["Via"] = hs.via_value(None, (1, 1))
        return Exchange(
            request_id=f"admin-{next(_ADMIN_REQUEST_IDS)}",
            method=method,
            url=target,
            headers=out,
            client_headers=CIMultiDictProxy(CIMultiDict(out)),
            body=data,
        )

    async def _bounded(self, coro: Any, timeout_ms: int) -> Any:
        """Limit the caller's wait, never the work: a payment in flight finishes and is recorded."""
        if not 1000 <= timeout_ms <= 60000:
            coro.close()
            raise ControlError("invalid_parameter", 400, "timeout_ms must be 1000..60000")
        task = asyncio.ensure_future(coro)
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_ms / 1000)
        except TimeoutError:
            raise ControlError(
                "timeout", 504, f"no answer within {timeout_ms} ms; any payment in flight is still recorded"
            ) from None
        except UpstreamError as exc:
            raise ControlError(exc.reason_code, exc.status, exc.message) from None


def _token(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name)


def _decimal_or_none(value: str | None, name: str) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = parse_decimal(value, what=name)
    except AmountError as exc:
        raise ControlError("invalid_parameter", 400, str(exc)) from None
    if amount <= 0:
        raise ControlError("invalid_parameter", 400, f"{name} must be positive")
    return amount


async def _collect(outcome: Outcome) -> FetchedResponse:
    response = outcome.response
    body = outcome.body
    truncated = False
    if body is None:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RETURNED_BODY:
                truncated = True
                break
        response.release()
        body = b"".join(chunks)
    if len(body) > MAX_RETURNED_BODY:
        body, truncated = body[:MAX_RETURNED_BODY], True
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("set-cookie",)]
    headers += outcome.proxy_headers()
    return FetchedResponse(response.status, headers, body.decode("utf-8", "replace"), truncated)


def _payment_json(record: PaymentRecord | None) -> dict[str, Any] | None:
    return None if record is None else _payment_dict(record)


def _payment_dict(record: PaymentRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "state": record.state.value,
        "amount": str(record.amount),
        "decimals": record.decimals,
        "asset": record.asset,
        "network": record.network,
        "pay_to": record.pay_to,
        "host": record.host,
        "method": record.method,
        "url": record.url,
        "scheme": record.scheme,
        "x402_version": record.x402_version,
        "tx_hash": record.tx_hash,
        "payer": record.payer,
        "reason": record.reason,
        "session_id": record.session_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "delivered": record.delivered,
        "chain_state": None if record.chain_state is None else record.chain_state.value,
        "presentations": record.presentations,
        "valid_before": record.valid_before,
        "evidence": _evidence(record.evidence),
        "approved_by": record.approved_by,
        "approved_at": record.approved_at,
        "refunded": str(record.refunded),
    }


def _refusal_dict(record: RefusalRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "created_at": record.created_at,
        "host": record.host,
        "method": record.method,
        "url": record.url,
        "reason": record.reason,
        "detail": record.detail,
        "amount": None if record.amount is None else str(record.amount),
        "decimals": record.decimals,
        "asset": record.asset,
        "network": record.network,
        "pay_to": record.pay_to,
        "payment_id": record.payment_id,
        "session_id": record.session_id,
    }


def _evidence(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
