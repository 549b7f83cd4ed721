from typing import Any

import pytest

from proxy.payments.amounts import to_budget_units
from proxy.payments.assets import AssetConfig, AssetRegistry
from proxy.payments.challenge import Challenge, parse_challenge
from proxy.payments.errors import ConfigValueError
from proxy.payments.networks import NetworkConfig, NetworkRegistry
from proxy.payments.policy import (
    PaymentContext,
    Policy,
    PolicyConfig,
    ReasonCode,
    Refusal,
    Selection,
    choose_requirement,
    host_allowed,
    normalize_host,
)
from tests.test_payments_fixtures import (
    AMOY_USDC,
    BASE_SEPOLIA_USDC,
    BASE_USDC,
    OTHER_PAY_TO,
    PAY_TO,
    v1_requirement,
    v1_response,
    v2_requirement,
    v2_response,
)

LOCAL_TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
NETWORKS = NetworkRegistry(extra=[NetworkConfig("eip155:31337", testnet=True, v1_name="anvil")])
ASSETS = AssetRegistry(
    NETWORKS,
    [AssetConfig("anvil", LOCAL_TOKEN, 18, "TUSD", "Test USD", "1")],
)


def usd(units: str) -> int:
    """Budget units for a decimal amount of USD."""
    whole, _, frac = units.partition(".")
    return int(whole) * 10**18 + int((frac or "0").ljust(18, "0"))


def ctx(**overrides: Any) -> PaymentContext:
    values: dict[str, Any] = {
        "host": "shop.test",
        "url": "http://shop.test/paid",
        "now": 1_800_000_000.0,
        "spent_today_global": 0,
        "spent_today_host": 0,
    }
    values.update(overrides)
    return PaymentContext(**values)


def policy(**overrides: Any) -> Policy:
    return Policy.compile(PolicyConfig(**overrides), NETWORKS)


def challenge(*accepts: dict[str, Any]) -> Challenge:
    parsed = parse_challenge(*v2_response(*accepts))
    assert parsed is not None
    return parsed


def decide(chal: Challenge, pol: Policy | None = None, **context: Any) -> Selection | Refusal:
    return choose_requirement(chal, pol or policy(), ASSETS, ctx(**context))


def refused(result: Selection | Refusal, code: ReasonCode) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason_code is code, result
    return result


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_pay_a_small_testnet_usdc_challenge() -> None:
    result = decide(challenge())
    assert isinstance(result, Selection)
    assert result.amount == 10_000
    assert result.budget_units == usd("0.01")
    assert result.network.caip2 == "eip155:84532"
    assert result.asset.decimals == 6
    assert result.transfer_method == "eip3009"


def test_policy_config_defaults_match_the_brief() -> None:
    cfg = PolicyConfig()
    assert cfg.allow_mainnet is False and cfg.dry_run is False and cfg.enable_upto is False
    assert cfg.allow_permit2 is True
    compiled = policy()
    assert compiled.max_per_payment == usd("0.10")
    assert compiled.daily_budget == usd("1.00")
    assert compiled.per_host_daily_budget == usd("0.50")
    assert compiled.all_testnets and not compiled.allowed_networks


def test_v1_challenge_is_chosen_the_same_way() -> None:
    parsed = parse_challenge(*v1_response())
    assert parsed is not None
    assert isinstance(decide(parsed), Selection)


# --- choice among requirements -----------------------------------------------------------------


def test_exact_is_preferred_then_the_cheapest() -> None:
    upto = v2_requirement(scheme="upto", amount="1000", extra={"facilitatorAddress": OTHER_PAY_TO})
    dear = v2_requirement(amount="50000")
    cheap = v2_requirement(amount="20000")
    result = decide(challenge(upto, dear, cheap), policy(enable_upto=True))
    assert isinstance(result, Selection)
    assert result.requirement.index == 2 and result.scheme == "exact"


