"""Holding batch-settlement channels as sessions: the one place a channel is opened, used and ended.

    open      a 402 offering batch-settlement (and `[channels] enabled`): policy on the price *and* on
              the deposit (max_deposit, budgets: the deposit is committed money), the deposit's ledger
              row (pending, durable) BEFORE anything is signed, the channel row, the SDK's deposit
              payload (deposit + first voucher), the first voucher's amount persisted, then the purchase
              flow presents it and opens the session (`PurchaseFlow._pay`: session saved, row final)
    request   a session hit of a channel session: under the channel's lock, the next cumulative voucher
              (never above the deposit or the policy's max_per_payment per request), its amount
              persisted before it is sent; a corrective 402 (`channelState`) is accepted only when the
              server's charged amount is at most what we signed and the deposit, then retried once
    end       session ended (REST/CLI/MCP), expired (TTL), or the channel exhausted / found without a
              session after a restart: the SDK's cooperative refund; the row keeps deposit, claimed,
              refunded and net spend

No ledger row per voucher: the deposit's row already counts the whole deposit against the budgets.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR
from typing import TYPE_CHECKING, Any

from proxy.channels.book import BookStorage, Channel, ChannelBook
from proxy.channels.settings import ChannelSettings
from proxy.channels.vouchers import PaymentHeader, VoucherSigner, voucher_payload
from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.payments.amounts import parse_decimal, to_budget_units
from proxy.payments.challenge import Challenge, MalformedChallenge, Requirement, challenge_from_document
from proxy.payments.doubt import Blocked
from proxy.payments.payer import BUDGET_WINDOW_SECONDS, PaymentPlan, PaymentRequestInfo, Refused
from proxy.payments.policy import Policy, ReasonCode, Refusal, Selection, choose_requirement
from proxy.purchase.order import Answer, Carrier, ChallengeRead, Order, Presented, Purchase
from proxy.store.base import PaymentState, StoreError

if TYPE_CHECKING:
    from proxy.payments.payer import Payer
    from proxy.purchase.flow import PurchaseFlow
    from proxy.sessions.manager import SessionManager
    from proxy.sessions.model import Session

log = logging.getLogger("x402_proxy.channels")

SCHEME = "batch-settlement"
HEADER = "PAYMENT-SIGNATURE"
_CORRECTABLE = (
    "invalid_batch_settlement_evm_cumulative_amount_mismatch",
    "invalid_batch_settlement_evm_cumulative_below_claimed",
)
_BUSY = "invalid_batch_settlement_evm_channel_busy"


def offered(challenge: Challenge) -> Requirement | None:
    """The challenge's first batch-settlement requirement (V2 only)."""
    if challenge.version != 2:
        return None
    return next((r for r in challenge.requirements if r.scheme == SCHEME), None)


@dataclass
class _Live:
    """An open channel in memory: its row, the SDK scheme holding its salt, a lock."""

    row: Channel
    scheme: Any
    requirements: Any
    lock: asyncio.Lock
    # Built on its first voucher (proxy/channels/vouchers.py): the payload's channelConfig dict and the
    # channel id as the SDK spells it.
    config: dict[str, Any] | None = None
    sdk_channel_id: str | None = None
    header: PaymentHeader | None = None


