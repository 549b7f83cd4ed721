"""The one place where a 402 becomes a payment.

Order of operations for ``on_402`` (each step can end it):

1. the request already carries a payment credential  -> PassThrough (never pay on top of one)
2. no x402 challenge                                  -> PassThrough
   malformed challenge                                -> Refused(malformed_challenge)
3. request body cannot be replayed                    -> Refused(body_too_large_to_replay)
4. no wallet (and not dry-run)                        -> Refused(no_wallet)
5. under one asyncio.Lock: read budgets and in-doubt payments from the ledger, decide (pure),
   then write the ledger row -- pending, durable -- or a dry_run row and Refused(dry_run).
   Serializing 5 means two concurrent 402s cannot both fit into a budget that fits one.
6. sign (CPU only), record Permit2's nonce if any      -> PaymentPlan

The engine sends the request again with the plan's header, then reports exactly one outcome:
``record_response`` or ``record_transport_failure``. A row is never signed twice: a retry needs a
new 402 and goes through all of the above. While an earlier payment for the same need is in doubt,
no new authorization is signed: the plan re-presents the identical stored payload (``represented``,
bounded, with backoff; see ``doubt.py``) or the 402 is refused with ``payment_in_doubt`` and a
Retry-After. A payment that settled but never delivered its answer refuses its need with
``payment_undelivered`` unless ``[policy] repay_undelivered``.

``StoreError`` propagates from ``on_402``: the ledger could not record the payment, so nothing was
signed; the engine should return the server's 402 to the client unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any, TypeVar

from proxy.faults import checkpoint
from proxy.observability.context import PAYMENT_ID
from proxy.payments.amounts import BUDGET_DECIMALS, to_budget_units
from proxy.payments.approvals import Approval, Approvals, new_approval_id
from proxy.payments.assets import AssetRegistry
from proxy.payments.challenge import Challenge, MalformedChallenge, parse_challenge
from proxy.payments.doubt import MAX_PRESENTATIONS, Blocked, Represent, judge, request_need
from proxy.payments.headers import CLIENT_PAYMENT_HEADERS, has_any_header
from proxy.payments.policy import (
    PaymentContext,
    Policy,
    PolicyConfig,
    ReasonCode,
    Refusal,
    Selection,
    candidate_assets,
    choose_requirement,
    host_allowed,
    normalize_host,
)
from proxy.payments.settlement import SettlementReceipt, read_evidence, read_settlement, rejection_reason
from proxy.payments.signer import (
    CLOCK_SKEW_ALLOWANCE,
    SigningError,
    new_payment_id,
    offers_payment_identifier,
)
from proxy.payments.wallet import Wallet
from proxy.purchase.schemes import scheme_for, signed_by_the_sdk
from proxy.store.base import (
    AsyncLedgerStore,
    LedgerStore,
    NewPayment,
    PaymentRecord,
    PaymentState,
    SpendTotals,
    StoreError,
)
from proxy.store.threaded import as_async
from proxy.warmup import SDK_PATH, load_off_loop, loaded

log = logging.getLogger("proxy.payments")
A = TypeVar("A")
B = TypeVar("B")

BUDGET_WINDOW_SECONDS = 24 * 3600  # budgets are rolling 24 h windows, not calendar days
MAX_REASON_CHARS = 500

BalanceLookup = Callable[[str, str], Awaitable[int | None]]
"""(CAIP-2 network, asset address) -> the wallet's balance in atomic units, or None if unknown."""


@dataclass(frozen=True)
class PaymentRequestInfo:
    method: str
    url: str
    host: str
    headers: Mapping[str, str]
    session_id: str | None = None
    # The most this one request may pay, in the asset's units (e.g. Decimal("0.05")), on top of the
    # policy; converted with the chosen asset's decimals (None = policy only).
    max_amount: Decimal | None = None
    # What the payment is for (doubt.scope_need for a session purchase); default: the request itself.
    need: str | None = None
    # A session rule's approval threshold in the asset's units, on top of the policy's ask_above.
    ask_above: Decimal | None = None
    # What the ledger row names as bought when it is not the requirement's resource (an MCP tool:
    # mcp://tool/NAME at the server `url`).
    resource: str | None = None

    @property
    def need_key(self) -> str:
        return self.need or request_need(self.method, self.url)


