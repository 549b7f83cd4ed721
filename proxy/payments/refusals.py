"""Refusals on record: the one place a refused 402 is written down (called by `proxy/purchase/flow.py`).

Each refusal of the payer (the client gets the server's 402 plus `X-402-Proxy-Error: <reason>`, unless
the session stage then serves a `payment_undelivered` retry through the session it claims) is counted by
reason (`x402_proxy_refusals_total`, in memory, since the process started) and written as
one row to the `refusals` table (`proxy/store/refusal_store.py`). The write never stands between the
client and its answer: a failure (locked, disk full, read-only, closed) is logged and the answer goes
on. `dry_run` answers are not refusals here: they are ledger rows already (state `dry_run`).

The amount asked is the cheapest option the challenge offered in an asset whose decimals we know
(budget units, ties: the server's first), with its asset, network and payTo; none when the challenge
could not be read or offered no such asset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.hosts import normalize_host
from proxy.payments.amounts import to_budget_units
from proxy.payments.assets import AssetRegistry
from proxy.payments.challenge import MalformedChallenge, parse_challenge
from proxy.payments.policy import ReasonCode
from proxy.store.refusal_store import NewRefusal, SqliteRefusalStore

log = logging.getLogger("x402_proxy.payments")

NOT_RECORDED = frozenset({ReasonCode.DRY_RUN.value})
# Reasons a refusal row can carry (the `reason` filter of GET /refusals).
RECORDED_REASONS = tuple(code.value for code in ReasonCode if code.value not in NOT_RECORDED)


@dataclass(frozen=True)
class Asked:
    amount: int
    decimals: int
    asset: str
    network: str
    pay_to: str


def cheapest_offer(headers: Mapping[str, str], body: bytes, assets: AssetRegistry) -> Asked | None:
    """The cheapest option of a 402's challenge in an asset we know, or None. Pure; never raises."""
    try:
        challenge = parse_challenge(402, headers, body, assets.networks)
    except MalformedChallenge:
        return None
    if challenge is None:
        return None
    best: tuple[int, Asked] | None = None
    for requirement in challenge.requirements:
        network = assets.networks.lookup(requirement.network) if requirement.is_evm else None
        asset = assets.find(network.caip2, requirement.asset) if network is not None else None
        if network is None or asset is None:
            continue
        units = to_budget_units(requirement.amount, asset.decimals)
        if best is None or units < best[0]:
            offer = Asked(
                requirement.amount, asset.decimals, requirement.asset, network.caip2, requirement.pay_to
            )
            best = (units, offer)
    return None if best is None else best[1]


class RefusalRecorder:
    """Counts every refusal by reason and keeps it in the store (when there is one)."""

    def __init__(
        self,
        store: SqliteRefusalStore | None,
        assets: AssetRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.assets = assets
        self.clock = clock
        self.counts: dict[str, int] = dict.fromkeys(RECORDED_REASONS, 0)

    def record(
        self,
        *,
        reason: str,
        detail: str,
        method: str,
        url: str,
        host: str,
        headers: Mapping[str, str],
        body: bytes,
        payment_id: int | None = None,
        session_id: str | None = None,
    ) -> None:
        if reason in NOT_RECORDED:
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.store is None:
            return
        try:
            asked = cheapest_offer(headers, body, self.assets)
            self.store.add(
                NewRefusal(
                    host=normalize_host(host),
                    method=method,
                    url=url,
                    reason=reason,
                    detail=detail,
                    amount=asked.amount if asked else None,
                    decimals=asked.decimals if asked else None,
                    asset=asked.asset if asked else None,
                    network=asked.network if asked else None,
                    pay_to=asked.pay_to if asked else None,
                    payment_id=payment_id,
                    session_id=session_id,
                ),
                now=self.clock(),
            )
        except Exception as exc:  # bookkeeping: the client's answer never waits on it or fails with it
            log.error("refusal %s for %s %s not recorded: %s", reason, method, url, exc)
