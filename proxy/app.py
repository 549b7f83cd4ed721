"""Wiring: config -> home -> CA -> upstream client -> forwarder -> listener. No decisions live here."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from cachetools import TTLCache

from proxy.admin.api import AdminServer
from proxy.admin.auth import AdminToken, resolve_token
from proxy.admin.metrics import AdminMetrics
from proxy.admin.service import ControlPlane
from proxy.config import Config
from proxy.engine.forwarder import Forwarder
from proxy.engine.server import ProxyServer
from proxy.engine.upstream import Upstream
from proxy.home import ensure_home
from proxy.mcp_pay.stage import McpStage
from proxy.observability.access_log import access_hook, access_stage
from proxy.payments.assets import AssetRegistry
from proxy.payments.networks import NetworkRegistry
from proxy.payments.payer import BalanceLookup, Payer
from proxy.payments.reconcile import Reconciler
from proxy.payments.refusals import RefusalRecorder
from proxy.payments.wallet import Wallet, load_wallet, token_balance
from proxy.purchase.flow import PurchaseFlow
from proxy.purchase.http import HttpPurchase
from proxy.reload import reload_config
from proxy.sessions.keeper import SessionKeeper
from proxy.sessions.manager import SessionManager
from proxy.sessions.stage import SessionStage
from proxy.store.base import AsyncLedgerStore
from proxy.store.factory import Stores, open_stores
from proxy.tls.authority import InterceptionCA
from proxy.tls.trust import upstream_client_context, write_combined_bundle
from proxy.warmup import BACKENDS, PAID_PATH, SDK_PATH, SIWX_PATH, sdk_needed, warm_up

if TYPE_CHECKING:
    from proxy.channels.holder import ChannelHolder
    from proxy.store.refusal_store import AsyncRefusalStore, SqliteRefusalStore

log = logging.getLogger("x402_proxy")

BALANCE_CACHE_SECONDS = 5.0


@dataclass
class Runtime:
    config: Config
    home: Path
    ca: InterceptionCA
    bundle: Path
    upstream: Upstream
    server: ProxyServer
    store: AsyncLedgerStore
    payer: Payer
    sessions: SessionManager | None
    background: list[asyncio.Task[None]]
    control: ControlPlane
    session_stage: SessionStage | None = None
    admin: AdminServer | None = None
    admin_token: AdminToken | None = None
    refusals: AsyncRefusalStore | None = None
    stores: Stores | None = None

    async def stop(self, drain_timeout: float = 10.0) -> None:
        self.control.draining = True
        await self.server.stop(drain_timeout)
        if self.admin is not None:
            await self.admin.stop()
        for task in self.background:
            task.cancel()
        if self.sessions is not None:
            await self.sessions.close()
        await self.upstream.close()
        if self.stores is not None:
            await self.stores.close()
        else:
            await self.store.close()


def rpc_urls(config: Config, networks: NetworkRegistry) -> dict[str, str]:
    """`[rpc]` keyed by CAIP-2 id (the config may name a network by its V1 name)."""
    urls: dict[str, str] = {}
    for name, url in config.rpc.items():
        network = networks.lookup(name)
        if network is not None:
            urls[network.caip2] = url
    return urls


def balance_lookup(config: Config, networks: NetworkRegistry, wallet: Wallet | None) -> BalanceLookup | None:
    """Balances come from the configured RPC of each network; without one the check is skipped."""
    if wallet is None or not config.rpc:
        return None
    urls = rpc_urls(config, networks)
    address = wallet.address
    # A balance read costs an RPC round trip per payment. A few seconds of staleness is money-safe: an
    # over-estimate only lets us sign something the facilitator will refuse for lack of funds.
    recent: TTLCache[tuple[str, str], int] = TTLCache(maxsize=256, ttl=BALANCE_CACHE_SECONDS)

    async def lookup(network: str, asset: str) -> int | None:
        url = urls.get(network)
        if url is None:
            return None
        key = (network, asset.lower())
        if key not in recent:
            recent[key] = await token_balance(url, asset, address)
        return recent[key]

    return lookup


def build_payer(config: Config, store: AsyncLedgerStore, wallet: Wallet | None) -> Payer:
    networks = NetworkRegistry(extra=config.networks)
    assets = AssetRegistry(networks, config.assets)
    return Payer(
        config.policy,
        assets,
        wallet,
        store,
        balance_lookup=balance_lookup(config, networks, wallet),
        chain_checked=frozenset(rpc_urls(config, networks)),
        recheck_after=config.reconcile.interval,
    )


async def start(config: Config, home: Path) -> Runtime:
    ensure_home(home)
    ca = InterceptionCA.open(home)
    bundle = write_combined_bundle(home, ca.ca_pem_path)
    upstream = Upstream(config.upstream, upstream_client_context(config.upstream.extra_ca_bundle))
    wallet = load_wallet(config.wallet, os.environ)
    # The ledger, sessions and refusals: <home>/state.db, or the fleet's PostgreSQL ([store] url). A
    # database that cannot be reached or migrated is a StoreError here: `run` exits 2 naming it.
    stores = await open_stores(
        config,
        home,
        sessions=config.sessions.enabled,
        session_secret=wallet.secret_bytes() if wallet is not None else None,
    )
    try:
        return await _start(config, home, ca, bundle, upstream, wallet, stores)
    except BaseException:
        await stores.close()  # a no-op when runtime.stop() closed them already
        raise


async def _start(
    config: Config,
    home: Path,
    ca: InterceptionCA,
    bundle: Path,
    upstream: Upstream,
    wallet: Wallet | None,
    stores: Stores,
) -> Runtime:
    store = stores.ledger
    payer = build_payer(config, store, wallet)
    await payer.recover()
    forwarder = Forwarder(config.proxy, upstream, [])
    metrics = AdminMetrics(home / "state.db")
    forwarder.wrap(metrics.latency_stage)  # innermost: times upstream sends only
    # Every refused 402, bounded (its own table). The recorder names the SQLite class; it only calls
    # `add`, which every AsyncRefusalStore has.
    refusals = stores.refusals
    # Every refusal the client is answered with is counted and kept (proxy/payments/refusals.py).
    recorder = RefusalRecorder(cast("SqliteRefusalStore", refusals), payer.assets, payer.clock)
    metrics.set_refusal_counts(recorder.counts)
    sessions: SessionManager | None = None
    session_stage: SessionStage | None = None
    background: list[asyncio.Task[None]] = []
    keeper: SessionKeeper | None = None
    if config.sessions.enabled and stores.sessions is not None:
        sessions = SessionManager(stores.sessions, flush_interval=config.sessions.flush_interval)
        stores.sessions_handed_over = True
        restored = await sessions.restore()  # a restarted replica rebuilds its index from the store
        if restored:
            log.info("restored %d active sessions", restored)
        keeper = SessionKeeper(sessions, config.sessions, payer.wallet, payer.store)
    # One purchase flow, whatever carries the challenge: a single flight per need across HTTP and MCP.
    flow = PurchaseFlow(payer, recorder, keeper)
    mcp = McpStage(flow, config.mcp, payer.assets.networks)
    forwarder.wrap(mcp)  # tool calls answered with a payment-required result (x402 over MCP)
    if sessions is not None and keeper is not None:
        session_stage = SessionStage(
            sessions, HttpPurchase(flow), config.sessions, payer.wallet, keeper=keeper
        )
        forwarder.wrap(session_stage)
        channels = _channel_holder(config, home, payer, sessions)
        if channels is not None:  # batch-settlement channels as sessions (proxy/channels/)
            flow.channels = session_stage.channels = channels
            background.append(asyncio.create_task(channels.run()))
        background.append(asyncio.create_task(sessions.run_flusher()))
        if sessions.shared:  # other replicas' opens, renewals and ends (PostgreSQL LISTEN + poll)
            background.append(asyncio.create_task(sessions.run_watcher()))
    else:
        forwarder.wrap(HttpPurchase(flow))
    forwarder.wrap(metrics.outcome_stage)  # one count per proxied request
    forwarder.wrap(access_stage(config.log.access_log))  # outermost: log context and the access line
    server = ProxyServer(config.proxy, config.upstream, forwarder, ca.leaf_context_off_loop)
    # The access line is written when the answer is out (bytes written, whole duration); None when off.
    server.set_completion_hook(access_hook(config.log.access_log))
    # Bound, not yet accepting: a client that finds the proxy port open finds the admin port open too.
    await server.bind()
    # Names may resolve to us (a compose service name): the pool checks where each connection landed.
    upstream.own_listeners = server.self_targets
    # Payments whose money may have moved are resolved from the chain in the background (started once
    # the proxy accepts): until a row is resolved the in-doubt refusal protects its need.
    reconciler = Reconciler(
        payer.store, rpc_urls(config, payer.assets.networks), interval=config.reconcile.interval
    )
    if payer.wallet is None:
        log.warning("no wallet configured: 402 challenges are passed to the client unpaid")
    else:
        log.info("paying from wallet %s", payer.wallet.address)
    control = ControlPlane(payer, sessions, session_stage, forwarder.send_upstream)
    control.reconciler = reconciler
    control.refusals = refusals
    metrics.read_through(store, sessions)  # the ledger gauges read the store, whichever it is
    runtime = Runtime(
        config, home, ca, bundle, upstream, server, store, payer, sessions, background, control, session_stage
    )
    runtime.refusals = refusals
    runtime.stores = stores
    try:
        if config.admin.enabled:
            await start_admin(runtime, metrics)
        await server.start()
    except BaseException:
        await runtime.stop(drain_timeout=1.0)
        raise
    sdk = sdk_needed(
        upto=config.policy.enable_upto,
        channels=config.channels.enabled,
        chain_reads=bool(reconciler.rpc_urls),
    )
    # Restored sessions that sign in with SIWX sign per request: their SDK module is warmed too.
    siwx = any(s.credentials.siwx is not None for s in sessions.active()) if sessions is not None else False
    extra = SIWX_PATH if siwx else ()
    background.append(asyncio.create_task(_after_warm_up(payer.wallet, reconciler, sdk, extra)))
    return runtime


def _channel_holder(
    config: Config, home: Path, payer: Payer, sessions: SessionManager
) -> ChannelHolder | None:
    """`[channels] enabled` with a wallet, on the SQLite store (a channel is held by one process)."""
    if not config.channels.enabled or payer.wallet is None:
        return None
    if config.store.url:
        raise OSError("[channels] enabled needs the SQLite store: channels are not shared by a fleet yet")
    from proxy.channels.book import ChannelBook
    from proxy.channels.holder import ChannelHolder

    urls = rpc_urls(config, payer.assets.networks)
    rpc = next(iter(urls.values()), None)
    holder = ChannelHolder(config.channels, payer, sessions, ChannelBook(home / "channels.db"), rpc)
    holder.recover()
    return holder


async def _after_warm_up(
    wallet: Wallet | None, reconciler: Reconciler, sdk: bool, extra: tuple[str, ...] = ()
) -> None:
    """With a wallet, load the paid path off the loop (proxy/warmup.py), and the SDK tier with the
    wallet's eth-account signer when the configuration reaches it; then reconcile from the chain (its
    web3 is loaded by then, in the warm-up's thread rather than on the loop)."""
    if wallet is not None and sdk:
        await warm_up((*PAID_PATH, *extra, *SDK_PATH), BACKENDS, prepare=lambda: wallet.account)
    elif wallet is not None:
        await warm_up((*PAID_PATH, *extra))
    await reconciler.run_forever()


