"""`[channels]`: whether the proxy holds batch-settlement channels, and how much it deposits."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.payments.amounts import AmountError, parse_decimal
from proxy.payments.errors import ConfigValueError


@dataclass
class ChannelSettings:
    # Off by default: a challenge offering batch-settlement is paid by its other options (exact), if any.
    enabled: bool = False
    # The deposit: this many prices of the first request (deposit_amount, when set, wins).
    deposit_prices: int = 10
    # The deposit as an amount in the asset's units (e.g. "0.01"); empty = deposit_prices x price.
    deposit_amount: str = ""
    # Never deposit more than this (asset units) into one channel; counted in budgets as committed money.
    max_deposit: str = "0.05"
    # How often ended/expired channel sessions are looked for and refunded (seconds).
    refund_interval: float = 1.0

    def validate(self) -> None:
        if not 1 <= int(self.deposit_prices) <= 10_000:
            raise ConfigValueError("deposit_prices", f"must be 1..10000, got {self.deposit_prices}")
        for name in ("deposit_amount", "max_deposit"):
            text = getattr(self, name)
            if name == "deposit_amount" and not text:
                continue
            try:
                if parse_decimal(text, what=name) <= 0:
                    raise ConfigValueError(name, "must be above 0")
            except AmountError as exc:
                raise ConfigValueError(name, str(exc)) from None
        if not 0.05 <= float(self.refund_interval) <= 3600:
            raise ConfigValueError("refund_interval", "must be between 0.05 and 3600 seconds")
