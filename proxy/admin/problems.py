"""RFC 9457 problem details: every admin API error is `application/problem+json` with a stable `type`.

`type` is `urn:x402-proxy:<code>`; `code` repeats the code as an extension member so scripts need not
parse the URN. `detail` is a human sentence for this occurrence; it never carries a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:x402-proxy:"

# Codes the admin API itself raises, plus the control plane's and the payer's stable codes.
TITLES: dict[str, str] = {
    # transport, auth and input
    "unauthorized": "Missing or wrong bearer token",
    "not_found": "No such route",
    "bad_request": "Malformed HTTP request",
    "headers_too_large": "Request line or header too large",
    "method_not_allowed": "Method not allowed on this route",
    "invalid_json": "Request body is not valid JSON",
    "invalid_parameter": "A parameter is missing, has the wrong type or is out of range",
    "unknown_field": "The request has a field this route does not accept",
    "body_too_large": "Request body is too large",
    "unsupported_media_type": "Request body must be application/json",
    "not_ready": "The proxy is draining and takes no new work",
    "misdirected_request": "The Host header does not name this admin listener",
    "cross_origin": "A page on another origin may not use the admin API",
    "internal_error": "Internal error",
    # control plane
    "sessions_disabled": "Sessions are disabled",
    "session_not_found": "No such session",
    "session_ended": "The session has ended",
    "session_expired": "The session has expired",
    "invalid_url": "The URL is not an http(s) URL this proxy can fetch",
    "non_canonical_host": "The host is an IPv4 address in another form than its dotted quad",
    "invalid_header": "A header name or value is not allowed",
    "url_not_in_scope": "The URL is outside the session's scope",
    "payment_failed": "The payment was sent but the paid request failed; no session was opened",
    "timeout": "No answer in time",
    # payer refusals (nothing was paid)
    "over_request_cap": "The price is over max_payment",
    "over_max_per_payment": "The price is over the policy's max_per_payment",
    "network_not_allowed": "The network is not allowed by the policy",
    "asset_not_allowed": "The asset is not allowed by the policy",
    "scheme_not_supported": "No supported payment scheme was offered",
    "pay_to_not_allowed": "The recipient is not allowed by the policy",
    "host_not_allowed": "The host is not allowed by the policy",
    "budget_exhausted": "The daily budget is exhausted",
    "insufficient_balance": "The wallet balance is too low",
    "malformed_challenge": "The 402 challenge could not be understood",
    "body_too_large_to_replay": "The request body is too large to replay with a payment",
    "dry_run": "Dry run: nothing is signed",
    "no_wallet": "No wallet is configured",
    "payment_in_doubt": "An earlier payment for this request is in doubt",
    "zero_amount": "The challenge asks for a zero amount: nothing is signed",
    # upstream
    "upstream_error": "The upstream failed",
    "upstream_timeout": "The upstream did not answer in time",
    "upstream_bad_response": "The upstream sent an invalid response",
}


def problem_type(code: str) -> str:
    return f"{TYPE_PREFIX}{code}"


def problem_body(code: str, status: int, detail: str) -> dict[str, Any]:
    title = TITLES.get(code) or code.replace("_", " ").capitalize()
    return {"type": problem_type(code), "title": title, "status": status, "detail": detail, "code": code}


def problem_response(
    code: str, status: int, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(problem_body(code, status, detail)).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


class Problem(Exception):
    """Raised inside handlers; the error middleware turns it into a problem response."""

    def __init__(self, code: str, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> web.Response:
        return problem_response(self.code, self.status, self.detail, self.headers)
