"""The spending policy and the choice of what (if anything) to pay. Pure: no I/O, no clock.

``choose_requirement`` walks every requirement of a challenge through the same checks, in order:

    1 scheme   2 network   3 asset   4 payTo   5 amount (not 0, per-payment cap)   6 budgets   7 balance

It picks, among those passing all checks, scheme ``exact`` before ``upto``, then the cheapest in
budget units, then EIP-3009 before Permit2 (Permit2 needs a prior on-chain approval), then the
server's order. If none passes, the refusal reported is the one from the requirement that got
*furthest* through the checks (ties: the server's first), because that is the actionable one:
"budget exhausted" on the option that was otherwise fine beats "network not allowed" on an
option the user never meant to use.

Budget arithmetic is in budget units (see ``amounts``): every allowed asset is assumed to be a USD
stablecoin, so 1 unit of any asset counts as 1 unit of budget.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.hosts import normalize_host as normalize_host
from proxy.hosts import normalize_host_pattern
from proxy.payments.amounts import (
    BUDGET_DECIMALS,
    AmountError,
    decimal_to_base_units,
    format_budget_units,
    format_units,
    parse_decimal,
    to_budget_units,
)
from proxy.payments.assets import Asset, AssetRegistry, is_evm_address
from proxy.payments.challenge import Challenge, Requirement
from proxy.payments.errors import ConfigValueError
from proxy.payments.networks import Network, NetworkRegistry


class ReasonCode(StrEnum):
    OVER_MAX_PER_PAYMENT = "over_max_per_payment"
    NETWORK_NOT_ALLOWED = "network_not_allowed"
    ASSET_NOT_ALLOWED = "asset_not_allowed"
    SCHEME_NOT_SUPPORTED = "scheme_not_supported"
    PAY_TO_NOT_ALLOWED = "pay_to_not_allowed"
    HOST_NOT_ALLOWED = "host_not_allowed"
    BUDGET_EXHAUSTED = "budget_exhausted"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    MALFORMED_CHALLENGE = "malformed_challenge"
    BODY_TOO_LARGE_TO_REPLAY = "body_too_large_to_replay"
    DRY_RUN = "dry_run"
    NO_WALLET = "no_wallet"
    PAYMENT_IN_DOUBT = "payment_in_doubt"
    # The money for this need moved but its answer never reached the client ([policy] repay_undelivered).
    PAYMENT_UNDELIVERED = "payment_undelivered"
    # A person said no to a payment above ask_above, or said nothing within ask_timeout.
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_TIMEOUT = "approval_timeout"
    # A per-request ceiling below the policy's (a session's cap, or an admin start's max_payment).
    OVER_REQUEST_CAP = "over_request_cap"
    # A price of 0: under every cap, but a zero-value authorization buys nothing and costs the
    # facilitator gas to settle, so there is nothing worth signing.
    ZERO_AMOUNT = "zero_amount"
    # An MCP tool an [[mcp.tools]] rule says is never paid (allowed = false).
    TOOL_NOT_ALLOWED = "tool_not_allowed"


TESTNETS_KEYWORD = "testnets"


@dataclass
class PolicyConfig:
    """User-facing policy. Amounts are decimal strings in asset units (USD for stablecoins)."""

    allowed_networks: list[str] = field(default_factory=lambda: [TESTNETS_KEYWORD])
    allow_mainnet: bool = False
    allowed_assets: list[str] = field(default_factory=list)  # addresses; empty = known + configured
    pay_to_allow: list[str] = field(default_factory=list)  # empty = any recipient
    pay_to_deny: list[str] = field(default_factory=list)
    host_allow: list[str] = field(default_factory=list)  # fnmatch globs; empty = any host
    host_deny: list[str] = field(default_factory=list)
    max_per_payment: str = "0.10"
    daily_budget: str = "1.00"
    per_host_daily_budget: str = "0.50"
    dry_run: bool = False
    enable_upto: bool = False
    allow_permit2: bool = True
    # A payment that settled on chain but whose answer never reached the client: pay that need again?
    repay_undelivered: bool = False
    # Approvals (proxy/payments/approvals.py): a price above this waits for a person's decision.
    ask_above: str | None = None
    ask_above_hosts: dict[str, str] = field(default_factory=dict)  # host -> threshold, beats ask_above
    ask_timeout: float = 60.0  # seconds a payment waits for a decision, then approval_timeout

    def validate(self) -> None:
        """Checks that need no network table (the config loader calls this)."""
        for name in ("max_per_payment", "daily_budget", "per_host_daily_budget"):
            _budget_units(getattr(self, name), name)
        if self.ask_above is not None:
            _budget_units(self.ask_above, "ask_above")
        for host, threshold in self.ask_above_hosts.items():
            _budget_units(threshold, f"ask_above_hosts.{host}")
        if not 1 <= float(self.ask_timeout) <= 3600:
            raise ConfigValueError(
                "ask_timeout", f"must be between 1 and 3600 seconds, got {self.ask_timeout}"
            )
        for name in ("allowed_assets", "pay_to_allow", "pay_to_deny"):
            for entry in getattr(self, name):
                if not isinstance(entry, str) or not is_evm_address(entry.strip()):
                    # A typo in a deny list must never fail open: refuse to start instead.
                    raise ConfigValueError(name, f"{entry!r} is not a 0x-prefixed 40-hex-digit address")
        for name in ("host_allow", "host_deny"):
            for entry in getattr(self, name):
                if not isinstance(entry, str) or not entry.strip():
                    raise ConfigValueError(name, "host patterns must be non-empty strings")


def _budget_units(text: object, name: str) -> int:
    try:
        return decimal_to_base_units(parse_decimal(text, what=name), BUDGET_DECIMALS, what=name)
    except AmountError as exc:
        raise ConfigValueError(name, str(exc)) from None


@dataclass(frozen=True)
class Policy:
    """PolicyConfig compiled against the network table: ids normalized, amounts in budget units."""

    allowed_networks: frozenset[str]
    all_testnets: bool
    allow_mainnet: bool
    allowed_assets: frozenset[str]
    pay_to_allow: frozenset[str]
    pay_to_deny: frozenset[str]
    host_allow: tuple[str, ...]
    host_deny: tuple[str, ...]
    max_per_payment: int
    daily_budget: int
    per_host_daily_budget: int
    dry_run: bool
    enable_upto: bool
    allow_permit2: bool
    repay_undelivered: bool = False
    ask_above: int | None = None  # budget units; None: never ask
    ask_above_hosts: Mapping[str, int] = field(default_factory=dict)  # canonical host -> budget units
    ask_timeout: float = 60.0

    @classmethod
    def compile(cls, config: PolicyConfig, networks: NetworkRegistry) -> Policy:
        config.validate()
        allowed: set[str] = set()
        all_testnets = False
        for entry in config.allowed_networks:
            if entry.strip().lower() == TESTNETS_KEYWORD:
                all_testnets = True
                continue
            network = networks.lookup(entry)
            if network is None:
                raise ConfigValueError("allowed_networks", f"unknown network {entry!r}")
            allowed.add(network.caip2)
        return cls(
            allowed_networks=frozenset(allowed),
            all_testnets=all_testnets,
            allow_mainnet=config.allow_mainnet,
            allowed_assets=frozenset(a.strip().lower() for a in config.allowed_assets),
            pay_to_allow=frozenset(a.strip().lower() for a in config.pay_to_allow),
            pay_to_deny=frozenset(a.strip().lower() for a in config.pay_to_deny),
            host_allow=tuple(normalize_host_pattern(p) for p in config.host_allow),
            host_deny=tuple(normalize_host_pattern(p) for p in config.host_deny),
            max_per_payment=_budget_units(config.max_per_payment, "max_per_payment"),
            daily_budget=_budget_units(config.daily_budget, "daily_budget"),
            per_host_daily_budget=_budget_units(config.per_host_daily_budget, "per_host_daily_budget"),
            dry_run=config.dry_run,
            enable_upto=config.enable_upto,
            allow_permit2=config.allow_permit2,
            repay_undelivered=bool(config.repay_undelivered),
            ask_above=None if config.ask_above is None else _budget_units(config.ask_above, "ask_above"),
            ask_above_hosts={
                normalize_host(host): _budget_units(value, f"ask_above_hosts.{host}")
                for host, value in config.ask_above_hosts.items()
            },
            ask_timeout=float(config.ask_timeout),
        )


@dataclass(frozen=True)
class PaymentContext:
    """What the decision needs to know about the world; gathered by the Payer."""

    host: str
    url: str
    now: float
    spent_today_global: int  # budget units, counting pending + settled + unknown
    spent_today_host: int
    # Token balances in atomic units keyed by (CAIP-2 network, lower-case asset address);
    # None or a missing key means "unknown" and skips the balance check.
    balances: Mapping[tuple[str, str], int] | None = None
    # Ledger id of an earlier payment for the same request whose authorization is still valid and whose
    # outcome is unknown (it may still settle) or was found settled on chain after a crash (the answer
    # it bought never reached the client). Paying again could pay twice for one need.
    in_doubt_payment_id: int | None = None


@dataclass(frozen=True)
class Selection:
    requirement: Requirement
    network: Network
    asset: Asset
    amount: int  # atomic units of `asset`
    budget_units: int
    transfer_method: str  # eip3009 | permit2

    @property
    def scheme(self) -> str:
        return self.requirement.scheme

    def describe(self) -> str:
        return (
            f"{format_units(self.amount, self.asset.decimals)} {self.asset.symbol} on {self.network.name} "
            f"to {self.requirement.pay_to} ({self.scheme}/{self.transfer_method})"
        )


@dataclass(frozen=True)
class Refusal:
    reason_code: ReasonCode
    detail: str
    requirement_index: int | None = None


# Stages in check order; a refusal from a later stage is more informative.
_STAGE_SCHEME = 0
_STAGE_NETWORK = 1
_STAGE_ASSET = 2
_STAGE_PAY_TO = 3
_STAGE_CAP = 4
_STAGE_BUDGET = 5
_STAGE_BALANCE = 6


@dataclass(frozen=True)
class _Rejected:
    stage: int
    refusal: Refusal


def host_allowed(host: str, policy: Policy) -> bool:
    """Deny globs win over allow globs; an empty allow list allows every host. Hosts and literal
    entries are compared in canonical form (``proxy.hosts``), never as the text a client wrote."""
    name = normalize_host(host)
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.host_deny):
        return False
    if not policy.host_allow:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.host_allow)


def network_allowed(network: Network, policy: Policy) -> str | None:
    """None if allowed, else why not."""
    listed = network.caip2 in policy.allowed_networks or (network.testnet and policy.all_testnets)
    if not listed:
        return f"network {network.name} ({network.caip2}) is not in allowed_networks"
    if not network.testnet and not policy.allow_mainnet:
        return f"network {network.name} is a mainnet and allow_mainnet is false"
    return None


def eip712_domain(requirement: Requirement, asset: Asset) -> tuple[str, str] | None:
    """(name, version) for EIP-3009 signing: the server's `extra` first, our asset table second."""
    name = requirement.extra.get("name")
    version = requirement.extra.get("version")
    if not isinstance(name, str) or not name:
        name = asset.eip712_name
    if not isinstance(version, str) or not version:
        version = asset.eip712_version
    if not name or not version:
        return None
    return name, version