def test_cheapest_is_compared_across_assets_with_different_decimals() -> None:
    # 0.02 TUSD (18 decimals) vs 0.03 USDC (6 decimals)
    tusd = v2_requirement(network="eip155:31337", asset=LOCAL_TOKEN, amount=str(2 * 10**16), extra={})
    usdc = v2_requirement(amount="30000")
    result = decide(challenge(usdc, tusd))
    assert isinstance(result, Selection)
    assert result.asset.symbol == "TUSD" and result.budget_units == usd("0.02")


def test_eip3009_is_preferred_over_permit2_at_equal_price() -> None:
    permit2 = v2_requirement(extra={"assetTransferMethod": "permit2", "name": "USDC", "version": "2"})
    plain = v2_requirement()
    result = decide(challenge(permit2, plain))
    assert isinstance(result, Selection) and result.transfer_method == "eip3009"


# --- every refusal reason ----------------------------------------------------------------------


def test_over_max_per_payment() -> None:
    result = refused(decide(challenge(v2_requirement(amount="100001"))), ReasonCode.OVER_MAX_PER_PAYMENT)
    assert "0.100001 USDC" in result.detail
    assert isinstance(decide(challenge(v2_requirement(amount="100000"))), Selection)  # exactly the cap


def test_zero_amount_is_refused() -> None:
    """A 0-amount requirement is under every cap, but a zero-value authorization buys nothing: never sign one."""
    result = refused(decide(challenge(v2_requirement(amount="0"))), ReasonCode.ZERO_AMOUNT)
    assert result.requirement_index == 0 and "0 USDC" in result.detail
    parsed = parse_challenge(*v1_response(v1_requirement(maxAmountRequired="0")))
    assert parsed is not None
    refused(decide(parsed), ReasonCode.ZERO_AMOUNT)
    upto = v2_requirement(scheme="upto", amount="0", extra={"facilitatorAddress": OTHER_PAY_TO})
    refused(decide(challenge(upto), policy(enable_upto=True)), ReasonCode.ZERO_AMOUNT)
    # dry run simulates a payment; a zero one is refused the same way
    refused(decide(challenge(v2_requirement(amount="0")), policy(dry_run=True)), ReasonCode.ZERO_AMOUNT)
    # a priced option next to the free one is still chosen; the smallest real price passes
    result = decide(challenge(v2_requirement(amount="0"), v2_requirement(amount="1")))
    assert isinstance(result, Selection) and result.requirement.index == 1 and result.amount == 1


def test_network_not_allowed_for_mainnet_by_default() -> None:
    mainnet = v2_requirement(
        network="eip155:8453", asset=BASE_USDC, extra={"name": "USD Coin", "version": "2"}
    )
    result = refused(decide(challenge(mainnet)), ReasonCode.NETWORK_NOT_ALLOWED)
    assert "not in allowed_networks" in result.detail
    listed_but_gated = policy(allowed_networks=["base"])
    assert (
        "allow_mainnet"
        in refused(decide(challenge(mainnet), listed_but_gated), ReasonCode.NETWORK_NOT_ALLOWED).detail
    )
    assert isinstance(
        decide(challenge(mainnet), policy(allowed_networks=["base"], allow_mainnet=True)), Selection
    )
    # allow_mainnet alone does not open every mainnet: the network must be listed too
    refused(decide(challenge(mainnet), policy(allow_mainnet=True)), ReasonCode.NETWORK_NOT_ALLOWED)


def test_network_allow_list_restricts_testnets_too() -> None:
    amoy = v2_requirement(network="polygon-amoy", asset=AMOY_USDC)
    pol = policy(allowed_networks=["base-sepolia"])
    refused(decide(challenge(amoy), pol), ReasonCode.NETWORK_NOT_ALLOWED)
    assert isinstance(decide(challenge(v2_requirement()), pol), Selection)


