"""One line per proxied request: method, host, status, bytes, duration, and whether it was paid or
rode on a session (fields in docs/logs.md).

Two parts. `access_hook` is the request handler's completion hook: it writes the line once the answer
is out, so `bytes` counts what was written to the client and `ms` runs to the answer's last byte, and
requests refused before the stages (407, a bad target, self_target) get a line too. `access_stage` is
the outermost stage: it names the request in the log context, so every line logged while the stages
work on it carries its `request_id`.
"""

from __future__ import annotations

import logging
import time

from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.request_handler import CompletedRequest, CompletionHook
from proxy.hosts import normalize_host
from proxy.observability.context import PAYMENT_ID, REQUEST_ID, SESSION_ID
from proxy.observability.logs import FIELDS_ATTR

log = logging.getLogger("x402_proxy.access")

_SESSION_HEADER = "x-402-proxy-session"
_PAYMENT_HEADER = "x-402-proxy-payment"
_ERROR_HEADER = "x-402-proxy-error"


def access_stage(enabled: bool) -> object:
    """stage(inner) -> Exchanger: names the request in the log context (the access line itself is
    written by `access_hook`; `enabled` is kept for the wiring's symmetry and changes nothing here).

    Every proxied request runs in a task of its own, and a task works on a copy of the context: ids
    set here never leak into another request, so nothing needs resetting (that cost ~4 % of a small
    request's CPU).
    """

    def wrap(inner: Exchanger) -> Exchanger:
        async def named(request: Exchange) -> Outcome:
            REQUEST_ID.set(request.request_id)
            if SESSION_ID.get() is not None:
                SESSION_ID.set(None)
            if PAYMENT_ID.get() is not None:
                PAYMENT_ID.set(None)
            return await inner(request)

        return named

    return wrap


def access_hook(enabled: bool) -> CompletionHook | None:
    """The request handler's completion hook: the access line of a request whose answer is out (None: off)."""
    if not enabled:
        return None

    def completed(done: CompletedRequest) -> None:
        _line(done.method, done.host, done.status, done.bytes_sent, done.started, done.error, done.outcome)

    return completed


def _line(
    method: str,
    host: str | None,
    status: int,
    size: int | None,
    started: float,
    error: str | None,
    outcome: Outcome | None,
) -> None:
    if not log.isEnabledFor(logging.INFO):  # e.g. level = "warning": the line would be dropped anyway
        return
    millis = (time.perf_counter() - started) * 1000
    session_id = payment_id = None
    if outcome is not None:
        for name, value in outcome.extra_headers:  # a few at most: what the stages added
            lower = name.lower()
            if lower == _SESSION_HEADER:
                session_id = value
            elif lower == _PAYMENT_HEADER:
                payment_id = value
            elif lower == _ERROR_HEADER and error is None:
                error = value
    host = normalize_host(host) if host else "-"  # the canonical host, as the policy and ledger name it
    fields: dict[str, object] = {
        "method": method,
        "host": host,
        "status": status,
        "bytes": size if size is not None else "-",
        "ms": round(millis, 3),
        "paid": payment_id is not None,
        "session": session_id is not None,
    }
    if error:
        fields["error"] = error
    if session_id is not None:
        fields["session_id"] = session_id
    if payment_id is not None:
        fields["payment_id"] = payment_id
    log.info("%s %s %s %s", method, host, status, fields["bytes"], extra={FIELDS_ATTR: fields})
