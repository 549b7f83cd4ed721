"""One small interface per payment kind: what the purchase flow needs to know to sign a selection.

The flow never asks how a kind signs, only: do you handle this selection, which authorization window
goes into the ledger row before signing (`window`), and sign it (`sign`). The kinds today are the two
signing paths of the `exact`/`upto` schemes (EIP-3009 `transferWithAuthorization`, Permit2); a channel
scheme (batch-settlement: a deposit, then vouchers) is a third kind with state of its own.
In the spirit of lnget's `Scheme`: adding a kind adds a class here, not a branch in the flow.
"""

from __future__ import annotations

from typing import Protocol

from proxy.payments.challenge import Challenge
from proxy.payments.policy import Selection
from proxy.payments.signer import (
    AuthorizationWindow,
    PaymentHeader,
    SigningError,
    build_payment_header,
    plan_authorization,
)
from proxy.payments.wallet import Wallet


class Scheme(Protocol):
    name: str

    def handles(self, selection: Selection) -> bool: ...

    def window(self, selection: Selection, now: float) -> AuthorizationWindow:
        """Nonce and validity, chosen before the ledger row is written (the row records them)."""
        ...

    def sign(
        self,
        challenge: Challenge,
        selection: Selection,
        wallet: Wallet,
        now: float,
        payment_id: str | None,
        window: AuthorizationWindow,
    ) -> PaymentHeader: ...


class _SignerScheme:
    """A kind the signer module signs (its `build_payment_header` does the cryptography)."""

    name = ""
    schemes: frozenset[str] = frozenset()
    transfer_method = ""

    def handles(self, selection: Selection) -> bool:
        return selection.scheme in self.schemes and selection.transfer_method == self.transfer_method

    def window(self, selection: Selection, now: float) -> AuthorizationWindow:
        return plan_authorization(selection, now)

    def sign(
        self,
        challenge: Challenge,
        selection: Selection,
        wallet: Wallet,
        now: float,
        payment_id: str | None,
        window: AuthorizationWindow,
    ) -> PaymentHeader:
        return build_payment_header(challenge, selection, wallet, now, payment_id, window)


class ExactEip3009(_SignerScheme):
    """`exact` with an EIP-3009 authorization: our nonce and window, recorded before signing."""

    name = "exact/eip3009"
    schemes = frozenset({"exact"})
    transfer_method = "eip3009"


class Permit2(_SignerScheme):
    """`exact` and `upto` through Permit2: the SDK draws nonce and deadline; recorded after signing."""

    name = "permit2"
    schemes = frozenset({"exact", "upto"})
    transfer_method = "permit2"


class Unsupported(_SignerScheme):
    """No kind handles the selection: its row is closed as not signed (`scheme_not_supported`)."""

    name = "unsupported"

    def handles(self, selection: Selection) -> bool:
        return True

    def sign(
        self,
        challenge: Challenge,
        selection: Selection,
        wallet: Wallet,
        now: float,
        payment_id: str | None,
        window: AuthorizationWindow,
    ) -> PaymentHeader:
        raise SigningError(f"cannot sign {selection.scheme}/{selection.transfer_method}")


SCHEMES: tuple[Scheme, ...] = (ExactEip3009(), Permit2())
_UNSUPPORTED = Unsupported()


def signed_by_the_sdk(challenge: Challenge) -> bool:
    """Whether a requirement of `challenge` would be signed through the x402 SDK (Permit2, upto), whose
    EVM package the payer then loads off the loop before deciding (proxy/warmup.py `SDK_PATH`)."""
    return any(req.transfer_method == "permit2" for req in challenge.requirements)


def scheme_for(selection: Selection, schemes: tuple[Scheme, ...] = SCHEMES) -> Scheme:
    for scheme in schemes:
        if scheme.handles(selection):
            return scheme
    return _UNSUPPORTED
