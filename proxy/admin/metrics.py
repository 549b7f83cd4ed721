"""Prometheus metrics for `GET /metrics`, in a registry of their own (never the global one).

Two cheap stages count proxied requests by outcome and time upstream answers, and the refusal recorder
counts refusals by reason (`proxy/payments/refusals.py`); everything else is read at scrape time (the
ledger and the session table, through a read-only SQLite connection), so the request path pays one
counter increment and one histogram observation, nothing more.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.engine.exchange import Exchange, Exchanger, Outcome
from proxy.engine.upstream import UpstreamError
from proxy.store.base import StateTotal, StoreError

if TYPE_CHECKING:
    from proxy.sessions.manager import SessionManager
    from proxy.store.base import AsyncLedgerStore

log = logging.getLogger("x402_proxy.admin")

CONTENT_TYPE = CONTENT_TYPE_LATEST
OUTCOMES = ("forwarded", "paid", "session", "payment_required", "payment_refused", "upstream_error", "error")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def classify(outcome: Outcome) -> str:
    """One word for what happened to a proxied request (from the outcome's fields)."""
    if outcome.response.status == 402:
        return "payment_refused" if outcome.error_code is not None else "payment_required"
    if outcome.payment_id is not None:
        return "paid"
    return "session" if outcome.session_id is not None else "forwarded"


class _StoreCollector(Collector):
    """Payments by state and asset, and active sessions, read from the database at scrape time."""

    def __init__(self, db_path: Path, ready: Callable[[], bool], clock: Callable[[], float]) -> None:
        self._db_path = db_path
        self._ready = ready
        self._clock = clock

    # Set by `AdminMetrics.read_through`: the gauges come from the store's own interface (read before each
    # scrape by `refresh`), whichever backend it is, instead of opening state.db.
    snapshot: tuple[Sequence[StateTotal], int] | None = None
    reads_through = False

    def collect(self) -> Iterable[Metric]:
        ready = GaugeMetricFamily("x402_proxy_ready", "1 while the proxy takes new work, 0 while draining")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
        count = GaugeMetricFamily(
            "x402_proxy_payments",
            "Ledger rows by state, network and asset",
            labels=["state", "network", "asset"],
        )
        amount = GaugeMetricFamily(
            "x402_proxy_payments_amount",
            "Sum of ledger amounts by state, network and asset, in the asset's units (e.g. USDC)",
            labels=["state", "network", "asset"],
        )
        sessions = GaugeMetricFamily(
            "x402_proxy_sessions_active", "Sessions that are neither ended nor expired"
        )
        if self.reads_through:
            if self.snapshot is None:  # the store did not answer this scrape: no ledger gauges
                return
            totals, active = self.snapshot
            for total in totals:
                labels = [total.state, total.network, total.asset]
                count.add_metric(labels, float(total.count))
                amount.add_metric(labels, total.amount / 10**total.decimals)
            sessions.add_metric([], float(active))
            yield count
            yield amount
            yield sessions
            return
        try:
            self._read(count, amount, sessions)
        except sqlite3.Error as exc:
            log.warning("metrics: cannot read %s: %s", self._db_path, exc)
            return
        yield count
        yield amount
        yield sessions

    def _read(self, count: GaugeMetricFamily, amount: GaugeMetricFamily, sessions: GaugeMetricFamily) -> None:
        if not self._db_path.exists():
            sessions.add_metric([], 0.0)
            return
        conn = sqlite3.connect(f"{self._db_path.as_uri()}?mode=ro", uri=True, timeout=2.0)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "payments" in tables:
                rows = conn.execute(
                    "SELECT state, network, lower(asset), decimals, COUNT(*), SUM(CAST(amount AS REAL)) "
                    "FROM payments GROUP BY state, network, lower(asset), decimals"
                ).fetchall()
                for state, network, asset, decimals, n, total in rows:
                    labels = [str(state), str(network), str(asset)]
                    count.add_metric(labels, float(n))
                    amount.add_metric(labels, float(total or 0) / 10 ** int(decimals))
            active = 0
            if "sessions" in tables:
                active = conn.execute(
                    "SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL AND expires_at > ?",
                    (self._clock(),),
                ).fetchone()[0]
            sessions.add_metric([], float(active))
        finally:
            conn.close()


class _RefusalCollector(Collector):
    """Refusals by reason since the process started: a counter, so rate() and alerts work (a count of the
    table's rows would flatten once its retention bound is reached). Counted whether or not the refusal
    could be written to the table."""

    def __init__(self) -> None:
        self.counts: Mapping[str, int] = {}

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "x402_proxy_refusals", "402s the proxy refused to pay, by reason code", labels=["reason"]
        )
        for reason, count in sorted(self.counts.items()):
            family.add_metric([reason], float(count))
        yield family