def choose_requirement(
    challenge: Challenge, policy: Policy, assets: AssetRegistry, ctx: PaymentContext
) -> Selection | Refusal:
    if not host_allowed(ctx.host, policy):
        return Refusal(
            ReasonCode.HOST_NOT_ALLOWED, f"host {normalize_host(ctx.host)} is not allowed by policy"
        )
    if ctx.in_doubt_payment_id is not None:
        return Refusal(
            ReasonCode.PAYMENT_IN_DOUBT,
            f"payment #{ctx.in_doubt_payment_id} for this request was paid or may still settle, and its "
            "answer never arrived; not paying again until its authorization expires or the chain shows "
            "it unused",
        )
    accepted: list[Selection] = []
    rejected: list[_Rejected] = []
    for requirement in challenge.requirements:
        outcome = _check(requirement, challenge.version, policy, assets, ctx)
        if isinstance(outcome, Selection):
            accepted.append(outcome)
        else:
            rejected.append(outcome)
    if accepted:
        return min(accepted, key=_preference)
    best = max(rejected, key=lambda r: (r.stage, -(r.refusal.requirement_index or 0)))
    return best.refusal


def _preference(selection: Selection) -> tuple[int, int, int, int]:
    return (
        0 if selection.scheme == "exact" else 1,
        selection.budget_units,
        0 if selection.transfer_method == "eip3009" else 1,
        selection.requirement.index,
    )