class ChannelHolder:
    def __init__(
        self,
        settings: ChannelSettings,
        payer: Payer,
        manager: SessionManager | None,
        book: ChannelBook,
        rpc_url: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.payer = payer
        self.manager = manager
        self.book = book
        self.storage = BookStorage(book)
        self.answers = BookStorage(book, answers=True)  # a voucher's answer, processed on the loop
        self.rpc_url = rpc_url
        self.clock = clock
        self._live: dict[str, _Live] = {}  # channel id -> open channel
        self._by_session: dict[str, str] = {}  # session id -> its current channel id
        self._opening: dict[str, _Live] = {}  # deposited, its session not linked yet
        self._deposits: dict[str, int] = {}  # channel id -> the deposit its ledger row names
        self._refund_failures: dict[str, int] = {}
        self._refunding: dict[str, asyncio.Lock] = {}  # channel id -> one refund at a time
        # The policy the open channels were last checked against (None: not yet, e.g. after a restart);
        # a reload swaps payer.policy, and the next sweep ends the channels whose deposit no longer fits.
        self._policy_checked: Policy | None = None
        self._signer: Any = None
        self._vouchers: dict[str, VoucherSigner] = {}  # network -> its voucher signer

    # -- construction -------------------------------------------------------------------------------

    def _sdk_signer(self) -> Any:
        if self._signer is None:
            assert self.payer.wallet is not None
            from x402.mechanisms.evm.signers import EthAccountSigner, EthAccountSignerWithRPC

            account = self.payer.wallet.account
            self._signer = (
                EthAccountSignerWithRPC(account, self.rpc_url) if self.rpc_url else EthAccountSigner(account)
            )
        return self._signer

    def _scheme(self, salt: str) -> Any:
        from x402.mechanisms.evm.batch_settlement.client import (
            BatchSettlementEvmScheme,
            BatchSettlementEvmSchemeOptions,
        )

        def strategy(ctx: Any) -> str | bool:
            # Never a top-up (money without a ledger row): only the deposit our row names, once.
            if ctx.client_context.balance and int(ctx.client_context.balance) > 0:
                return False
            amount = self._deposits.get(str(ctx.channel_id).lower())
            return False if amount is None else str(amount)

        options = BatchSettlementEvmSchemeOptions(storage=self.storage, salt=salt, deposit_strategy=strategy)
        return BatchSettlementEvmScheme(self._sdk_signer(), options)

    def recover(self) -> None:
        """At startup: open channels back in memory; a deposit whose answer was never seen is refunded
        (the SDK's refund reads the chain; nothing deposited means nothing to refund: `void`)."""
        from x402.schemas.helpers import parse_payment_requirements

        for row in self.book.in_state("opening"):
            log.warning("channel %s was opening at shutdown; refunding what it may hold", row.channel_id)
            self.book.update(row.channel_id, state="closing", detail="recovered while opening")
        for row in self.book.in_state("open"):
            requirements = parse_payment_requirements(2, row.requirements)
            self._live[row.channel_id] = _Live(row, self._scheme(row.salt), requirements, asyncio.Lock())
            if row.session_id is not None:
                self._by_session[row.session_id] = row.channel_id
            else:
                self.book.update(row.channel_id, state="closing", detail="recovered without a session")
                del self._live[row.channel_id]
        if self._live:
            log.info("recovered %d open channels", len(self._live))

    # -- open ---------------------------------------------------------------------------------------

    def wants(self, challenge: Challenge) -> Requirement | None:
        return offered(challenge) if self.settings.enabled and self.payer.wallet is not None else None

    def deposit_for(self, price: int, decimals: int, extra: Mapping[str, Any]) -> int:
        if self.settings.deposit_amount:
            amount = parse_decimal(self.settings.deposit_amount, what="deposit_amount").scaleb(decimals)
            deposit = int(amount.to_integral_value(ROUND_FLOOR))
        else:
            deposit = int(self.settings.deposit_prices) * price
        floor = extra.get("minDeposit")
        if isinstance(floor, str | int) and str(floor).isdigit():
            deposit = max(deposit, int(floor))
        return max(deposit, price)

    async def _policy(
        self,
        info: PaymentRequestInfo,
        challenge: Challenge,
        req: Requirement,
        now: float,
        *,
        deposit: int | None = None,
        counted: int = 0,
    ) -> tuple[Selection, int] | Refused:
        """The price through the whole policy, then the deposit through it again (max_deposit for
        max_per_payment): network, asset, recipient, budgets with the deposit as committed money.
        `deposit`: an open channel's own (else the one deposit_for sizes); `counted`: budget units of
        it the window already counts (an open channel's deposit row), taken out of the spent sums."""
        payer = self.payer
        ctx = await payer._context(info, now, None)
        if counted:
            ctx = replace(
                ctx,
                spent_today_global=max(0, ctx.spent_today_global - counted),
                spent_today_host=max(0, ctx.spent_today_host - counted),
            )
        as_exact = replace(req, scheme="exact", index=0)
        price_check = choose_requirement(
            replace(challenge, requirements=(as_exact,)), payer.policy, payer.assets, ctx
        )
        if isinstance(price_check, Refusal):
            return Refused(price_check.reason_code, f"channel price: {price_check.detail}")
        decimals = price_check.asset.decimals
        if deposit is None:
            deposit = self.deposit_for(req.amount, decimals, req.extra)
        cap_units = to_budget_units(
            int(parse_decimal(self.settings.max_deposit, what="max_deposit").scaleb(decimals)), decimals
        )
        if info.max_amount is not None:
            cap_units = min(cap_units, to_budget_units(int(info.max_amount.scaleb(decimals)), decimals))
        policy = replace(payer.policy, max_per_payment=cap_units)
        deposit_check = choose_requirement(
            replace(challenge, requirements=(replace(as_exact, amount=deposit),)), policy, payer.assets, ctx
        )
        if isinstance(deposit_check, Refusal):
            return Refused(deposit_check.reason_code, f"channel deposit: {deposit_check.detail}")
        return deposit_check, deposit

    async def open(
        self,
        flow: PurchaseFlow,
        order: Order,
        challenge: Challenge,
        req: Requirement,
        carrier: Carrier[Answer],
    ) -> Purchase[Answer]:
        """Deposit and the first voucher for `order` (the purchase flow's challenge step handed it here)."""
        from x402.http.utils import encode_payment_signature_header
        from x402.mechanisms.evm.batch_settlement.encoding import build_erc3009_deposit_nonce
        from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
        from x402.schemas import PaymentPayload
        from x402.schemas.helpers import parse_payment_requirements

        payer, info = self.payer, order.info
        async with payer._lock, payer.store.payment_lock():
            now = payer.clock()
            # A deposit for this need that may have moved is never made again (doubt.py): the same
            # check Payer.decide makes before it signs anything else.
            doubt = await payer._doubt(info, challenge, now)
            if doubt is not None:
                detail = doubt.detail if isinstance(doubt, Blocked) else "an earlier payment is in doubt"
                code = doubt.code if isinstance(doubt, Blocked) else ReasonCode.PAYMENT_IN_DOUBT
                retry = doubt.retry_after if isinstance(doubt, Blocked) else None
                refused = Refused(code, f"not depositing: {detail}", doubt.record.id, retry_after=retry)
                flow._refused(order, refused, carrier)
                return Purchase(refusal=refused, challenge=challenge)
            decided = await self._policy(info, challenge, req, now)
            if isinstance(decided, Refused):
                flow._refused(order, decided, carrier)
                return Purchase(refusal=decided, challenge=challenge)
            selection, deposit = decided
            new = payer._new_payment(info, challenge, selection)
            new = replace(new, scheme=SCHEME, need=info.need_key)
            record = await payer.store.insert_pending(new, now=now)  # durable before anything is signed
        if order.renewing is not None:
            self._retire_session(order.renewing.id, "renewed with a new channel")
        salt = "0x" + secrets.token_hex(32)
        scheme = self._scheme(salt)
        requirements = parse_payment_requirements(2, dict(req.raw))
        channel_id = str(compute_channel_id(scheme.build_channel_config(requirements), req.network)).lower()
        resource = challenge.resource if isinstance(challenge.resource, Mapping) else None
        row = await asyncio.to_thread(
            self.book.insert,
            channel_id=channel_id,
            salt=salt,
            url=info.url,
            requirements=dict(req.raw),
            resource=dict(resource) if resource is not None else None,
            network=req.network,
            asset=req.asset,
            decimals=selection.asset.decimals,
            price=req.amount,
            deposit=deposit,
            ledger_id=record.id,
        )
        self._deposits[channel_id] = deposit
        try:
            inner = await asyncio.to_thread(scheme.create_payment_payload, requirements)
            voucher = int(inner["voucher"]["maxClaimableAmount"])
            if inner.get("type") != "deposit" or int(inner["deposit"]["amount"]) != deposit:
                raise ValueError(f"the SDK built {inner.get('type')!r}, not our deposit of {deposit}")
            if voucher > deposit or voucher != req.amount:
                raise ValueError(f"first voucher {voucher} is not the price {req.amount} within {deposit}")
            await asyncio.to_thread(self.book.signing, channel_id, voucher, durable=True)  # before it leaves
            payload = PaymentPayload(
                x402_version=2,
                payload=inner,
                accepted=requirements,
                resource=resource,
                extensions=dict(challenge.extensions) or None,
            )
            value = encode_payment_signature_header(payload)
            erc3009 = inner["deposit"]["authorization"]["erc3009Authorization"]
            valid_before = int(erc3009["validBefore"])
            # The deposit's EIP-3009 nonce (the SDK derives it from the channel id and a salt): on the
            # row before it leaves, so the reconciler reads the deposit from the chain like any payment.
            nonce = build_erc3009_deposit_nonce(inner["voucher"]["channelId"], erc3009["salt"])
        except Exception as exc:
            detail = f"not signed: {type(exc).__name__}: {exc}"
            await payer.store.mark_rejected(record.id, reason=detail[:500], now=payer.clock())
            self.book.update(channel_id, state="void", detail=detail[:500])
            refused = Refused(ReasonCode.SCHEME_NOT_SUPPORTED, detail)
            flow._refused(order, refused, carrier)
            return Purchase(refusal=refused, challenge=challenge)
        record = await payer.store.set_authorization(
            record.id, nonce=nonce, valid_before=valid_before, now=payer.clock()
        )
        record = await payer.store.record_presentation(
            record.id, header_name=HEADER, header_value=value, now=payer.clock()
        )
        log.info(
            "opening channel %s: deposit %s of %s for %s (payment #%s)",
            channel_id,
            deposit,
            req.asset,
            info.url,
            record.id,
        )
        plan = PaymentPlan(record.id, HEADER, value, record, selection, valid_before)
        wrapped: _OpeningCarrier[Answer] = _OpeningCarrier(carrier, self, row)
        purchase = await flow._pay(order, challenge, plan, wrapped)
        session = purchase.session
        live = self._opening.pop(channel_id, None)
        if session is not None and live is not None:
            await asyncio.to_thread(self.book.update, channel_id, session_id=session.id)
            live.row.session_id = session.id
            self._live[channel_id] = live  # only now the sweep sees it (with its session)
            self._by_session[session.id] = channel_id
        elif live is not None:  # deposited, but nothing holds it: give it back
            self._retire(channel_id, "no session holds it")
        return purchase

    def _opened(self, row: Channel, presented: Presented[Any]) -> None:
        """After the deposit's answer (on a thread): the SDK's state from PAYMENT-RESPONSE, our row."""
        from x402.mechanisms.evm.batch_settlement.client import process_payment_response
        from x402.schemas.helpers import parse_payment_requirements

        headers = dict(presented.headers)
        lowered = {k.lower(): v for k, v in headers.items()}
        verdict = presented.verdict
        if presented.success and verdict.state is PaymentState.SETTLED:
            process_payment_response(
                self.storage,
                lambda name: lowered.get(name.lower()),
                {
                    "channel_id": row.channel_id,
                    "request_amount": str(row.price),
                    "deposit_amount": str(row.deposit),
                },
            )
            self.book.update(row.channel_id, state="open")
            fresh = self.book.get(row.channel_id)
            assert fresh is not None
            requirements = parse_payment_requirements(2, fresh.requirements)
            self._opening[row.channel_id] = _Live(
                fresh, self._scheme(fresh.salt), requirements, asyncio.Lock()
            )
        elif verdict.state in (PaymentState.REJECTED, PaymentState.UNSETTLED) and not verdict.tx_hash:
            self.book.update(row.channel_id, state="void", detail=verdict.reason)
        else:  # money may have moved: the refund (which reads the chain) decides
            self.book.update(row.channel_id, state="closing", detail=verdict.reason)

    # -- a request on an open channel -----------------------------------------------------------------

    def holds(self, session_id: str) -> bool:
        return session_id in self._by_session

    async def request(self, request: Exchange, session: Session, inner: Exchanger) -> Outcome | None:
        """A session hit of a channel session: the next voucher. None: the channel cannot carry this
        request (exhausted, retired); the stage goes on as without a channel (a 402 opens a new one)."""
        channel_id = self._by_session.get(session.id)
        live = self._live.get(channel_id) if channel_id is not None else None
        if live is None:
            return None
        async with live.lock:
            if self._live.get(live.row.channel_id) is not live:
                return None  # retired while we waited
            return await self._voucher(request, session, inner, live)

    async def _voucher(
        self, request: Exchange, session: Session, inner: Exchanger, live: _Live
    ) -> Outcome | None:
        row, payer = live.row, self.payer
        if to_budget_units(row.price, row.decimals) > payer.policy.max_per_payment:
            self._retire(row.channel_id, "the price is over max_per_payment now")
            return None
        corrected = False
        while True:
            if row.charged + row.price > row.deposit:
                self._retire(row.channel_id, "deposit used up")
                return None
            voucher = self._next_voucher(live)
            if voucher is None:  # no context in memory: read from our table, or built by the SDK
                voucher = await asyncio.to_thread(self._sdk_voucher, live)
            inner_payload, cumulative, sendable = voucher
            if not sendable:
                self._retire(row.channel_id, f"the next voucher ({cumulative}) would exceed the deposit")
                return None
            await self.book.signed(row.channel_id, cumulative)  # committed before it leaves
            row.signed = max(row.signed, cumulative)
            if live.header is None:
                live.header = PaymentHeader(live.requirements, row.resource)
            outcome = await inner(request.with_headers({HEADER: live.header.encode(inner_payload)}))
            status = outcome.response.status
            if status != 402:
                if 200 <= status < 400:
                    self._charged(live, outcome)
                    await self.book.write_answer(row.channel_id)
                if self.manager is not None:
                    self.manager.touch(session, self.clock())
                outcome.session_id = session.id
                return outcome
            required = _payment_required(outcome)
            error = required.error if required is not None else None
            if required is not None and error in _CORRECTABLE and not corrected:
                problem = self._corrective_problem(row, required)
                if problem is not None:
                    log.warning("channel %s: corrective 402 refused: %s", row.channel_id, problem)
                    self._retire(row.channel_id, f"corrective 402 refused: {problem}")
                    outcome.refuse("channel_state_mismatch")
                    outcome.session_id = session.id
                    return outcome
                ok = await asyncio.to_thread(live.scheme.process_corrective_payment_required, required)
                if ok:
                    fresh = self.storage.get(row.channel_id)
                    if fresh is not None and fresh.charged_cumulative_amount is not None:
                        row.charged = int(fresh.charged_cumulative_amount)
                    log.info("channel %s resynced to %s by a corrective 402", row.channel_id, row.charged)
                    outcome.release_body()
                    corrected = True
                    continue
            if error != _BUSY:
                self._retire(row.channel_id, f"the server refused its voucher: {error}")
            outcome.refuse("channel_busy" if error == _BUSY else "channel_rejected")
            outcome.session_id = session.id
            return outcome

    def _next_voucher(self, live: _Live) -> tuple[dict[str, Any], int, bool] | None:
        """On the event loop, no I/O: the next voucher from the SDK's context held in memory
        (proxy/channels/vouchers.py), and whether it may be sent (within the balance and the deposit).
        None when the context is not in memory yet: `_sdk_voucher` on a thread."""
        row = live.row
        known, context = self.book.cached_context(row.channel_id)
        if not known or context is None:
            return None
        balance = int(context.balance or "0")
        cumulative = int(context.charged_cumulative_amount or "0") + int(live.requirements.amount)
        sendable = 0 < cumulative <= min(balance, row.deposit)
        if not sendable:
            return {}, cumulative, False
        if live.config is None or live.sdk_channel_id is None:
            from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id

            config = live.scheme.build_channel_config(live.requirements)
            live.sdk_channel_id = str(compute_channel_id(config, row.network))
            live.config = config.to_dict()
        voucher = self._voucher_signer(row.network).sign(live.sdk_channel_id, cumulative)
        return voucher_payload(live.config, voucher), cumulative, True

    def _sdk_voucher(self, live: _Live) -> tuple[dict[str, Any], int, bool]:
        """On a thread: the voucher as `_next_voucher`, the context read from our table, or built by
        the SDK when there is none (it recovers the channel from the chain)."""
        context = self.storage.get(live.row.channel_id)  # now in memory for the next voucher
        voucher = self._next_voucher(live) if context is not None else None
        if voucher is not None:
            return voucher
        inner = live.scheme.create_payment_payload(live.requirements)
        cumulative = int(inner["voucher"]["maxClaimableAmount"])
        return inner, cumulative, inner.get("type") == "voucher" and cumulative <= live.row.deposit

    def _voucher_signer(self, network: str) -> VoucherSigner:
        signer = self._vouchers.get(network)
        if signer is None:
            assert self.payer.wallet is not None
            signer = VoucherSigner(self.payer.wallet.account, self._sdk_signer(), network)
            self._vouchers[network] = signer
        return signer

    def _corrective_problem(self, row: Channel, required: Any) -> str | None:
        """The server's view is accepted only within what our own records say we signed."""
        offer = next((a for a in required.accepts if a.scheme == SCHEME), None)
        state = (offer.extra or {}).get("channelState") if offer is not None else None
        if not isinstance(state, dict):
            return None  # the SDK falls back to the chain
        charged = state.get("chargedCumulativeAmount")
        if not isinstance(charged, str) or not charged.isdigit():
            return f"chargedCumulativeAmount {charged!r} is not an amount"
        if str(state.get("channelId", row.channel_id)).lower() != row.channel_id:
            return "the corrective 402 names another channel"
        if int(charged) > row.signed:
            return f"server says charged {charged}, we never signed above {row.signed}"
        if int(charged) > row.deposit:
            return f"server says charged {charged}, above the deposit {row.deposit}"
        return None

    def _charged(self, live: _Live, outcome: Outcome) -> None:
        """The seller's answer to a voucher, through the SDK's rules, on the event loop: its context
        kept in memory (`ChannelBook.answered`), committed next by `write_answer`."""
        from x402.mechanisms.evm.batch_settlement.client import process_payment_response

        headers = outcome.response.headers
        process_payment_response(
            self.answers,
            headers.get,
            {"channel_id": live.row.channel_id, "request_amount": str(live.row.price)},
        )
        fresh = self.storage.get(live.row.channel_id)
        if fresh is not None and fresh.charged_cumulative_amount is not None:
            live.row.charged = int(fresh.charged_cumulative_amount)

    # -- end ------------------------------------------------------------------------------------------

    def _retire_session(self, session_id: str, why: str) -> None:
        channel_id = self._by_session.get(session_id)
        if channel_id is not None:
            self._retire(channel_id, why)

    def _retire(self, channel_id: str, why: str) -> None:
        """No more vouchers on this channel: it is refunded by the next sweep."""
        live = self._live.pop(channel_id, None)
        if live is not None and live.row.session_id is not None:
            if self._by_session.get(live.row.session_id) == channel_id:
                del self._by_session[live.row.session_id]
        self.book.update(channel_id, state="closing", detail=why[:500])
        log.info("channel %s closing: %s", channel_id, why)

    async def _retire_idle(self, live: _Live, why: str) -> bool:
        """Retire an open channel once no voucher of it is in flight (its refund must not race one)."""
        async with live.lock:
            if self._live.get(live.row.channel_id) is not live:
                return False
            self._retire(live.row.channel_id, why)
            return True

    async def sweep(self) -> int:
        """Retire channels whose session is over, and (after a reload) those whose deposit the policy
        no longer allows; refund every closing channel. Returns refunds done."""
        now = self.clock()
        await asyncio.to_thread(self.book.flush)  # answers' contexts not yet written with a voucher
        policy = self.payer.policy
        if policy is not self._policy_checked:
            await self._budget_cut(now)
            self._policy_checked = policy
        for live in list(self._live.values()):
            session_id = live.row.session_id
            session = None
            if session_id is not None and self.manager is not None:
                session = await self.manager.fetch(session_id)
            if session is None or not session.is_active(now):
                reason = "session over" if session is None else f"session {session.state(now)}"
                await self._retire_idle(live, reason)
        done = 0
        for row in await asyncio.to_thread(self.book.in_state, "closing"):
            if await self.refund(row):
                done += 1
        return done

    async def _budget_cut(self, now: float) -> None:
        """A reload lowered the policy (or a restart brought channels opened under an older one): a
        channel whose deposit would not be allowed now is retired and its session ended; the sweep
        then refunds it."""
        for channel_id, live in list(self._live.items()):
            problem = await self._no_longer_fits(live.row, now)
            if problem is None:
                continue
            if not await self._retire_idle(live, f"budget cut: {problem}"):
                continue
            session_id = live.row.session_id
            if session_id is not None and self.manager is not None:
                await self.manager.end_session(session_id, f"budget cut: {problem}"[:200])
            log.warning("channel %s: ended by a budget cut: %s", channel_id, problem)

    async def _no_longer_fits(self, row: Channel, now: float) -> str | None:
        """Why the policy in force would not allow this channel's price and deposit now (None: it
        would): the open path's checks, with the channel's own deposit not counted twice."""
        document = {"x402Version": 2, "accepts": [row.requirements], "resource": row.resource}
        try:
            challenge = challenge_from_document(
                document, self.payer.assets.networks, source="a channel's stored requirements"
            )
        except MalformedChallenge as exc:
            return f"its requirements no longer parse: {exc}"
        req = offered(challenge)
        if req is None:
            return "its requirements no longer parse"
        record = await self.payer.store.get(row.ledger_id) if row.ledger_id is not None else None
        host = record.host if record is not None else (row.url.split("/")[2] if "//" in row.url else "")
        counted = 0
        if record is not None and record.created_at >= now - BUDGET_WINDOW_SECONDS:
            counted = to_budget_units(row.deposit, row.decimals)
        info = PaymentRequestInfo(
            method=record.method if record is not None else "GET",
            url=row.url,
            host=host,
            headers={},
            session_id=row.session_id,
        )
        decided = await self._policy(info, challenge, req, now, deposit=row.deposit, counted=counted)
        return decided.detail if isinstance(decided, Refused) else None

    async def end_session(self, session_id: str) -> Channel | None:
        """The session was ended (admin): retire and refund its channel now; the refunded row."""
        channel_id = self._by_session.get(session_id)
        live = self._live.get(channel_id) if channel_id is not None else None
        if live is not None:
            await self._retire_idle(live, "session ended")
        rows = [r for r in await asyncio.to_thread(self.book.for_session, session_id) if r.state == "closing"]
        for row in rows:
            await self.refund(row)
        found = await asyncio.to_thread(self.book.for_session, session_id)
        return found[-1] if found else None

    async def refund(self, row: Channel) -> bool:
        """The SDK's cooperative refund of what the channel holds beyond the seller's vouchers; one at
        a time per channel (the sweep and an admin end may both ask): the second finds it done."""
        lock = self._refunding.setdefault(row.channel_id, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self.book.flush)
            current = await asyncio.to_thread(self.book.get, row.channel_id)
            if current is None or current.state != "closing":
                return False
            done = await self._refund(current)
            if done:  # final: whoever asks next reads it from the book
                self._refunding.pop(row.channel_id, None)
        return done

    async def _refund(self, row: Channel) -> bool:
        from x402.mechanisms.evm.batch_settlement.client import RefundOptions

        failures = self._refund_failures.get(row.channel_id, 0)
        scheme = self._scheme(row.salt)
        try:
            settle = await asyncio.to_thread(scheme.refund, row.url, RefundOptions(fetch=_fetch))
        except Exception as exc:
            self._refund_failures[row.channel_id] = failures + 1
            text = f"refund failed: {type(exc).__name__}: {exc}"
            balance = await asyncio.to_thread(self._chain_balance, row.channel_id)
            if balance is not None and balance[0] <= balance[1]:
                # Nothing left to refund on chain: never deposited, or already refunded/claimed.
                state = (
                    "void" if balance[0] == 0 and row.signed <= row.price and row.charged == 0 else "refunded"
                )
                await asyncio.to_thread(
                    self.book.update,
                    row.channel_id,
                    state=state,
                    claimed=balance[1],
                    refunded=row.deposit - balance[1] if state == "refunded" else 0,
                    detail=text[:500],
                    ended_at=self.clock(),
                )
                return True
            if failures < 3 or failures % 30 == 0:
                log.warning("channel %s: %s", row.channel_id, text)
            await asyncio.to_thread(self.book.update, row.channel_id, detail=text[:500])
            return False
        refunded = int(settle.amount) if settle.amount and str(settle.amount).isdigit() else 0
        balance = await asyncio.to_thread(self._chain_balance, row.channel_id)
        claimed = balance[1] if balance is not None else row.deposit - refunded
        await asyncio.to_thread(
            self.book.update,
            row.channel_id,
            state="refunded",
            refunded=refunded,
            claimed=claimed,
            refund_tx=settle.transaction or None,
            ended_at=self.clock(),
        )
        self._refund_failures.pop(row.channel_id, None)
        log.info(
            "channel %s refunded %s (claimed %s of deposit %s) in tx %s",
            row.channel_id,
            refunded,
            claimed,
            row.deposit,
            settle.transaction,
        )
        if settle.transaction and balance is not None:
            await self._credit_refund(row, min(refunded, row.deposit - balance[0]))
        return True

    async def _credit_refund(self, row: Channel, back: int) -> None:
        """The deposit's ledger row learns what came back, so budgets count only what was spent. Only
        after a refund transaction, and only what the chain shows left the channel (its `balance` is
        deposited - refunded - withdrawn: one deposit, never a top-up, so deposit - balance came back).
        A failed write leaves the budget counting the whole deposit: the safe side."""
        if row.ledger_id is None or back <= 0:
            return
        try:
            await self.payer.store.record_refund(row.ledger_id, back, now=self.clock())
        except StoreError as exc:
            log.warning("channel %s: refund of %s not counted back in budgets: %s", row.channel_id, back, exc)

    def _chain_balance(self, channel_id: str) -> tuple[int, int] | None:
        if not self.rpc_url:
            return None
        from x402.mechanisms.evm.batch_settlement.client import read_channel_balance_and_total_claimed

        try:
            return read_channel_balance_and_total_claimed(self._sdk_signer(), channel_id)
        except Exception as exc:
            log.debug("channel %s: chain read failed: %s", channel_id, exc)
            return None

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("channel sweep failed")
            await asyncio.sleep(float(self.settings.refund_interval))

    def describe_session(self, session_id: str) -> dict[str, Any] | None:
        rows = self.book.for_session(session_id)
        if not rows:
            return None
        deposit = sum(r.deposit for r in rows)
        refunded = [r.refunded for r in rows]
        last = rows[-1]
        return {
            "state": last.state,  # the session's current (latest) channel
            "asset": last.asset,
            "decimals": last.decimals,
            "deposit": str(deposit),
            "signed": str(sum(r.signed for r in rows)),
            "charged": str(sum(r.charged for r in rows)),
            "claimed": None
            if any(r.claimed is None for r in rows)
            else str(sum(r.claimed or 0 for r in rows)),
            "refunded": None if None in refunded else str(sum(x or 0 for x in refunded)),
            "net_spend": None if None in refunded else str(deposit - sum(x or 0 for x in refunded)),
            "channels": [r.describe() for r in rows],
        }


class _OpeningCarrier(Carrier[Answer]):
    """The flow's carrier, with the deposit's answer read into the channel's state as it arrives."""

    def __init__(self, inner: Carrier[Answer], holder: ChannelHolder, row: Channel) -> None:
        self._inner = inner
        self._holder = holder
        self._row = row

    async def challenge(self) -> ChallengeRead:
        return await self._inner.challenge()

    def evidence(self) -> tuple[Mapping[str, str], bytes]:
        return self._inner.evidence()

    async def with_session(self, session: Session) -> bool:
        return await self._inner.with_session(session)

    async def present(self, plan: PaymentPlan) -> Presented[Answer]:
        presented = await self._inner.present(plan)
        await asyncio.to_thread(self._holder._opened, self._row, presented)
        return presented


def _payment_required(outcome: Outcome) -> Any:
    from x402.http.utils import decode_payment_required_header

    value = outcome.response.headers.get("PAYMENT-REQUIRED")
    if not value:
        return None
    try:
        return decode_payment_required_header(value)
    except Exception:
        return None


def _fetch(url: str, headers: dict[str, str]) -> Any:
    """The refund flow's HTTP call (a thread; not through the proxy's own port, no proxy variables)."""
    import httpx
    from x402.mechanisms.evm.batch_settlement.client.refund import _RefundResponse

    response = httpx.get(url, headers=headers, timeout=60, trust_env=False)
    return _RefundResponse(status=response.status_code, headers=dict(response.headers))