def test_unknown_and_non_evm_networks_are_not_allowed() -> None:
    refused(decide(challenge(v2_requirement(network="eip155:999999"))), ReasonCode.NETWORK_NOT_ALLOWED)
    solana = v2_requirement(
        network="solana:devnet", asset="So11111111111111111111111111111111111111112", payTo="x"
    )
    refused(decide(challenge(solana)), ReasonCode.NETWORK_NOT_ALLOWED)


def test_asset_not_allowed_when_unknown_or_not_listed() -> None:
    unknown = v2_requirement(asset="0x2222222222222222222222222222222222222222")
    assert "unknown" in refused(decide(challenge(unknown)), ReasonCode.ASSET_NOT_ALLOWED).detail
    pol = policy(allowed_assets=[LOCAL_TOKEN])
    refused(decide(challenge(v2_requirement()), pol), ReasonCode.ASSET_NOT_ALLOWED)
    # case-insensitive address comparison
    pol = policy(allowed_assets=[BASE_SEPOLIA_USDC.lower()])
    assert isinstance(
        decide(challenge(v2_requirement(asset=BASE_SEPOLIA_USDC.upper().replace("0X", "0x"))), pol), Selection
    )


def test_asset_without_eip712_domain_is_not_signable() -> None:
    local = AssetRegistry(NETWORKS, [AssetConfig("anvil", LOCAL_TOKEN, 6, "TUSD")])
    requirement = v2_requirement(network="eip155:31337", asset=LOCAL_TOKEN, extra={})
    result = choose_requirement(challenge(requirement), policy(), local, ctx())
    assert "EIP-712" in refused(result, ReasonCode.ASSET_NOT_ALLOWED).detail


def test_scheme_not_supported() -> None:
    refused(decide(challenge(v2_requirement(scheme="batch-settlement"))), ReasonCode.SCHEME_NOT_SUPPORTED)
    upto = v2_requirement(scheme="upto", extra={"facilitatorAddress": OTHER_PAY_TO})
    refused(decide(challenge(upto)), ReasonCode.SCHEME_NOT_SUPPORTED)
    assert isinstance(decide(challenge(upto), policy(enable_upto=True)), Selection)
    no_facilitator = v2_requirement(scheme="upto", extra={})
    refused(decide(challenge(no_facilitator), policy(enable_upto=True)), ReasonCode.SCHEME_NOT_SUPPORTED)
    permit2 = v2_requirement(extra={"assetTransferMethod": "permit2"})
    refused(decide(challenge(permit2), policy(allow_permit2=False)), ReasonCode.SCHEME_NOT_SUPPORTED)
    assert isinstance(decide(challenge(permit2)), Selection)
    v1_permit2 = parse_challenge(*v1_response(v1_requirement(extra={"assetTransferMethod": "permit2"})))
    assert v1_permit2 is not None
    refused(decide(v1_permit2), ReasonCode.SCHEME_NOT_SUPPORTED)


def test_pay_to_deny_and_allow_lists() -> None:
    refused(decide(challenge(), policy(pay_to_deny=[PAY_TO.lower()])), ReasonCode.PAY_TO_NOT_ALLOWED)
    refused(decide(challenge(), policy(pay_to_allow=[OTHER_PAY_TO])), ReasonCode.PAY_TO_NOT_ALLOWED)
    assert isinstance(
        decide(challenge(), policy(pay_to_allow=[PAY_TO.upper().replace("0X", "0x")])), Selection
    )
    # deny wins over allow
    refused(
        decide(challenge(), policy(pay_to_allow=[PAY_TO], pay_to_deny=[PAY_TO])),
        ReasonCode.PAY_TO_NOT_ALLOWED,
    )


def test_host_allow_and_deny_globs() -> None:
    refused(decide(challenge(), policy(host_deny=["*.test"])), ReasonCode.HOST_NOT_ALLOWED)
    refused(decide(challenge(), policy(host_allow=["api.example.com"])), ReasonCode.HOST_NOT_ALLOWED)
    assert isinstance(decide(challenge(), policy(host_allow=["SHOP.TEST"])), Selection)
    pol = policy(host_allow=["*.example.com"], host_deny=["evil.example.com"])
    assert host_allowed("api.example.com:443", pol)
    assert host_allowed("API.Example.COM.", pol)
    assert not host_allowed("evil.example.com", pol)
    assert not host_allowed("example.com", pol)
    assert not host_allowed("api.example.com.evil.net", pol)


