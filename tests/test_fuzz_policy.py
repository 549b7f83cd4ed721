"""Fuzzing the spending policy (proxy/payments/policy.py) and the Payer's decisions (payer.py).

The money rule: nothing is approved, and nothing is signed, outside the policy. Each property checks
the code against an oracle written here from the policy's documented meaning (tables of networks,
assets and decimals spelled out below, not read from the code under test):

- ``choose_requirement`` approves only a requirement the oracle permits, picks the preferred one, and
  refuses only when the oracle permits none (so the policy neither leaks nor over-refuses);
- ``Policy.compile`` of any config raises nothing but ``ConfigValueError``;
- a ``Payer`` with a real SQLite ledger and a real key, fed a random run of 402s, signs only
  what the oracle permits (recipient, amount, asset and network read back from the signed header),
  honours a per-request cap, and the ledger never holds more than the daily budgets in any 24 h window.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import tempfile
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from eth_account import Account
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.payments.challenge import Challenge, Requirement, parse_challenge
from proxy.payments.errors import ConfigValueError
from proxy.payments.payer import Payer, PaymentPlan, PaymentRequestInfo, spend_in_budget_units
from proxy.payments.policy import (
    PaymentContext,
    Policy,
    PolicyConfig,
    ReasonCode,
    Refusal,
    Selection,
    choose_requirement,
)
from proxy.payments.wallet import Wallet
from proxy.store.sqlite import SqliteLedgerStore
from tests.fuzz_profiles import PURE, sized
from tests.test_payments_fixtures import (
    AMOY_USDC,
    BASE_SEPOLIA_USDC,
    BASE_USDC,
    OTHER_PAY_TO,
    PAY_TO,
    FakeClock,
    v1_requirement,
    v1_response,
    v2_requirement,
    v2_response,
)
from tests.test_payments_policy import ASSETS, LOCAL_TOKEN, NETWORKS

# --- the oracle's own tables ---------------------------------------------------------------------

POLYGON_USDC = "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359"
THIRD_PAY_TO = "0x2222222222222222222222222222222222222222"
# name as written in a challenge or config -> (CAIP-2, is a testnet)
NETWORK_FACTS = {
    "base-sepolia": ("eip155:84532", True),
    "eip155:84532": ("eip155:84532", True),
    "base": ("eip155:8453", False),
    "eip155:8453": ("eip155:8453", False),
    "polygon-amoy": ("eip155:80002", True),
    "polygon": ("eip155:137", False),
    "eip155:137": ("eip155:137", False),
    "anvil": ("eip155:31337", True),
    "eip155:31337": ("eip155:31337", True),
}
# (CAIP-2, lower-case token) -> decimals: the tokens the test registry knows (builtin USDC + LOCAL_TOKEN)
ASSET_DECIMALS = {
    ("eip155:84532", BASE_SEPOLIA_USDC.lower()): 6,
    ("eip155:8453", BASE_USDC.lower()): 6,
    ("eip155:80002", AMOY_USDC.lower()): 6,
    ("eip155:137", POLYGON_USDC.lower()): 6,
    ("eip155:31337", LOCAL_TOKEN.lower()): 18,
}
TOKENS = [BASE_SEPOLIA_USDC, BASE_USDC, AMOY_USDC, POLYGON_USDC, LOCAL_TOKEN, OTHER_PAY_TO]
RECIPIENTS = [PAY_TO, OTHER_PAY_TO, THIRD_PAY_TO]
# (how a request names its host, the bare host the policy must judge)
HOSTS = [
    ("shop.test", "shop.test"),
    ("SHOP.Test.", "shop.test"),
    ("shop.test:8080", "shop.test"),
    ("a.shop.test", "a.shop.test"),
    ("other.test", "other.test"),
    ("[::1]:80", "::1"),
]


def case_form(address: str, form: int) -> str:
    return [address, address.lower(), "0x" + address[2:].upper()][form % 3]


def address_in(strategy_pool: list[str]) -> st.SearchStrategy[str]:
    return st.builds(case_form, st.sampled_from(strategy_pool), st.integers(0, 2))


AMOUNT_TEXT = st.builds(
    lambda n, places: str(Decimal(n).scaleb(-places)),
    st.integers(0, 3_000_000),
    st.sampled_from([0, 2, 6, 18]),
)
# Mostly permissive settings, so that a good share of the cases get as far as an approval.
MONEY = st.sampled_from(["0.10", "0.05", "1", "0.5"]) | AMOUNT_TEXT


def mostly(usual: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(usual), st.just(usual), st.just(usual), other)


POLICY_CONFIGS = st.builds(
    PolicyConfig,
    allowed_networks=mostly(
        ["testnets"], st.lists(st.sampled_from(["testnets", *NETWORK_FACTS]), max_size=3)
    ),
    allow_mainnet=st.booleans(),
    allowed_assets=mostly([], st.lists(address_in(TOKENS), max_size=2)),
    pay_to_allow=mostly([], st.lists(address_in(RECIPIENTS), max_size=2)),
    pay_to_deny=mostly([], st.lists(address_in(RECIPIENTS).map(lambda a: f" {a} "), max_size=1)),
    host_allow=mostly(
        [],
        st.lists(
            st.sampled_from(["shop.test", "*.shop.test", "*", "SHOP.TEST", "other.*", "::1"]), max_size=2
        ),
    ),
    host_deny=mostly([], st.lists(st.sampled_from(["shop.test", "*.shop.test", "a.*", "::1"]), max_size=1)),
    max_per_payment=MONEY,
    daily_budget=MONEY,
    per_host_daily_budget=MONEY,
    dry_run=st.just(False),
    enable_upto=st.booleans(),
    allow_permit2=st.booleans(),
)
EXTRAS = st.sampled_from(
    [
        *[{"name": "USDC", "version": "2"}] * 4,
        {},
        {"assetTransferMethod": "permit2"},
        {"facilitatorAddress": OTHER_PAY_TO},
        {
            "assetTransferMethod": "permit2",
            "facilitatorAddress": OTHER_PAY_TO,
            "name": "USDC",
            "version": "2",
        },
    ]
)
# (network as named in a challenge, its token): mostly a pair the registry knows, sometimes not.
PAIRS = [
    ("base-sepolia", BASE_SEPOLIA_USDC),
    ("eip155:84532", BASE_SEPOLIA_USDC),
    ("eip155:84532", BASE_SEPOLIA_USDC),
    ("base", BASE_USDC),
    ("polygon-amoy", AMOY_USDC),
    ("eip155:137", POLYGON_USDC),
    ("anvil", LOCAL_TOKEN),
    ("anvil", LOCAL_TOKEN),
]
NETWORK_NAMES = [*NETWORK_FACTS, "eip155:1", "eip155:424242", "solana:devnet"]


@st.composite
def requirements(draw: st.DrawFn) -> dict[str, Any]:
    network, asset = draw(st.sampled_from(PAIRS))
    if draw(st.integers(0, 5)) == 0:
        network, asset = draw(st.sampled_from(NETWORK_NAMES)), draw(st.sampled_from(TOKENS))
    decimals = 18 if asset == LOCAL_TOKEN else 6
    # Around the usual caps (hundredths of a unit), now and then anything up to 10**20 base units.
    amount = draw(st.integers(0, 30).map(lambda cents: cents * 10 ** (decimals - 2)) | st.integers(0, 10**20))
    return {
        "scheme": draw(st.sampled_from(["exact"] * 6 + ["upto", "batch-settlement"])),
        "network": network,
        "amount": str(amount),
        "asset": case_form(asset, draw(st.integers(0, 2))),
        "payTo": draw(address_in(RECIPIENTS)),
        "extra": draw(EXTRAS),
    }


REQUIREMENTS = requirements()


def build_challenge(version: int, accepts: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
    if version == 1:
        return v1_response(
            *[
                v1_requirement(**{k: v for k, v in a.items() if k != "amount"}, maxAmountRequired=a["amount"])
                for a in accepts
            ]
        )
    return v2_response(*[v2_requirement(**a) for a in accepts])


def parse(version: int, accepts: list[dict[str, Any]]) -> Challenge:
    challenge = parse_challenge(*build_challenge(version, accepts), NETWORKS)
    assert challenge is not None and len(challenge.requirements) == len(accepts)
    return challenge


# --- the oracle ----------------------------------------------------------------------------------


def units(text: str) -> int:
    return int(Decimal(text).scaleb(18))


def host_permitted(cfg: PolicyConfig, bare: str) -> bool:
    if any(fnmatch.fnmatchcase(bare, p.strip().lower()) for p in cfg.host_deny):
        return False
    return not cfg.host_allow or any(fnmatch.fnmatchcase(bare, p.strip().lower()) for p in cfg.host_allow)


@dataclass(frozen=True)
class Verdict:
    budget_units: int
    transfer_method: str


def permitted(
    req: Requirement,
    version: int,
    cfg: PolicyConfig,
    spent_global: int,
    spent_host: int,
    balances: dict[tuple[str, str], int] | None,
) -> Verdict | None:
    """What the policy documents, applied to one requirement: its cost if payable, else None."""
    raw = req.raw
    extra = raw.get("extra") or {}
    method = (
        "permit2" if raw["scheme"] == "upto" or extra.get("assetTransferMethod") == "permit2" else "eip3009"
    )
    if raw["scheme"] == "exact":
        if method == "permit2" and (not cfg.allow_permit2 or version == 1):
            return None
    elif raw["scheme"] == "upto":
        if not cfg.enable_upto or version == 1 or not isinstance(extra.get("facilitatorAddress"), str):
            return None
    else:
        return None
    facts = NETWORK_FACTS.get(raw["network"])
    if facts is None:
        return None
    caip2, testnet = facts
    listed = {NETWORK_FACTS[n][0] for n in cfg.allowed_networks if n in NETWORK_FACTS}
    if caip2 not in listed and not (testnet and "testnets" in cfg.allowed_networks):
        return None
    if not testnet and not cfg.allow_mainnet:
        return None
    asset = raw["asset"].lower()
    if cfg.allowed_assets and asset not in {a.strip().lower() for a in cfg.allowed_assets}:
        return None
    decimals = ASSET_DECIMALS.get((caip2, asset))
    if decimals is None:
        return None
    pay_to = raw["payTo"].lower()
    if pay_to in {a.strip().lower() for a in cfg.pay_to_deny}:
        return None
    if cfg.pay_to_allow and pay_to not in {a.strip().lower() for a in cfg.pay_to_allow}:
        return None
    amount = int(raw["amount"] if version == 2 else raw["maxAmountRequired"])
    cost = amount * 10 ** (18 - decimals)
    if amount == 0 or cost > units(cfg.max_per_payment):  # a zero price is never signed
        return None
    if spent_global + cost > units(cfg.daily_budget) or spent_host + cost > units(cfg.per_host_daily_budget):
        return None
    if balances is not None and balances.get((caip2, asset), amount) < amount:
        return None
    return Verdict(cost, method)


def preference(req: Requirement, verdict: Verdict) -> tuple[int, int, int, int]:
    return (
        req.raw["scheme"] != "exact",
        verdict.budget_units,
        verdict.transfer_method != "eip3009",
        req.index,
    )


# --- properties ----------------------------------------------------------------------------------

BALANCES = st.none() | st.dictionaries(
    st.sampled_from(sorted(ASSET_DECIMALS)), st.integers(0, 10**19), max_size=3
)


@PURE
@given(
    POLICY_CONFIGS,
    st.sampled_from([1, 2]),
    st.lists(REQUIREMENTS, min_size=1, max_size=4),
    st.sampled_from(HOSTS),
    st.integers(0, 2 * 10**18),
    st.integers(0, 2 * 10**18),
    BALANCES,
    st.sampled_from([None] * 9 + [7]),
)
def test_choice_is_exactly_what_the_policy_permits(
    cfg: PolicyConfig,
    version: int,
    accepts: list[dict[str, Any]],
    host: tuple[str, str],
    spent_global: int,
    spent_host: int,
    balances: dict[tuple[str, str], int] | None,
    in_doubt: int | None,
) -> None:
    challenge = parse(version, accepts)
    policy = Policy.compile(cfg, NETWORKS)
    ctx = PaymentContext(
        host[0], "http://shop.test/paid", 1.8e9, spent_global, spent_host, balances, in_doubt
    )
    result = choose_requirement(challenge, policy, ASSETS, ctx)
    event("selected" if isinstance(result, Selection) else f"refused: {result.reason_code}")

    verdicts = {
        req.index: permitted(req, version, cfg, spent_global, spent_host, balances)
        for req in challenge.requirements
    }
    payable = [(preference(r, v), r) for r in challenge.requirements if (v := verdicts[r.index]) is not None]
    if not host_permitted(cfg, host[1]):
        assert isinstance(result, Refusal) and result.reason_code is ReasonCode.HOST_NOT_ALLOWED
    elif in_doubt is not None:
        assert isinstance(result, Refusal) and result.reason_code is ReasonCode.PAYMENT_IN_DOUBT
    elif not payable:
        assert isinstance(result, Refusal), f"approved {result} which the policy forbids"
    else:
        assert isinstance(result, Selection), f"refused ({result}) although {min(payable)[1]} is payable"
        verdict = verdicts[result.requirement.index]
        assert verdict is not None
        assert result.budget_units == verdict.budget_units and result.amount == result.requirement.amount
        assert result.transfer_method == verdict.transfer_method
        assert result.requirement is min(payable, key=lambda pair: pair[0])[1], "not the preferred option"


TEXTS = st.text(max_size=12) | AMOUNT_TEXT | st.sampled_from(["-1", "1e400", "NaN", "0.1", " 0x12 ", ""])


@PURE
@given(
    st.builds(
        PolicyConfig,
        allowed_networks=st.lists(
            st.sampled_from(["testnets", "base", "eip155:31337"]) | st.text(max_size=10), max_size=3
        ),
        allowed_assets=st.lists(address_in(TOKENS) | st.text(max_size=44), max_size=2),
        pay_to_allow=st.lists(address_in(RECIPIENTS) | st.text(max_size=44), max_size=2),
        pay_to_deny=st.lists(
            address_in(RECIPIENTS).map(lambda a: a + "\n") | st.text(max_size=44), max_size=2
        ),
        host_allow=st.lists(st.text(max_size=8), max_size=2),
        host_deny=st.lists(st.text(max_size=8), max_size=2),
        max_per_payment=TEXTS | st.integers() | st.floats(),
        daily_budget=TEXTS,
        per_host_daily_budget=TEXTS,
    )
)
def test_compiling_any_config_fails_only_with_config_errors(cfg: PolicyConfig) -> None:
    try:
        policy = Policy.compile(cfg, NETWORKS)
    except ConfigValueError as exc:
        assert exc.field and str(exc)
        return
    assert min(policy.max_per_payment, policy.daily_budget, policy.per_host_daily_budget) >= 0
    assert all(a == a.strip().lower() and len(a) == 42 for a in policy.pay_to_deny | policy.pay_to_allow)


# --- the Payer: a run of 402s against a real ledger and a real key --------------------------------

WALLET = Wallet(Account.create())
DAY = 24 * 3600

Step = tuple[tuple[str, str], int, list[dict[str, Any]], str, int, Decimal | None]
STEPS = st.tuples(
    st.sampled_from(HOSTS[:5]),  # the ledger keys budgets by the bare host; "[::1]" adds nothing here
    st.sampled_from([1, 2]),
    st.lists(REQUIREMENTS, min_size=1, max_size=3),
    st.sampled_from(["settle", "leave pending", "transport failure"]),
    st.sampled_from([0, 1, 60, 3600, 6 * 3600, DAY - 1, DAY]),
    st.none() | st.decimals(min_value=0, max_value=1, places=3),
)


def signed_authorization(plan: PaymentPlan) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The signed header as the server reads it: (authorization or permit2 payload, V2 `accepted`)."""
    document = json.loads(base64.b64decode(plan.header_value))
    payload = document["payload"]
    return payload.get("authorization") or payload.get("permit2Authorization") or payload, document.get(
        "accepted"
    )


