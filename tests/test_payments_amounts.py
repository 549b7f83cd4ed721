from decimal import Decimal

import pytest

from proxy.payments.amounts import (
    AmountError,
    decimal_to_base_units,
    format_units,
    parse_decimal,
    to_budget_units,
)


@pytest.mark.parametrize(
    ("text", "decimals", "expected"),
    [
        ("0.10", 6, 100_000),
        ("1", 6, 1_000_000),
        ("1.000000", 6, 1_000_000),
        ("0.000001", 6, 1),
        ("0", 6, 0),
        ("1e-6", 6, 1),
        ("0.1", 18, 10**17),
        ("123456789012345678901234567890.123456", 6, 123456789012345678901234567890123456),
        (5, 6, 5_000_000),
    ],
)
def test_decimal_to_base_units_is_exact(text: object, decimals: int, expected: int) -> None:
    assert decimal_to_base_units(parse_decimal(text, what="x"), decimals, what="x") == expected


def test_more_decimals_than_the_asset_has_is_refused_not_rounded() -> None:
    with pytest.raises(AmountError, match="more than 6 decimal places"):
        decimal_to_base_units(Decimal("0.0000001"), 6, what="max_per_payment")


@pytest.mark.parametrize("bad", [0.1, True, "-1", "abc", "", "NaN", "Infinity", "1/3", None, "1" * 200])
def test_parse_decimal_refuses_floats_negatives_and_junk(bad: object) -> None:
    with pytest.raises(AmountError):
        parse_decimal(bad, what="x")


def test_budget_units_make_assets_with_different_decimals_comparable() -> None:
    one_usdc = to_budget_units(1_000_000, 6)
    one_eighteen = to_budget_units(10**18, 18)
    assert one_usdc == one_eighteen == 10**18
    with pytest.raises(ValueError):
        to_budget_units(1, 19)


def test_format_units() -> None:
    assert format_units(10_000, 6) == "0.01"
    assert format_units(1_000_000, 6) == "1"
    assert format_units(1_234_567, 6) == "1.234567"
    assert format_units(5, 0) == "5"
    assert format_units(2**256 - 1, 6).startswith(
        "115792089237316195423570985008687907853269984665640564039457584007913"
    )
