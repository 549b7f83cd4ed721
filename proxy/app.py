"""Wiring: config -> home -> CA -> upstream client -> forwarder -> listener. No decisions live here."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config
from proxy.engine.forwarder import Forwarder
from proxy.engine.server import ProxyServer
from proxy.engine.upstream import Upstream
from proxy.home import ensure_home
from proxy.tls.ca import CertificateAuthority
from proxy.tls.trust import upstream_client_context, write_combined_bundle

log = logging.getLogger("x402_proxy")


@dataclass
class Runtime:
    config: Config
    home: Path
    ca: CertificateAuthority
    bundle: Path
    upstream: Upstream
    server: ProxyServer

    async def stop(self, drain_timeout: float = 10.0) -> None:
        await self.server.stop(drain_timeout)
        await self.upstream.close()


async def start(config: Config, home: Path) -> Runtime:
    ensure_home(home)
    ca = CertificateAuthority.load_or_create(home)
    bundle = write_combined_bundle(home, ca.ca_pem_path)
    upstream = Upstream(config.upstream, upstream_client_context(config.upstream.extra_ca_bundle))
    forwarder = Forwarder(config.proxy, upstream, [])
    server = ProxyServer(config.proxy, config.upstream, forwarder, ca.leaf_context)
    await server.start()
    return Runtime(config, home, ca, bundle, upstream, server)


async def serve_forever(config: Config, home: Path) -> int:
    runtime = await start(config, home)
    host, port = runtime.server.addresses[0]
    shown = f"[{host}]" if ":" in host else host
    print(f"x402-proxy listening on http://{shown}:{port}", flush=True)
    print(f"CA certificate: {runtime.ca.ca_pem_path}", flush=True)
    print(f"CA bundle (system roots + ours): {runtime.bundle}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight requests")
    await runtime.stop()
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


def configure_logging(level: str, fmt: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s" if fmt == "plain" else "%(message)s",
    )
