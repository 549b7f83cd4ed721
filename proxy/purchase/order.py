"""What travels through the purchase flow: the order, the carrier that moves it, and the result.

A *carrier* is whatever brought the challenge and will take the payment back: an HTTP request answered
402 (`http.py`), or an MCP `tools/call` answered with a payment-required result. The flow asks it for
the challenge, has it present a payment, and reads the verdict it returns; it never sees bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Generic, Protocol, TypeVar

from proxy.payments.challenge import Challenge
from proxy.payments.payer import PassThrough, PaymentPlan, PaymentRequestInfo, Refused, Verdict
from proxy.sessions.model import Session
from proxy.sessions.scope import NormalizedURL, Scope
from proxy.store.base import PaymentRecord

Answer = TypeVar("Answer")
Answer_co = TypeVar("Answer_co")


@dataclass(frozen=True)
class SessionTerms:
    """What a session bought by this order gets (from a session rule or the control plane)."""

    ttl_seconds: int | None = None
    label: str | None = None
    max_session_payment: Decimal | None = None  # in the asset's units; None = no session cap


@dataclass(frozen=True)
class Order:
    """What is being bought, for whom, within which limits.

    `info` is what the payer decides on (request, need, caps). A session purchase also names the
    `scope` the payment will cover, the request's normal-form `url`, the session it renews (if any)
    and how many payments that session had when the order was made: a session that gained one since
    was renewed by another request, and this one uses it instead of paying again.
    """

    info: PaymentRequestInfo
    scope: Scope | None = None
    url: NormalizedURL | None = None
    renewing: Session | None = None
    payments_seen: int = 0
    terms: SessionTerms = field(default_factory=SessionTerms)
    # False for a session started on purpose (control plane): it opens its own scope even where
    # another session already covers the URL.
    reuse_sessions: bool = True

    @property
    def need(self) -> str:
        return self.info.need_key

    def renewing_session(self, session: Session) -> Order:
        from dataclasses import replace

        info = replace(self.info, session_id=session.id)
        return replace(self, info=info, renewing=session, payments_seen=len(session.payment_ids))


@dataclass(frozen=True)
class Presented(Generic[Answer]):
    """What came back for a presented payment: the carrier's answer and the verdict read from it."""

    answer: Answer
    verdict: Verdict
    # The paid answer's headers, for the credentials a session keeps (cookies, tokens); none over MCP.
    headers: Iterable[tuple[str, str]] = ()
    # 2xx/3xx: what was paid for reached us (a session is saved only then).
    success: bool = False


ChallengeRead = Challenge | Refused | PassThrough


class Carrier(Protocol[Answer_co]):
    """How one transport brings a challenge and takes a payment back."""

    async def challenge(self) -> ChallengeRead:
        """Read and parse the challenge in the current answer (bounded); a refusal says why not."""
        ...

    def evidence(self) -> tuple[Mapping[str, str], bytes]:
        """The challenge as it arrived (headers, body), for the refusal on record."""
        ...

    async def with_session(self, session: Session) -> bool:
        """Send again with a session another request bought: True when that answered (no challenge)."""
        ...

    async def present(self, plan: PaymentPlan) -> Presented[Answer_co]:
        """Send again with the payment; a transport failure raises (the flow records it in doubt)."""
        ...


@dataclass
class Purchase(Generic[Answer]):
    """What became of one order.

    `answer` is the paid answer (None when nothing was presented: the carrier's current answer stands).
    `record` is the payment's final ledger row; `refusal` why nothing was paid; `session` the session
    that was opened, renewed or reused; `unrecorded`: the payment left but its outcome could not be
    written (the ledger failed): it stays in doubt, and the client is told `ledger_unavailable`.
    """

    answer: Answer | None = None
    record: PaymentRecord | None = None
    plan: PaymentPlan | None = None
    refusal: Refused | None = None
    session: Session | None = None
    reused: bool = False
    unrecorded: bool = False
    challenge: Challenge | None = None