@dataclass(frozen=True)
class PassThrough:
    reason: str


@dataclass(frozen=True)
class Refused:
    reason_code: ReasonCode
    detail: str
    # dry_run: the row recording what would have been paid; in doubt / undelivered: the blocking row
    ledger_id: int | None = None
    retry_after: int | None = None  # seconds, for payment_in_doubt: when asking again may help


@dataclass(frozen=True)
class PaymentPlan:
    ledger_id: int
    header_name: str
    header_value: str
    record: PaymentRecord
    selection: Selection | None  # None when `represented`
    valid_before: int  # unix seconds; until then the signed authorization can settle
    # The identical payload of an in-doubt row, sent again: it can settle at most once on chain.
    represented: bool = False


PayerDecision = PassThrough | Refused | PaymentPlan


class Payer:
    def __init__(
        self,
        policy: Policy | PolicyConfig,
        assets: AssetRegistry,
        wallet: Wallet | None,
        store: LedgerStore | AsyncLedgerStore,
        clock: Callable[[], float] = time.time,
        *,
        balance_lookup: BalanceLookup | None = None,
        balance_timeout: float = 2.0,
        chain_checked: frozenset[str] = frozenset(),
        recheck_after: float = 60.0,
        approvals: Approvals | None = None,
    ) -> None:
        self.policy = policy if isinstance(policy, Policy) else Policy.compile(policy, assets.networks)
        self.assets = assets
        self.wallet = wallet
        # The ledger off the event loop (proxy/store/threaded.py); an async store (PostgreSQL) as it is.
        self.store = as_async(store)
        self.clock = clock
        self._balance_lookup = balance_lookup
        self._balance_timeout = balance_timeout
        # Networks with an [rpc] URL: there the chain, not the clock, releases a payment in doubt.
        self.chain_checked = chain_checked
        self._recheck_after = recheck_after
        self.approvals = approvals or Approvals(clock)
        self._lock = asyncio.Lock()
        # Payments that left but whose outcome could not be written (ledger locked, disk full): their
        # rows still say `pending`, so until a restart makes them `in_doubt` the in-doubt check asks here.
        self._unrecorded: dict[str, tuple[int, int]] = {}

    async def recover(self) -> list[PaymentRecord]:
        """Call once at startup: payments left pending by a crash are in doubt."""
        recovered = list(await self.store.recover_on_startup(now=self.clock()))
        for record in recovered:
            log.warning("payment #%s was pending at shutdown; it is in doubt", record.id)
        return recovered

    async def on_402(
        self,
        request: PaymentRequestInfo,
        status: int,
        resp_headers: Mapping[str, str],
        body: bytes,
        body_replayable: bool,
    ) -> PayerDecision:
        if has_any_header(request.headers, CLIENT_PAYMENT_HEADERS):
            return PassThrough("the request already carries a payment credential")
        try:
            challenge = parse_challenge(status, resp_headers, body, self.assets.networks)
        except MalformedChallenge as exc:
            return Refused(ReasonCode.MALFORMED_CHALLENGE, exc.detail)
        if challenge is None:
            return PassThrough("no x402 challenge in the response")
        if not body_replayable:
            return Refused(
                ReasonCode.BODY_TOO_LARGE_TO_REPLAY,
                "the request body was not buffered, so the paid request cannot be replayed",
            )
        return await self.decide(request, challenge)

    async def decide(self, request: PaymentRequestInfo, challenge: Challenge) -> PayerDecision:
        """A parsed challenge, whatever carried it (HTTP 402, an MCP tool result): refuse, re-present
        an in-doubt payload, or write the pending row and sign (steps 4-6 above)."""
        if has_any_header(request.headers, CLIENT_PAYMENT_HEADERS):
            return PassThrough("the request already carries a payment credential")
        if self.wallet is None and not self.policy.dry_run:
            return Refused(ReasonCode.NO_WALLET, "no wallet configured; the proxy cannot pay")

        if signed_by_the_sdk(challenge) and not loaded(SDK_PATH):
            await load_off_loop(SDK_PATH)  # Permit2/upto sign through the SDK: not a cold import on the loop
        balances = await self._balances(challenge)
        approved: Approval | None = None
        while True:
            # One decision at a time in this process, and across every replica on the same store:
            # two payments can never both fit into a budget that fits one.
            async with self._lock, self.store.payment_lock():
                now = self.clock()
                decided = await self._decide(request, challenge, now, balances)
                if not isinstance(decided, Selection):
                    return decided
                decision = decided
                ask = None if self.policy.dry_run else self._approval_needed(request, decision, approved)
                if ask is None:
                    if self.policy.dry_run:
                        new = self._new_payment(request, challenge, decision)
                        row = await self.store.insert_dry_run(new, now=now)
                        return Refused(
                            ReasonCode.DRY_RUN, f"dry run: would pay {decision.describe()}", row.id
                        )
                    assert self.wallet is not None
                    scheme = scheme_for(decision)
                    window = scheme.window(decision, now)
                    payment_id = new_payment_id() if offers_payment_identifier(challenge) else None
                    new = self._new_payment(
                        request,
                        challenge,
                        decision,
                        nonce=window.nonce,
                        valid_before=window.valid_before if window.nonce is not None else None,
                        payment_id=payment_id,
                    )
                    new = replace(
                        new, need=request.need_key, **self._approval_fields(request, decision, approved)
                    )
                    record = await self.store.insert_pending(
                        new, now=now
                    )  # durable before anything is signed
                    PAYMENT_ID.set(record.id)  # log lines of this request name its payment
                    break
            # Outside the lock: other payments go on while a person decides about this one.
            if approved is not None:  # approved, then the price changed under us: never loop on a person
                return Refused(
                    ReasonCode.APPROVAL_DENIED, "the price changed after it was approved; not paying"
                )
            verdict = await self.approvals.ask(self._proposal(request, decision, ask, now))
            if not verdict.approved:
                code = ReasonCode.APPROVAL_TIMEOUT if verdict.timed_out else ReasonCode.APPROVAL_DENIED
                return Refused(code, f"approval {verdict.approval.id}: {verdict.approval.state}")
            approved = verdict.approval

        checkpoint("payment.pending_written")
        try:
            header = scheme.sign(challenge, decision, self.wallet, now, payment_id, window)
        except Exception as exc:
            # Nothing left the process: close the row so it neither blocks nor counts.
            detail = str(exc) if isinstance(exc, SigningError) else f"{type(exc).__name__}: {exc}"
            await self.store.mark_rejected(record.id, reason=_clip(f"not signed: {detail}"), now=self.clock())
            return Refused(ReasonCode.SCHEME_NOT_SUPPORTED, detail)
        if record.nonce != header.nonce or record.valid_before != header.valid_before:
            # Permit2 / upto: the SDK drew the nonce and deadline; record them before the header leaves.
            record = await self.store.set_authorization(
                record.id, nonce=header.nonce, valid_before=header.valid_before, now=self.clock()
            )
        # Kept before it leaves: a payment in doubt is presented again exactly as it was, never re-signed.
        record = await self.store.record_presentation(
            record.id, header_name=header.name, header_value=header.value, now=self.clock()
        )
        log.info("paying #%s: %s for %s %s", record.id, decision.describe(), request.method, request.url)
        return PaymentPlan(record.id, header.name, header.value, record, decision, header.valid_before)

    async def _decide(
        self,
        request: PaymentRequestInfo,
        challenge: Challenge,
        now: float,
        balances: Mapping[tuple[str, str], int] | None,
    ) -> Refused | PaymentPlan | Selection:
        """Under the lock: a re-presentation, a refusal, or the requirement to pay (nothing written)."""
        # The doubt check and the budgets are independent reads: asked at once (on PostgreSQL, three
        # queries on three pool connections instead of three round trips in a row).
        doubt, context = await _both(
            self._doubt(request, challenge, now), self._context(request, now, balances)
        )
        if isinstance(doubt, Represent):
            return await self._represent(request, doubt.record, now)
        if isinstance(doubt, Blocked) and host_allowed(normalize_host(request.host), self.policy):
            log.info("not paying %s %s: %s (%s)", request.method, request.url, doubt.code, doubt.detail)
            return Refused(doubt.code, doubt.detail, doubt.record.id, retry_after=doubt.retry_after)
        decision = choose_requirement(challenge, self.policy, self.assets, context)
        if not isinstance(decision, Refusal) and request.max_amount is not None:
            cap = int(request.max_amount.scaleb(decision.asset.decimals).to_integral_value(ROUND_FLOOR))
            if decision.amount > cap:
                decision = Refusal(
                    ReasonCode.OVER_REQUEST_CAP,
                    f"price {decision.describe()} exceeds this request's cap of {request.max_amount}",
                    decision.requirement.index,
                )
        if isinstance(decision, Refusal):
            log.info(
                "not paying %s %s: %s (%s)",
                request.method,
                request.url,
                decision.reason_code,
                decision.detail,
            )
            return Refused(decision.reason_code, decision.detail)
        return decision

    def _ask_threshold(self, request: PaymentRequestInfo) -> int | None:
        """The lowest approval threshold that applies, in budget units (None: never ask)."""
        limits = [self.policy.ask_above_hosts.get(normalize_host(request.host), self.policy.ask_above)]
        if request.ask_above is not None:  # a session rule's
            limits.append(int(request.ask_above.scaleb(BUDGET_DECIMALS)))
        present = [limit for limit in limits if limit is not None]
        return min(present) if present else None

    def _above_threshold(self, request: PaymentRequestInfo, selection: Selection) -> int | None:
        limit = self._ask_threshold(request)
        price = to_budget_units(selection.amount, selection.asset.decimals)
        return limit if limit is not None and price > limit else None

    def _approval_needed(
        self, request: PaymentRequestInfo, selection: Selection, approved: Approval | None
    ) -> str | None:
        """Why a person must say yes first (None: no need, or already approved for this very price)."""
        limit = self._above_threshold(request, selection)
        if limit is None:
            return None
        if approved is not None and (approved.amount, approved.pay_to) == (
            selection.amount,
            selection.requirement.pay_to,
        ):
            return None
        if self.approvals.granted(normalize_host(request.host), request.need_key) is not None:
            return None
        threshold = Decimal(limit).scaleb(-BUDGET_DECIMALS).normalize()
        return f"price {selection.describe()} is above ask_above {threshold}"

    def _approval_fields(
        self, request: PaymentRequestInfo, selection: Selection, approved: Approval | None
    ) -> dict[str, Any]:
        """What the ledger row records about the approval that let it through, if one was needed."""
        if approved is not None:
            return {"approved_by": approved.decided_by, "approved_at": approved.decided_at}
        if self._above_threshold(request, selection) is None:
            return {}
        grant = self.approvals.granted(normalize_host(request.host), request.need_key)
        assert grant is not None  # _approval_needed let it through without asking
        return {"approved_by": f"grant {grant.approval_id} ({grant.kind})", "approved_at": self.clock()}

    def _proposal(
        self, request: PaymentRequestInfo, selection: Selection, reason: str, now: float
    ) -> Approval:
        requirement = selection.requirement
        return Approval(
            id=new_approval_id(),
            need=request.need_key,
            method=request.method.upper(),
            url=request.url,
            host=normalize_host(request.host),
            price=selection.describe(),
            amount=selection.amount,
            decimals=selection.asset.decimals,
            asset=requirement.asset,
            network=selection.network.caip2,
            pay_to=requirement.pay_to,
            reason=reason,
            created_at=now,
            expires_at=now + self.policy.ask_timeout,
        )

    async def _doubt(
        self, request: PaymentRequestInfo, challenge: Challenge, now: float
    ) -> Blocked | Represent | None:
        rows = await self.store.find_blocking(request.method, request.url, request.need_key)
        newest_in_doubt = next(
            (r for r in rows if r.state is PaymentState.IN_DOUBT and not r.delivered), None
        )
        has_payload = (
            newest_in_doubt is not None and await self.store.presented_header(newest_in_doubt.id) is not None
        )
        return judge(
            rows,
            challenge,
            now,
            chain_checked=self.chain_checked,
            repay_undelivered=self.policy.repay_undelivered,
            has_payload=has_payload,
            recheck_after=self._recheck_after,
            method=request.method,
            url=request.url,
        )

    async def _represent(self, request: PaymentRequestInfo, row: PaymentRecord, now: float) -> PaymentPlan:
        """The in-doubt row's identical header, counted before it leaves again."""
        stored = await self.store.presented_header(row.id)
        assert stored is not None and row.valid_before is not None
        record = await self.store.record_presentation(
            row.id, header_name=stored[0], header_value=stored[1], now=now
        )
        PAYMENT_ID.set(record.id)
        log.info(
            "presenting payment #%s again (%s of at most %s) for %s %s: it is in doubt, never re-signed",
            record.id,
            record.presentations,
            MAX_PRESENTATIONS,
            request.method,
            request.url,
        )
        return PaymentPlan(record.id, stored[0], stored[1], record, None, row.valid_before, represented=True)

    async def record_response(
        self, plan: PaymentPlan, status: int, resp_headers: Mapping[str, str], body: bytes | None = None
    ) -> PaymentRecord:
        """Record how the server answered the paid request."""
        return await self.record_verdict(plan, settlement_verdict(status, resp_headers, body))

    async def record_verdict(self, plan: PaymentPlan, verdict: Verdict) -> PaymentRecord:
        """Write a verdict (see `settlement_verdict`) to the payment's ledger row."""
        try:
            return await self._write_verdict(plan, verdict)
        except StoreError:
            self._remember_unrecorded(plan)
            raise

    def _remember_unrecorded(self, plan: PaymentPlan) -> None:
        log.error("payment #%s left but its outcome is not recorded; it stays in doubt", plan.ledger_id)
        self._unrecorded[plan.record.need or request_need(plan.record.method, plan.record.url)] = (
            plan.ledger_id,
            plan.valid_before,
        )

    async def _write_verdict(self, plan: PaymentPlan, verdict: Verdict) -> PaymentRecord:
        now = self.clock()
        store = self.store
        state, reason = verdict.state, verdict.reason or ""
        if plan.represented and state in (PaymentState.REJECTED, PaymentState.UNSETTLED):
            # A refusal of a payload sent before proves nothing: the first send may have settled it.
            state, reason = PaymentState.IN_DOUBT, f"presented again, refused: {reason}"
        try:
            if verdict.evidence:
                await store.add_evidence(plan.ledger_id, verdict.evidence)
            if state is PaymentState.SETTLED:
                return await store.mark_settled(
                    plan.ledger_id,
                    tx_hash=verdict.tx_hash,
                    payer=verdict.payer,
                    reason=verdict.reason,
                    now=now,
                )
            if state is PaymentState.SETTLED_UNDELIVERED:
                record = await store.mark_settled_undelivered(
                    plan.ledger_id, reason=reason, tx_hash=verdict.tx_hash, now=now
                )
                log_undelivered(record)
                return record
            if state is PaymentState.IN_DOUBT and plan.represented:
                record = await store.note_in_doubt(
                    plan.ledger_id, reason=_clip(reason), tx_hash=verdict.tx_hash, now=now
                )
                log.warning("payment #%s is still in doubt: %s", record.id, reason)
                return record
            if state is PaymentState.IN_DOUBT:
                record = await store.mark_in_doubt(
                    plan.ledger_id,
                    reason=_clip(reason),
                    tx_hash=verdict.tx_hash,
                    delivered=verdict.delivered,
                    now=now,
                )
                log.warning("payment #%s is in doubt: %s", record.id, reason)
                return record
            if state is PaymentState.REJECTED:
                return await store.mark_rejected(plan.ledger_id, reason=reason, now=now)
            return await store.mark_unsettled(plan.ledger_id, reason=reason, now=now)
        except StoreError as exc:
            if exc.kind != "transition":
                raise
            log.warning("payment #%s already recorded: %s", plan.ledger_id, exc)
            current = await store.get(plan.ledger_id)
            assert current is not None
            return current

    async def record_transport_failure(self, plan: PaymentPlan, error: BaseException | str) -> PaymentRecord:
        """The paid request failed in transit: the payment may or may not settle. Never re-sign it."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            return await self.store.mark_in_doubt(
                plan.ledger_id,
                reason=_clip(f"transport failure after sending payment: {text}"),
                now=self.clock(),
            )
        except StoreError as exc:
            if exc.kind != "transition":
                self._remember_unrecorded(plan)
                raise
            current = await self.store.get(plan.ledger_id)
            assert current is not None
            return current

    # -- helpers ----------------------------------------------------------------------------------

    async def _context(
        self, request: PaymentRequestInfo, now: float, balances: Mapping[tuple[str, str], int] | None
    ) -> PaymentContext:
        host = normalize_host(request.host)
        in_doubt_id = self._unrecorded_in_doubt(request, now - CLOCK_SKEW_ALLOWANCE)
        spent_global, spent_host = await _both(self._spent(now, None), self._spent(now, host))
        return PaymentContext(
            host=host,
            url=request.url,
            now=now,
            spent_today_global=spent_global,
            spent_today_host=spent_host,
            balances=balances,
            in_doubt_payment_id=in_doubt_id,
        )

    def _unrecorded_in_doubt(self, request: PaymentRequestInfo, still_valid_at: float) -> int | None:
        key = request.need_key
        entry = self._unrecorded.get(key)
        if entry is None:
            return None
        if entry[1] <= still_valid_at:  # the authorization has expired: it can no longer settle
            del self._unrecorded[key]
            return None
        return entry[0]

    async def _spent(self, now: float, host: str | None) -> int:
        since = now - BUDGET_WINDOW_SECONDS
        units = spend_in_budget_units(
            await self.store.spent_since(since, host, now=now, chain_checked=self.chain_checked)
        )
        if self.policy.dry_run:
            # A dry run counts its own simulated payments, so it shows when the budget would run out.
            dry = await self.store.list(state=PaymentState.DRY_RUN, host=host, since=since, limit=10_000)
            units += sum(to_budget_units(r.amount, r.decimals) for r in dry)
        return units

    async def _balances(self, challenge: Challenge) -> Mapping[tuple[str, str], int] | None:
        if self._balance_lookup is None or self.wallet is None:
            return None
        pairs = candidate_assets(challenge, self.policy, self.assets)
        if not pairs:
            return None
        lookup = self._balance_lookup

        async def one(network: str, asset: str) -> int | None:
            try:
                return await asyncio.wait_for(lookup(network, asset), self._balance_timeout)
            except Exception as exc:  # advisory: an unreachable RPC must not block payment
                log.debug("balance lookup for %s on %s failed: %s", asset, network, exc)
                return None

        results = await asyncio.gather(*(one(n, a) for n, a in pairs))
        return {pair: value for pair, value in zip(pairs, results, strict=True) if value is not None}

    def _new_payment(
        self,
        request: PaymentRequestInfo,
        challenge: Challenge,
        selection: Selection,
        *,
        nonce: str | None = None,
        valid_before: int | None = None,
        payment_id: str | None = None,
    ) -> NewPayment:
        requirement = selection.requirement
        return NewPayment(
            amount=selection.amount,
            decimals=selection.asset.decimals,
            asset=requirement.asset,
            network=selection.network.caip2,
            pay_to=requirement.pay_to,
            host=normalize_host(request.host),
            method=request.method.upper(),
            url=request.url,
            x402_version=challenge.version,
            scheme=requirement.scheme,
            resource=request.resource or requirement.resource_url or challenge.resource_url,
            nonce=nonce,
            valid_before=valid_before,
            payment_id=payment_id,
            payer=self.wallet.address if self.wallet else None,
            session_id=request.session_id,
        )


@dataclass(frozen=True)
class Verdict:
    """What the paid answer says became of the payment: the ledger state to record, and its details."""

    state: PaymentState  # SETTLED, SETTLED_UNDELIVERED, IN_DOUBT, REJECTED or UNSETTLED
    tx_hash: str | None = None
    payer: str | None = None
    reason: str | None = None
    delivered: bool = False  # the answer is a success (< 400): the client gets what was paid for
    evidence: str | None = None  # extension results (offer-receipt, EXTENSION-RESPONSES) as JSON


def settlement_verdict(status: int, resp_headers: Mapping[str, str], body: bytes | None) -> Verdict:
    """Read the paid answer (status, settlement receipt, 402 reason) into a verdict. Pure.

    `settled` needs a success answer naming a transaction. Whatever names a transaction without
    success, claims success without one, or serves the resource without a receipt is in doubt: the
    chain decides (reconcile.py). A refusal naming no transaction is the server's word that nothing
    moved (rejected/unsettled; budgets keep counting it until the chain agrees or it expires).
    """
    receipt = read_settlement(resp_headers)
    return verdict_for(
        status,
        receipt,
        read_evidence(resp_headers, receipt),
        lambda: rejection_reason(resp_headers, body),
    )


def verdict_for(
    status: int,
    receipt: SettlementReceipt | None,
    evidence: str | None,
    rejected_because: Callable[[], str],
) -> Verdict:
    """`settlement_verdict` for any carrier: a status (HTTP, or what an MCP answer amounts to), the
    receipt, the evidence, and where the reason for a refusal (402 again) is read from."""
    delivered = status < 400
    tx = receipt.transaction if receipt is not None else None
    if receipt is not None and receipt.success is True and tx:
        if delivered:
            return Verdict(PaymentState.SETTLED, tx, receipt.payer, delivered=True, evidence=evidence)
        reason = f"HTTP {status} although the receipt says settled in tx {tx}"
        return Verdict(PaymentState.SETTLED_UNDELIVERED, tx, receipt.payer, _clip(reason), evidence=evidence)
    if tx:
        why = receipt.error_reason if receipt is not None and receipt.error_reason else "no success"
        reason = f"HTTP {status}; transaction {tx} named without success ({why})"
        return Verdict(
            PaymentState.IN_DOUBT, tx, receipt.payer if receipt else None, _clip(reason), delivered, evidence
        )
    if receipt is not None and receipt.success is True:
        reason = f"HTTP {status}; the receipt claims success but names no transaction"
        return Verdict(PaymentState.IN_DOUBT, None, receipt.payer, reason, delivered, evidence)
    if delivered:
        # Served: the need was met; whether money moved only the chain can say.
        failed = receipt is not None and receipt.success is False
        what = (
            f"settlement failed: {receipt.error_reason or 'no reason given'}"
            if failed and receipt
            else "without a settlement receipt"
        )
        return Verdict(
            PaymentState.IN_DOUBT, reason=_clip(f"HTTP {status} {what}"), delivered=True, evidence=evidence
        )
    if status == 402:
        reason = receipt.error_reason if receipt and receipt.error_reason else rejected_because()
        return Verdict(PaymentState.REJECTED, reason=_clip(reason), evidence=evidence)
    if receipt is not None and receipt.success is False:
        reason = f"HTTP {status}; settlement failed: {receipt.error_reason or 'no reason given'}"
        return Verdict(PaymentState.UNSETTLED, reason=_clip(reason), evidence=evidence)
    return Verdict(
        PaymentState.UNSETTLED, reason=f"HTTP {status} without a settlement receipt", evidence=evidence
    )


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Two independent awaits at once; the first failure is raised once both have finished."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for result in (one, two):
        if isinstance(result, BaseException):
            raise result
    return one, two  # type: ignore[return-value]


def log_undelivered(record: PaymentRecord) -> None:
    """The one log line a person needs to claim delivery from the seller (or allow the repay)."""
    log.warning(
        "payment #%s settled_undelivered: %s %s moved to %s in tx %s, but the answer never reached the "
        "client; not repaid automatically ([policy] repay_undelivered)",
        record.id,
        record.amount,
        record.asset,
        record.pay_to,
        record.tx_hash or "(unknown)",
    )


def spend_in_budget_units(totals: SpendTotals) -> int:
    return sum(to_budget_units(amount, decimals) for (_n, _a, decimals), amount in totals.by_asset.items())


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
