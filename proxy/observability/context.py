"""Which request, session and payment a log line belongs to, carried by context variables.

The access-log stage sets the request id when a request enters the stages; the session and payment
stages add theirs. Each request runs in its own task, on its own copy of the context, so a
keep-alive connection never lends one request's ids to the next.
"""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("x402_request_id", default=None)
SESSION_ID: ContextVar[str | None] = ContextVar("x402_session_id", default=None)
PAYMENT_ID: ContextVar[int | None] = ContextVar("x402_payment_id", default=None)

CONTEXT_FIELDS = ("request_id", "session_id", "payment_id")


def current() -> dict[str, str | int]:
    """The ids that are set, by field name."""
    found: dict[str, str | int] = {}
    request_id = REQUEST_ID.get()
    if request_id is not None:
        found["request_id"] = request_id
    session_id = SESSION_ID.get()
    if session_id is not None:
        found["session_id"] = session_id
    payment_id = PAYMENT_ID.get()
    if payment_id is not None:
        found["payment_id"] = payment_id
    return found
