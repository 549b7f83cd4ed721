"""Exact money arithmetic: decimal strings in config, integers on the wire, never floats.

Budgets span several assets (USDC on Base, USDC on Polygon, a configured stablecoin with 18
decimals...). We assume every allowed asset is a USD stablecoin (1 unit == 1 USD) and compare
amounts in *budget units*: integers scaled to 18 decimals. Any asset amount with <= 18 decimals
converts to budget units exactly, so sums and comparisons never round.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

BUDGET_DECIMALS = 18
"""Budget units are 10**-18 of an asset unit (think "atto-dollars")."""

MAX_ASSET_DECIMALS = BUDGET_DECIMALS
"""Assets with more decimals than this cannot be converted to budget units exactly: rejected in config."""

UINT256_MAX = 2**256 - 1


class AmountError(ValueError):
    """A configured amount is not a valid non-negative decimal."""


def parse_decimal(text: object, *, what: str) -> Decimal:
    """Parse a config amount such as ``"0.10"``. Floats are refused: 0.1 is not 1/10 in binary."""
    if isinstance(text, bool) or isinstance(text, float):
        raise AmountError(f'{what} must be a decimal string like "0.10", not a float ({text!r})')
    if isinstance(text, int):
        text = str(text)
    if isinstance(text, Decimal):
        value = text
    elif isinstance(text, str):
        stripped = text.strip()
        if not stripped or len(stripped) > 100:
            raise AmountError(f'{what} must be a decimal string like "0.10", got {text!r}')
        try:
            value = Decimal(stripped)
        except InvalidOperation:
            raise AmountError(f'{what} must be a decimal string like "0.10", got {text!r}') from None
    else:
        raise AmountError(f'{what} must be a decimal string like "0.10", got {type(text).__name__}')
    if not value.is_finite():
        raise AmountError(f"{what} must be a finite number, got {text!r}")
    if value < 0:
        raise AmountError(f"{what} must not be negative, got {text!r}")
    return value


def decimal_to_base_units(value: Decimal, decimals: int, *, what: str) -> int:
    """Convert asset units to integer base units; refuse values finer than the asset can express.

    Works on the decimal digits directly (no Decimal context), so nothing is ever rounded.
    """
    sign, digits, exponent = value.as_tuple()
    coefficient = int("".join(map(str, digits)) or "0")
    if (sign and coefficient) or not isinstance(exponent, int):
        raise AmountError(f"{what} must be a finite non-negative number, got {value}")
    shift = exponent + decimals
    if shift >= 0:
        return coefficient * _pow10(shift)
    whole, remainder = divmod(coefficient, _pow10(-shift))
    if remainder:
        raise AmountError(f"{what} = {value} has more than {decimals} decimal places")
    return whole


def to_budget_units(amount: int, decimals: int) -> int:
    """Base units of an asset with `decimals` -> budget units (exact; decimals must be <= 18)."""
    if not 0 <= decimals <= MAX_ASSET_DECIMALS:
        raise ValueError(f"asset decimals must be 0..{MAX_ASSET_DECIMALS}, got {decimals}")
    return amount * _pow10(BUDGET_DECIMALS - decimals)


def _pow10(exponent: int) -> int:
    if exponent < 0:
        raise ValueError("negative exponent")
    return int(10**exponent)


def format_units(amount: int, decimals: int) -> str:
    """Human text for an integer amount: format_units(10000, 6) == "0.01" (integer math, exact)."""
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), _pow10(decimals))
    if decimals == 0 or fraction == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{decimals}d}".rstrip("0")


def format_budget_units(units: int) -> str:
    return format_units(units, BUDGET_DECIMALS)