async def run_payer(cfg: PolicyConfig, steps: list[Step], directory: Path) -> None:
    clock = FakeClock()
    store = SqliteLedgerStore(directory / "ledger.db")
    payer = Payer(cfg, ASSETS, WALLET, store, clock)
    paid: list[tuple[float, str, int]] = []  # (when, bare host, budget units) of every signed payment
    try:
        for n, ((host, bare), version, accepts, outcome, advance, cap) in enumerate(steps):
            clock.advance(advance)
            request = PaymentRequestInfo("GET", f"http://{host}/paid/{n}", host, {}, max_amount=cap)
            decision = await payer.on_402(request, *build_challenge(version, accepts), True)
            event("signed" if isinstance(decision, PaymentPlan) else f"not signed: {decision}"[:60])
            if not isinstance(decision, PaymentPlan):
                continue
            window = [(h, u) for when, h, u in paid if when >= clock.now - DAY]
            spent_global = sum(u for _, u in window)
            spent_host = sum(u for h, u in window if h == bare)
            req = decision.selection.requirement
            verdict = permitted(req, version, cfg, spent_global, spent_host, None)
            assert verdict is not None, f"signed {decision.selection.describe()} outside the policy"
            assert host_permitted(cfg, bare)
            if cap is not None:
                ceiling = int(cap.scaleb(decision.selection.asset.decimals).to_integral_value(ROUND_FLOOR))
                assert decision.selection.amount <= ceiling, "signed above the request's own cap"
            authorization, accepted = signed_authorization(decision)
            if decision.selection.transfer_method == "eip3009":
                assert authorization["to"].lower() == req.pay_to.lower()
                assert int(authorization["value"]) == req.amount
            if accepted is not None:
                assert accepted == dict(req.raw), "V2 must echo the requirement it was given"
            assert (
                decision.record.amount == req.amount and decision.record.pay_to.lower() == req.pay_to.lower()
            )
            paid.append((clock.now, bare, verdict.budget_units))
            if outcome == "settle":
                await payer.record_response(decision, 200, {})
            elif outcome == "transport failure":
                await payer.record_transport_failure(decision, "connection reset")
            since = clock.now - DAY
            assert spend_in_budget_units(store.spent_since(since, now=clock.now)) <= units(cfg.daily_budget)
            assert spend_in_budget_units(store.spent_since(since, bare, now=clock.now)) <= units(
                cfg.per_host_daily_budget
            )
    finally:
        store.close()


@sized(short=40, long=3_000)
@given(POLICY_CONFIGS, st.lists(STEPS, min_size=1, max_size=6))
def test_payer_signs_only_inside_the_policy_and_budgets(cfg: PolicyConfig, steps: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run_payer(cfg, steps, Path(directory)))


def test_the_oracle_agrees_with_a_hand_checked_case() -> None:
    # Guards the oracle itself: a default policy pays 0.01 USDC on Base Sepolia, refuses it on Base.
    cfg = PolicyConfig()
    [ok] = parse(2, [v2_requirement()]).requirements
    [mainnet] = parse(2, [v2_requirement(network="eip155:8453", asset=BASE_USDC)]).requirements
    assert permitted(ok, 2, cfg, 0, 0, None) == Verdict(10**16, "eip3009")
    assert permitted(mainnet, 2, cfg, 0, 0, None) is None