class _TaskCollector(Collector):
    """Live asyncio tasks, counted at scrape time: a task leak shows as a number that only grows."""

    def collect(self) -> Iterable[Metric]:
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop (scraped from a plain thread): nothing to count
            return
        gauge = GaugeMetricFamily("x402_proxy_asyncio_tasks", "Asyncio tasks alive in the proxy's event loop")
        gauge.add_metric([], float(tasks))
        yield gauge


class _RequestStats(Collector):
    """Per-request counts and upstream latency, kept as plain numbers and turned into metrics at scrape
    time: prometheus_client's Counter and Histogram take a lock on every update (~3 % of a small
    proxied request's CPU), and the event loop is the only writer here."""

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.buckets = [0] * len(LATENCY_BUCKETS)  # non-cumulative; the last bucket is +Inf's share
        self.overflow = 0
        self.latency_sum = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if index < len(LATENCY_BUCKETS):
            self.buckets[index] += 1
        else:
            self.overflow += 1

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "x402_proxy_requests", "Proxied requests by outcome", labels=["outcome"]
        )
        for outcome, count in self.outcomes.items():
            requests.add_metric([outcome], float(count))
        yield requests
        cumulative, running = [], 0
        for bound, count in zip(LATENCY_BUCKETS, self.buckets, strict=True):
            running += count
            cumulative.append((_bound(bound), float(running)))
        cumulative.append(("+Inf", float(running + self.overflow)))
        yield HistogramMetricFamily(
            "x402_proxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            buckets=cumulative,
            sum_value=self.latency_sum,
        )


def _bound(value: float) -> str:
    return repr(float(value))


class AdminMetrics:
    def __init__(
        self, db_path: Path, ready: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stats = _RequestStats()
        self.registry.register(self.stats)
        self._store = _StoreCollector(db_path, ready, clock)
        self.registry.register(self._store)
        self._refusals = _RefusalCollector()
        self.registry.register(self._refusals)
        self.registry.register(_TaskCollector())
        self._ledger: AsyncLedgerStore | None = None
        self._sessions: SessionManager | None = None

    def set_ready_probe(self, ready: Callable[[], bool]) -> None:
        self._store._ready = ready

    def read_through(self, ledger: AsyncLedgerStore, sessions: SessionManager | None) -> None:
        """Read the ledger and session gauges through the stores (SQLite or PostgreSQL), via `refresh`."""
        self._ledger, self._sessions = ledger, sessions
        self._store.reads_through = True

    async def refresh(self) -> None:
        """Before a scrape: read the gauges from the stores (a store that fails: logged, gauges left out)."""
        if not self._store.reads_through or self._ledger is None:
            return
        try:
            totals = await self._ledger.state_totals()
            active = await self._sessions.count_active() if self._sessions is not None else 0
        except StoreError as exc:
            log.warning("metrics: cannot read the store: %s", exc)
            self._store.snapshot = None
            return
        self._store.snapshot = (totals, active)

    def set_refusal_counts(self, counts: Mapping[str, int]) -> None:
        """The refusal recorder's live counts (read at scrape time, never copied)."""
        self._refusals.counts = counts

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data

    # -- stages (see Forwarder.wrap) -----------------------------------------------------------------

    def outcome_stage(self, inner: Exchanger) -> Exchanger:
        """Outermost stage: counts each proxied request once, by what finally happened to it."""
        count = self.stats.outcomes

        async def exchange(request: Exchange) -> Outcome:
            try:
                outcome = await inner(request)
            except UpstreamError:
                count["upstream_error"] += 1
                raise
            except Exception:
                count["error"] += 1
                raise
            count[classify(outcome)] += 1
            return outcome

        return exchange

    def latency_stage(self, inner: Exchanger) -> Exchanger:
        """Innermost stage: times every upstream send (a paid request counts its 402 and its retry)."""
        observe = self.stats.observe

        async def exchange(request: Exchange) -> Outcome:
            started = time.perf_counter()
            outcome = await inner(request)
            observe(time.perf_counter() - started)
            return outcome

        return exchange