async def start_admin(runtime: Runtime, metrics: AdminMetrics) -> None:
    """The admin API (REST + MCP) on its own listener, which the proxy refuses to forward to."""
    settings = runtime.config.admin
    token = resolve_token(settings, runtime.home, os.environ, create=True)
    try:
        host, port = settings.listen_address(runtime.config.proxy.listen_address[1])
    except ValueError as exc:
        raise OSError(f"admin listener: {exc}") from None
    metrics.set_ready_probe(lambda: not runtime.control.draining)
    admin = AdminServer(runtime.control, token.value, metrics, runtime.ca.ca_pem_path, host, port)
    # /readyz (no token): the proxy listener accepting and the store reachable.
    admin.set_readiness(runtime.server.self_targets, runtime.store.ping)
    try:
        await admin.start()
    except OSError as exc:
        raise OSError(exc.errno, f"admin listener {host}:{port}: {exc.strerror or exc}") from None
    runtime.admin, runtime.admin_token = admin, token
    runtime.server.add_self_targets(admin.addresses)


async def serve_forever(config: Config, home: Path, load_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0. SIGHUP re-reads the config via `load_config`."""
    runtime = await start(config, home)
    # Handlers before the "listening" line: whoever waits for that line may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if load_config is not None:
        reload = load_config
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: reload_config(
                runtime.config,
                reload,
                runtime.payer,
                runtime.session_stage,
                runtime.session_stage.channels if runtime.session_stage is not None else None,
            ),
        )
    host, port = runtime.server.addresses[0]
    shown = f"[{host}]" if ":" in host else host
    if runtime.admin is not None and runtime.admin_token is not None:
        print(f"admin API on {runtime.admin.url}", flush=True)
        if runtime.admin_token.path is not None:
            print(f"admin token file: {runtime.admin_token.path}", flush=True)
        else:
            print(f"admin token from {runtime.admin_token.source}", flush=True)
    print(f"x402-proxy listening on http://{shown}:{port}", flush=True)
    print(f"CA certificate: {runtime.ca.ca_pem_path}", flush=True)
    print(f"CA bundle (system roots + ours): {runtime.bundle}", flush=True)
    await stop.wait()
    runtime.control.draining = True
    timeout = config.proxy.drain_timeout
    log.info("stopping: draining in-flight requests (up to %.0f s)", timeout)
    await runtime.stop(drain_timeout=timeout)
    log.info("stopped")
    return 0


def run_loop(coro_factory: object) -> int:
    """Run with uvloop when available: it roughly doubles small-request throughput."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency off Windows
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result: int = runner.run(coro_factory())  # type: ignore[operator]
        return result