def _check(
    req: Requirement, version: int, policy: Policy, assets: AssetRegistry, ctx: PaymentContext
) -> Selection | _Rejected:
    def refuse(stage: int, code: ReasonCode, detail: str) -> _Rejected:
        return _Rejected(stage, Refusal(code, detail, req.index))

    # 1. scheme
    if req.scheme == "exact":
        if req.transfer_method == "permit2" and not policy.allow_permit2:
            return refuse(
                _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, "exact/permit2 disabled (allow_permit2)"
            )
        if req.transfer_method == "permit2" and version == 1:
            return refuse(
                _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, "permit2 is not defined for x402 V1"
            )
    elif req.scheme == "upto":
        if not policy.enable_upto:
            return refuse(
                _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, "scheme 'upto' disabled (enable_upto)"
            )
        if version == 1:
            return refuse(
                _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, "scheme 'upto' is not defined for V1"
            )
        if not isinstance(req.extra.get("facilitatorAddress"), str):
            return refuse(
                _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, "upto requires extra.facilitatorAddress"
            )
    else:
        return refuse(
            _STAGE_SCHEME, ReasonCode.SCHEME_NOT_SUPPORTED, f"scheme {req.scheme!r} is not supported"
        )

    # 2. network
    if not req.is_evm:
        return refuse(
            _STAGE_NETWORK, ReasonCode.NETWORK_NOT_ALLOWED, f"network {req.network_raw!r} is not EVM"
        )
    network = assets.networks.lookup(req.network)
    if network is None:
        return refuse(_STAGE_NETWORK, ReasonCode.NETWORK_NOT_ALLOWED, f"unknown network {req.network_raw!r}")
    why_not = network_allowed(network, policy)
    if why_not:
        return refuse(_STAGE_NETWORK, ReasonCode.NETWORK_NOT_ALLOWED, why_not)

    # 3. asset
    if policy.allowed_assets and req.asset.lower() not in policy.allowed_assets:
        return refuse(
            _STAGE_ASSET, ReasonCode.ASSET_NOT_ALLOWED, f"asset {req.asset} is not in allowed_assets"
        )
    asset = assets.find(network.caip2, req.asset)
    if asset is None:
        return refuse(
            _STAGE_ASSET,
            ReasonCode.ASSET_NOT_ALLOWED,
            f"asset {req.asset} on {network.name} is unknown (decimals unknown); configure it to allow it",
        )
    if req.transfer_method == "eip3009" and eip712_domain(req, asset) is None:
        return refuse(
            _STAGE_ASSET, ReasonCode.ASSET_NOT_ALLOWED, f"no EIP-712 name/version for asset {req.asset}"
        )

    # 4. recipient
    pay_to = req.pay_to.lower()
    if pay_to in policy.pay_to_deny:
        return refuse(
            _STAGE_PAY_TO, ReasonCode.PAY_TO_NOT_ALLOWED, f"recipient {req.pay_to} is in pay_to_deny"
        )
    if policy.pay_to_allow and pay_to not in policy.pay_to_allow:
        return refuse(
            _STAGE_PAY_TO, ReasonCode.PAY_TO_NOT_ALLOWED, f"recipient {req.pay_to} is not in pay_to_allow"
        )

    # 5. amount: not zero, within the per-payment cap
    units = to_budget_units(req.amount, asset.decimals)
    shown = f"{format_units(req.amount, asset.decimals)} {asset.symbol}"
    if req.amount == 0:
        return refuse(
            _STAGE_CAP, ReasonCode.ZERO_AMOUNT, f"the price is {shown}; a zero-value payment is never signed"
        )
    if units > policy.max_per_payment:
        return refuse(
            _STAGE_CAP,
            ReasonCode.OVER_MAX_PER_PAYMENT,
            f"{shown} exceeds max_per_payment {format_budget_units(policy.max_per_payment)}",
        )

    # 6. budgets (pending + settled + unknown payments already count)
    if ctx.spent_today_global + units > policy.daily_budget:
        return refuse(
            _STAGE_BUDGET,
            ReasonCode.BUDGET_EXHAUSTED,
            f"{shown} would exceed daily_budget {format_budget_units(policy.daily_budget)} "
            f"(spent {format_budget_units(ctx.spent_today_global)} in the last 24h)",
        )
    if ctx.spent_today_host + units > policy.per_host_daily_budget:
        return refuse(
            _STAGE_BUDGET,
            ReasonCode.BUDGET_EXHAUSTED,
            f"{shown} would exceed per_host_daily_budget {format_budget_units(policy.per_host_daily_budget)} "
            f"for {normalize_host(ctx.host)} (spent {format_budget_units(ctx.spent_today_host)})",
        )

    # 7. balance (advisory: only when the Payer could look it up)
    if ctx.balances is not None:
        balance = ctx.balances.get((network.caip2, req.asset.lower()))
        if balance is not None and balance < req.amount:
            return refuse(
                _STAGE_BALANCE,
                ReasonCode.INSUFFICIENT_BALANCE,
                f"{shown} needed, wallet holds {format_units(balance, asset.decimals)} {asset.symbol}",
            )

    return Selection(req, network, asset, req.amount, units, req.transfer_method)


def candidate_assets(challenge: Challenge, policy: Policy, assets: AssetRegistry) -> list[tuple[str, str]]:
    """(network, asset) pairs worth a balance lookup: those whose network and asset pass policy."""
    pairs: list[tuple[str, str]] = []
    for req in challenge.requirements:
        network = assets.networks.lookup(req.network) if req.is_evm else None
        if network is None or network_allowed(network, policy) is not None:
            continue
        if assets.find(network.caip2, req.asset) is None:
            continue
        pair = (network.caip2, req.asset.lower())
        if pair not in pairs:
            pairs.append(pair)
    return pairs
