"""Durable state: the payment ledger (and, later, sessions) in one SQLite file, ``<home>/state.db``."""

from proxy.store.base import (
    LedgerStore,
    NewPayment,
    PaymentRecord,
    PaymentState,
    SpendTotals,
    StoreError,
)

__all__ = ["LedgerStore", "NewPayment", "PaymentRecord", "PaymentState", "SpendTotals", "StoreError"]
