from __future__ import annotations

import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import PyServer, Stack
from tests.stack.fixtures import x402_stack
from tests.support.certs import UpstreamCA
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401
from tests.support.proxy_process import ProxyProcess
from tests.support.upstream import Upstream, start_upstream


@pytest.fixture(scope="session")
def upstream_ca(tmp_path_factory: pytest.TempPathFactory) -> UpstreamCA:
    return UpstreamCA.create(tmp_path_factory.mktemp("upstream-ca"), "test-upstream-ca")


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA) -> Iterator[Upstream]:
    directory = tmp_path_factory.mktemp("upstream-certs")
    good = upstream_ca.issue(directory, ["127.0.0.2", "localhost"])
    untrusted = UpstreamCA.create(directory, "untrusted-ca").issue(directory, ["127.0.0.2"])
    good_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good_ctx.load_cert_chain(good.cert_path, good.key_path)
    bad_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    bad_ctx.load_cert_chain(untrusted.cert_path, untrusted.key_path)
    state, stop = start_upstream(good_ctx, bad_ctx)
    yield state
    stop()


def proxy_config(upstream_ca: UpstreamCA, extra: str = "") -> str:
    return (
        '[proxy]\nconnect_ports = ["*"]\n'
        f'[upstream]\nextra_ca_bundle = "{upstream_ca.cert_path}"\nconnect_timeout = 3.0\nidle_timeout = 3.0\n'
        f"{extra}"
    )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream_ca: UpstreamCA) -> Iterator[ProxyProcess]:
    home = tmp_path_factory.mktemp("proxy") / "home"
    process = ProxyProcess(home, proxy_config(upstream_ca)).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy_env(proxy: ProxyProcess) -> dict[str, str]:
    """Exactly what `x402-proxy env` prints: clients are configured by nothing else."""
    return proxy.env_exports()


@pytest.fixture(scope="module")
def siwx_server(x402_stack: Stack) -> Iterator[PyServer]:
    """A reference server with the Sign-In-With-X extension: sessions there are reused without paying."""
    server = x402_stack.start_py_server(siwx=True)
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fresh proxy home (created by the proxy itself, as on a new machine)."""
    return tmp_path / "home"


@pytest.fixture
def running() -> Iterator[list[ProxyProcess]]:
    """Proxy processes a test starts and appends here; all are killed at teardown. SIGKILL: one paused at a
    fault point (X402_PROXY_FAULT_PAUSE) ignores SIGTERM, and a test that cares about a clean stop checks it
    itself."""
    procs: list[ProxyProcess] = []
    yield procs
    for proc in procs:
        proc.stop(signal.SIGKILL)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "stack" in item.fixturenames or "x402_stack" in item.fixturenames:
            item.add_marker(pytest.mark.stack)


__all__ = ["Path", "proxy_config", "x402_stack"]
