"""One line per proxied request: method, host, status, bytes, duration, and whether it was paid or
rode on a session (fields in docs/logs.md).

Two parts. `access_hook` is the request handler's completion hook: it writes the line once the answer
is out, so `bytes` counts what was written to the client and `ms` runs to the answer's last byte, and
requests refused before the stages (407, a bad target, self_target) get a line too. `access_stage` is
the outermost stage: it names the request in the log context, so every line logged while the stages
work on it carries its `request_id`.

The line is off the hot path: it is built as finished text (exactly what `logs.PlainFormatter` or
`logs.JsonFormatter` would make of the record, without a LogRecord, filters or handler locks) and
appended to the `LineWriter`, whose thread writes lines in batches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.request_handler import CompletedRequest, CompletionHook
from proxy.hosts import normalize_host
from proxy.observability.context import PAYMENT_ID, REQUEST_ID, SESSION_ID
from proxy.observability.logs import FIELDS_ATTR, access_sink, plain_value

log = logging.getLogger("x402_proxy.access")


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
    sink = access_sink()
    if sink is None:  # logging not configured by us (embedded use): an ordinary record

        def logged(done: CompletedRequest) -> None:
            size = done.bytes_sent
            _line(done.method, done.host, done.status, size, done.started, done.error, done.outcome)

        return logged
    writer, fmt = sink
    build = plain_line if fmt == "plain" else json_line
    enabled_for = log.isEnabledFor
    add = writer.add

    def completed(done: CompletedRequest) -> None:
        if enabled_for(logging.INFO):  # e.g. level = "warning": no line is built
            add(build(done, time.time()))

    return completed


def stage_ids(outcome: Outcome | None, error: str | None) -> tuple[str | None, str | None, str | None]:
    """(session id, payment id, error code) the stages decided (the outcome's fields); `error` (ours)
    wins over a stage's code."""
    if outcome is None:
        return None, None, error
    payment = outcome.payment_id
    return outcome.session_id, None if payment is None else str(payment), error or outcome.error_code


def shown_host(host: str | None) -> str:
    """The canonical host, as the policy and ledger name it; "-" for none."""
    return normalize_host(host) if host else "-"


def fields_of(
    method: str,
    host: str | None,
    status: int,
    size: int | None,
    millis: float,
    error: str | None,
    outcome: Outcome | None,
) -> tuple[str, dict[str, object]]:
    """(message, fields) of an access line: what docs/logs.md lists, in that order."""
    session_id, payment_id, error = stage_ids(outcome, error)
    host = shown_host(host)
    shown: object = size if size is not None else "-"
    fields: dict[str, object] = {
        "method": method,
        "host": host,
        "status": status,
        "bytes": shown,
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
    return f"{method} {host} {status} {shown}", fields


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
    message, fields = fields_of(method, host, status, size, millis, error, outcome)
    log.info("%s", message, extra={FIELDS_ATTR: fields})


# Timestamps change once a second: the formatted second is kept (local time for plain, UTC for json).
_plain_second: list[object] = [-1, ""]
_json_second: list[object] = [-1, ""]


def _stamp(cache: list[object], now: float, convert: Callable[[float], time.struct_time], fmt: str) -> str:
    second = int(now)
    if cache[0] != second:
        cache[0], cache[1] = second, time.strftime(fmt, convert(now))
    return str(cache[1])


def _plain(value: object) -> str:
    """`plain_value`, with the types no quoting ever applies to (digits, a dot, True/False) taken at once."""
    kind = type(value)
    if kind is int or kind is bool or kind is float:
        return str(value)
    return plain_value(value)


# (method, host, status, bytes) -> (the message, the "method ... bytes" run) of a line, per format: the
# part of a line that depends on nothing else, built once per combination (a bounded cache).
_HeadKey = tuple[str, str, int, int | None]
_plain_heads: dict[_HeadKey, tuple[str, str]] = {}
_json_heads: dict[_HeadKey, tuple[str, str]] = {}
_HEADS_MAX = 4096


def _head(
    cache: dict[_HeadKey, tuple[str, str]],
    done: CompletedRequest,
    build: Callable[[str, str, int, object], tuple[str, str]],
) -> tuple[str, str]:
    key = (done.method, done.host, done.status, done.bytes_sent)
    head = cache.get(key)
    if head is None:
        shown: object = done.bytes_sent if done.bytes_sent is not None else "-"
        head = build(done.method, shown_host(done.host), done.status, shown)
        if len(cache) >= _HEADS_MAX:
            cache.clear()
        cache[key] = head
    return head


def _plain_head(method: str, host: str, status: int, shown: object) -> tuple[str, str]:
    return (
        f"{method} {host} {status} {shown}",
        f"method={plain_value(method)} host={plain_value(host)} status={status} bytes={_plain(shown)}",
    )


def _json_head(method: str, host: str, status: int, shown: object) -> tuple[str, str]:
    return (
        _json(f"{method} {host} {status} {shown}"),
        f'"method":{_json(method)},"host":{_json(host)},"status":{status},"bytes":{_json(shown)}',
    )


def plain_line(done: CompletedRequest, now: float) -> str:
    """The access line as `PlainFormatter` writes it, for a record created at `now`.

    Built by hand in the order `fields_of` and the log context give (context ids first, then the
    fields, an id the stages reported replacing the context's value where both have it); the part
    that depends only on method, host, status and bytes is kept per combination.
    """
    session_id, payment_id, error = stage_ids(done.outcome, done.error)
    head = _head(_plain_heads, done, _plain_head)
    request_id, context_session, context_payment = REQUEST_ID.get(), SESSION_ID.get(), PAYMENT_ID.get()
    millis = round((time.perf_counter() - done.started) * 1000, 3)
    msecs = int((now - int(now)) * 1000)  # LogRecord.msecs
    stamp = _stamp(_plain_second, now, time.localtime, "%Y-%m-%d %H:%M:%S")
    if (
        request_id is not None
        and context_session is None
        and context_payment is None
        and session_id is None
        and payment_id is None
        and not error
    ):  # the usual request: neither paid nor in a session, no error
        return (
            f"{stamp},{msecs:03d} INFO x402_proxy.access {head[0]} request_id={plain_value(request_id)} "
            f"{head[1]} ms={millis} paid=False session=False\n"
        )
    parts: list[str] = []
    if request_id is not None:
        parts.append(f"request_id={plain_value(request_id)}")
    if context_session is not None:
        parts.append(f"session_id={plain_value(session_id if session_id is not None else context_session)}")
    if context_payment is not None:
        parts.append(f"payment_id={_plain(payment_id if payment_id is not None else context_payment)}")
    parts.append(head[1])
    parts.append(f"ms={millis} paid={payment_id is not None} session={session_id is not None}")
    if error:
        parts.append(f"error={plain_value(error)}")
    if session_id is not None and context_session is None:
        parts.append(f"session_id={plain_value(session_id)}")
    if payment_id is not None and context_payment is None:
        parts.append(f"payment_id={plain_value(payment_id)}")
    return f"{stamp},{msecs:03d} INFO x402_proxy.access {head[0]} {' '.join(parts)}\n"


def _json(value: object) -> str:
    """One value as `json.dumps(..., default=str)` writes it."""
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    return json.dumps(value if kind is str or kind is float else str(value))


def json_line(done: CompletedRequest, now: float) -> str:
    """The access line as `JsonFormatter` writes it, for a record created at `now` (built as `plain_line`)."""
    session_id, payment_id, error = stage_ids(done.outcome, done.error)
    head = _head(_json_heads, done, _json_head)
    msecs = int((now - int(now)) * 1000)
    stamp = _stamp(_json_second, now, time.gmtime, "%Y-%m-%dT%H:%M:%S")
    parts = [f'{{"ts":"{stamp}.{msecs:03d}Z","level":"info","logger":"x402_proxy.access","msg":{head[0]}']
    request_id, context_session, context_payment = REQUEST_ID.get(), SESSION_ID.get(), PAYMENT_ID.get()
    if request_id is not None:
        parts.append(f'"request_id":{_json(request_id)}')
    if context_session is not None:
        parts.append(f'"session_id":{_json(session_id if session_id is not None else context_session)}')
    if context_payment is not None:
        parts.append(f'"payment_id":{_json(payment_id if payment_id is not None else context_payment)}')
    parts.append(head[1])
    millis = round((time.perf_counter() - done.started) * 1000, 3)
    parts.append(f'"ms":{_json(millis)},"paid":{_json(payment_id is not None)}')
    parts.append(f'"session":{_json(session_id is not None)}')
    if error:
        parts.append(f'"error":{_json(error)}')
    if session_id is not None and context_session is None:
        parts.append(f'"session_id":{_json(session_id)}')
    if payment_id is not None and context_payment is None:
        parts.append(f'"payment_id":{_json(payment_id)}')
    return ",".join(parts) + "}\n"