def test_normalize_host() -> None:
    assert normalize_host("API.x.com.:443") == "api.x.com"
    assert normalize_host("[::1]:8080") == "::1"
    assert normalize_host("127.0.0.1:80") == "127.0.0.1"


def test_budget_exhausted_global_and_per_host() -> None:
    chal = challenge(v2_requirement(amount="100000"))  # 0.10
    assert isinstance(decide(chal, spent_today_global=usd("0.90")), Selection)  # exactly fills it
    result = refused(decide(chal, spent_today_global=usd("0.900001")), ReasonCode.BUDGET_EXHAUSTED)
    assert "daily_budget" in result.detail
    result = refused(decide(chal, spent_today_host=usd("0.45")), ReasonCode.BUDGET_EXHAUSTED)
    assert "per_host_daily_budget" in result.detail


def test_insufficient_balance_only_when_known() -> None:
    key = ("eip155:84532", BASE_SEPOLIA_USDC.lower())
    refused(decide(challenge(), balances={key: 9_999}), ReasonCode.INSUFFICIENT_BALANCE)
    assert isinstance(decide(challenge(), balances={key: 10_000}), Selection)
    assert isinstance(decide(challenge(), balances={}), Selection)  # unknown balance: not checked


def test_payment_in_doubt() -> None:
    result = refused(decide(challenge(), in_doubt_payment_id=7), ReasonCode.PAYMENT_IN_DOUBT)
    assert "#7" in result.detail


def test_the_most_informative_refusal_is_reported() -> None:
    wrong_network = v2_requirement(network="eip155:8453", asset=BASE_USDC)
    too_dear = v2_requirement(amount="5000000")
    unknown_scheme = v2_requirement(scheme="streaming")
    result = refused(
        decide(challenge(wrong_network, unknown_scheme, too_dear)), ReasonCode.OVER_MAX_PER_PAYMENT
    )
    assert result.requirement_index == 2
    # ties go to the server's first option
    result = refused(
        decide(challenge(v2_requirement(scheme="a"), v2_requirement(scheme="b"))),
        ReasonCode.SCHEME_NOT_SUPPORTED,
    )
    assert result.requirement_index == 0


# --- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_per_payment", "-0.1"),
        ("max_per_payment", "abc"),
        ("daily_budget", 0.5),
        ("per_host_daily_budget", "NaN"),
        ("max_per_payment", "0.0000000000000000001"),  # finer than budget units (18 decimals)
    ],
)
def test_bad_amounts_are_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigValueError) as info:
        PolicyConfig(**{field: value}).validate()  # type: ignore[arg-type]
    assert info.value.field == field


def test_bad_addresses_in_lists_fail_closed() -> None:
    with pytest.raises(ConfigValueError) as info:
        PolicyConfig(pay_to_deny=["0xdeadbeef"]).validate()
    assert info.value.field == "pay_to_deny"


def test_unknown_allowed_network_is_a_config_error() -> None:
    with pytest.raises(ConfigValueError):
        Policy.compile(PolicyConfig(allowed_networks=["atlantis"]), NETWORKS)


def test_integer_and_decimal_amount_strings() -> None:
    assert policy(max_per_payment="1").max_per_payment == usd("1")
    assert policy(max_per_payment="0.000001").max_per_payment == to_budget_units(1, 6)


def test_asset_config_validation() -> None:
    with pytest.raises(ConfigValueError) as info:
        AssetConfig("anvil", LOCAL_TOKEN, 19, "X").validate()
    assert info.value.field == "decimals"
    with pytest.raises(ConfigValueError):
        AssetRegistry(NETWORKS, [AssetConfig("atlantis", LOCAL_TOKEN, 6, "X")])
