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
        "ms": whole_micros(millis) / 1000,
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


def whole_micros(millis: float) -> int:
    """A duration in ms as whole microseconds, rounded half up: `ms` is logged to 3 decimals (cheaper
    than `round(millis, 3)`, which goes through a decimal string)."""
    return int(millis * 1000 + 0.5)


# The text `str(micros / 1000)` ends in, per value of micros % 1000: the digits after the point with
# no trailing zero ("5" for 500), as float repr writes a number with at most 3 decimals.
_FRACTIONS: tuple[str, ...] = tuple(f".{n:03d}".rstrip("0") if n else ".0" for n in range(1000))
# `f"{n:03d}"` for the milliseconds of a timestamp.
_MSECS: tuple[str, ...] = tuple(f"{n:03d}" for n in range(1000))


def ms_text(micros: int) -> str:
    """`str(micros / 1000)` for a non-negative count of microseconds below 10**15, built from two
    table lookups."""
    return f"{micros // 1000}{_FRACTIONS[micros % 1000]}"


def _elapsed(started: float) -> str:
    """`ms` of a line: the time since `started` (a perf_counter reading), as `fields_of` rounds it."""
    return ms_text(int((time.perf_counter() - started) * 1_000_000 + 0.5))


def _msecs(now: float) -> str:
    """The milliseconds of a timestamp, as `LogRecord.msecs` formatted with %03d."""
    return _MSECS[int((now - int(now)) * 1000)]


class _Second:
    """A timestamp's second as text, kept while the clock stays in it (they change once a second)."""

    __slots__ = ("convert", "fmt", "second", "text")

    def __init__(self, convert: Callable[[float], time.struct_time], fmt: str) -> None:
        self.convert, self.fmt, self.second, self.text = convert, fmt, -1, ""

    def of(self, now: float) -> str:
        second = int(now)
        if self.second != second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(now))
        return self.text


_plain_second = _Second(time.localtime, "%Y-%m-%d %H:%M:%S")  # local time, as logging's asctime
_json_second = _Second(time.gmtime, "%Y-%m-%dT%H:%M:%S")


def _plain(value: object) -> str:
    """`plain_value`, with the types no quoting ever applies to (digits, a dot, True/False) taken at once."""
    kind = type(value)
    if kind is int or kind is bool or kind is float:
        return str(value)
    return plain_value(value)


# (method, host, status, bytes) -> (the message, the "method ... bytes" run, ...) of a line, per format:
# the part of a line that depends on nothing else, built once per combination (a bounded cache).
_HeadKey = tuple[str, str, int, int | None]
_plain_heads: dict[_HeadKey, tuple[str, ...]] = {}
_json_heads: dict[_HeadKey, tuple[str, ...]] = {}
_HEADS_MAX = 4096


def _head(
    cache: dict[_HeadKey, tuple[str, ...]],
    done: CompletedRequest,
    build: Callable[[str, str, int, object], tuple[str, ...]],
) -> tuple[str, ...]:
    key = (done.method, done.host, done.status, done.bytes_sent)
    head = cache.get(key)
    if head is None:
        shown: object = done.bytes_sent if done.bytes_sent is not None else "-"
        head = build(done.method, shown_host(done.host), done.status, shown)
        if len(cache) >= _HEADS_MAX:
            cache.clear()
        cache[key] = head
    return head


def _plain_head(method: str, host: str, status: int, shown: object) -> tuple[str, ...]:
    """(message, fields run, and the usual line's text before its request id and before its `ms`)."""
    message = f"{method} {host} {status} {shown}"
    fields = f"method={plain_value(method)} host={plain_value(host)} status={status} bytes={_plain(shown)}"
    return message, fields, f" INFO x402_proxy.access {message} request_id=", f" {fields} ms="


def _json_head(method: str, host: str, status: int, shown: object) -> tuple[str, ...]:
    return (
        _json(f"{method} {host} {status} {shown}"),
        f'"method":{_json(method)},"host":{_json(host)},"status":{status},"bytes":{_json(shown)}',
    )


def plain_line(done: CompletedRequest, now: float) -> str:
    """The access line as `PlainFormatter` writes it, for a record created at `now`.

    The usual request (neither paid nor in a session, no error) is one f-string around a request id,
    a timestamp and `ms`, everything else kept per (method, host, status, bytes) by `_plain_head`.
    Request ids are the proxy's own ("<hex>-<n>", "admin-<n>"): never a character `plain_value` would
    quote.
    """
    request_id = REQUEST_ID.get()
    outcome = done.outcome
    if (
        request_id is not None
        and not done.error
        and (
            outcome is None
            or (outcome.session_id is None and outcome.payment_id is None and not outcome.error_code)
        )
        and SESSION_ID.get() is None
        and PAYMENT_ID.get() is None
    ):
        head = _head(_plain_heads, done, _plain_head)
        return (
            f"{_plain_second.of(now)},{_msecs(now)}{head[2]}{request_id}{head[3]}{_elapsed(done.started)}"
            " paid=False session=False\n"
        )
    return _plain_line_in_general(done, now, request_id)


def _plain_line_in_general(done: CompletedRequest, now: float, request_id: str | None) -> str:
    """`plain_line` of any request: in the order `fields_of` and the log context give (context ids
    first, then the fields, an id the stages reported replacing the context's value where both have it)."""
    session_id, payment_id, error = stage_ids(done.outcome, done.error)
    head = _head(_plain_heads, done, _plain_head)
    context_session, context_payment = SESSION_ID.get(), PAYMENT_ID.get()
    millis = _elapsed(done.started)
    msecs = _msecs(now)
    stamp = _plain_second.of(now)
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
    return f"{stamp},{msecs} INFO x402_proxy.access {head[0]} {' '.join(parts)}\n"


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
    msecs = _msecs(now)
    stamp = _json_second.of(now)
    parts = [f'{{"ts":"{stamp}.{msecs}Z","level":"info","logger":"x402_proxy.access","msg":{head[0]}']
    request_id, context_session, context_payment = REQUEST_ID.get(), SESSION_ID.get(), PAYMENT_ID.get()
    if request_id is not None:
        parts.append(f'"request_id":{_json(request_id)}')
    if context_session is not None:
        parts.append(f'"session_id":{_json(session_id if session_id is not None else context_session)}')
    if context_payment is not None:
        parts.append(f'"payment_id":{_json(payment_id if payment_id is not None else context_payment)}')
    parts.append(head[1])
    parts.append(f'"ms":{_elapsed(done.started)},"paid":{_json(payment_id is not None)}')
    parts.append(f'"session":{_json(session_id is not None)}')
    if error:
        parts.append(f'"error":{_json(error)}')
    if session_id is not None and context_session is None:
        parts.append(f'"session_id":{_json(session_id)}')
    if payment_id is not None and context_payment is None:
        parts.append(f'"payment_id":{_json(payment_id)}')
    return ",".join(parts) + "}\n"
