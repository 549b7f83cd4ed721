"""Approvals: a payment above a threshold waits for a person's yes or no before anything is signed.

``[policy] ask_above`` (also ``ask_above_hosts`` per host, and ``ask_above`` on a ``[[sessions.rules]]``
entry) names the price above which the payer asks. The request is held (the client simply waits) for
up to ``ask_timeout`` seconds; a decision comes from the dashboard, the CLI, the REST API or the MCP
tools, all through ``Approvals.decide``. Concurrent requests for one need share one approval. A "yes"
may be remembered for the host or for the need (its session scope) for some hours: later payments
covered by that grant are not asked about again (the policy and budgets still apply to each).

Nothing here signs or records money: the payer asks (`ask`) outside its lock, then decides again
under the lock with the approval in hand, and the ledger row records who approved and when.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("x402_proxy.approvals")

DEFAULT_ASK_TIMEOUT = 60.0
MAX_REMEMBER_HOURS = 720
RECENT = 200  # decided approvals kept for the list (memory only)
Via = Literal["ui", "cli", "api", "mcp"]
VIA: tuple[str, ...] = ("ui", "cli", "api", "mcp")


class ApprovalError(Exception):
    """`code`: approval_not_found (404) | approval_decided (409)."""

    def __init__(self, code: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Grant:
    """A remembered "yes": for a host, or for one need, until a time."""

    kind: Literal["host", "scope"]
    key: str
    until: float
    approval_id: str


@dataclass
class Approval:
    id: str
    need: str
    method: str
    url: str
    host: str
    price: str  # e.g. "0.10 (100000 atomic) of 0x… on eip155:84532 to 0x…"
    amount: int
    decimals: int
    asset: str
    network: str
    pay_to: str
    reason: str  # why a person is asked
    created_at: float
    expires_at: float
    state: Literal["waiting", "approved", "denied", "timeout"] = "waiting"
    decided_by: str | None = None
    decided_at: float | None = None
    remember: Grant | None = None
    waiters: int = 1
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "need": self.need,
            "method": self.method,
            "url": self.url,
            "host": self.host,
            "price": self.price,
            "amount": str(self.amount),
            "decimals": self.decimals,
            "asset": self.asset,
            "network": self.network,
            "pay_to": self.pay_to,
            "reason": self.reason,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
            "waiters": self.waiters,
            "remember": None
            if self.remember is None
            else {"for": self.remember.kind, "key": self.remember.key, "until": self.remember.until},
        }


@dataclass(frozen=True)
class Verdict:
    approved: bool
    approval: Approval

    @property
    def timed_out(self) -> bool:
        return self.approval.state == "timeout"


class Approvals:
    """The waiting room. One per process, used from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._waiting: dict[str, Approval] = {}  # id -> approval
        self._by_need: dict[str, str] = {}  # need -> id of the waiting approval
        self._recent: deque[Approval] = deque(maxlen=RECENT)
        self._grants: list[Grant] = []

    def granted(self, host: str, need: str) -> Grant | None:
        now = self._clock()
        self._grants = [g for g in self._grants if g.until > now]
        for grant in self._grants:
            if (grant.kind == "host" and grant.key == host) or (grant.kind == "scope" and grant.key == need):
                return grant
        return None

    async def ask(self, proposal: Approval) -> Verdict:
        """Wait for a decision on `proposal` (or on the approval already waiting for its need) until
        the waiting approval's `expires_at`."""
        existing_id = self._by_need.get(proposal.need)
        approval = self._waiting.get(existing_id) if existing_id else None
        if approval is None:
            approval = proposal
            self._waiting[approval.id] = approval
            self._by_need[approval.need] = approval.id
            log.warning(
                "approval %s: %s %s asks %s (%s); waiting up to %.0f s for a decision",
                approval.id,
                approval.method,
                approval.url,
                approval.price,
                approval.reason,
                approval.expires_at - approval.created_at,
            )
        else:
            approval.waiters += 1
        try:
            async with asyncio.timeout(max(0.0, approval.expires_at - self._clock())):
                await approval._done.wait()
        except TimeoutError:
            if approval.state == "waiting":
                self._close(approval, "timeout", None)
                log.warning("approval %s timed out: not paying", approval.id)
        return Verdict(approval.state == "approved", approval)

    def decide(
        self,
        approval_id: str,
        approve: bool,
        *,
        via: str = "api",
        remember_for: Literal["host", "scope"] | None = None,
        hours: float | None = None,
    ) -> Approval:
        approval = self._waiting.get(approval_id)
        if approval is None:
            if any(a.id == approval_id for a in self._recent):
                raise ApprovalError("approval_decided", 409, f"approval {approval_id} was already decided")
            raise ApprovalError("approval_not_found", 404, f"no approval {approval_id}")
        if approve and remember_for is not None:
            span = min(float(hours or 1), MAX_REMEMBER_HOURS) * 3600
            key = approval.host if remember_for == "host" else approval.need
            approval.remember = Grant(remember_for, key, self._clock() + span, approval.id)
            self._grants.append(approval.remember)
        self._close(approval, "approved" if approve else "denied", via)
        log.warning("approval %s %s via %s", approval.id, approval.state, via)
        return approval

    def describe_all(self) -> list[dict[str, Any]]:
        waiting = sorted(self._waiting.values(), key=lambda a: a.created_at)
        return [a.describe() for a in waiting] + [a.describe() for a in reversed(self._recent)]

    def _close(
        self, approval: Approval, state: Literal["approved", "denied", "timeout"], via: str | None
    ) -> None:
        approval.state = state
        approval.decided_by = via if state != "timeout" else "timeout"
        approval.decided_at = self._clock()
        self._waiting.pop(approval.id, None)
        if self._by_need.get(approval.need) == approval.id:
            del self._by_need[approval.need]
        self._recent.append(approval)
        approval._done.set()


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(6)
