"""After the listener is up: load what the first paid request would otherwise import cold.

The x402 SDK's EVM package brings web3 with it and takes ~0.7 s to import; the proxy starts without it
(`payments/signer.py` imports it where it signs). With a wallet configured, `warm_up` imports it in a
worker thread right after the proxy accepts, so the event loop keeps serving meanwhile and the first
402 finds it loaded. `PAID_PATH` lists what the paid path imports lazily
(`tests/test_startup.py` checks that a payment signed after the warm-up imports nothing new).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("x402_proxy.warmup")

PAID_PATH = (
    "eth_account",
    "eth_account.messages",
    "eth_utils.address",
    "x402.extensions.sign_in_with_x",
    "x402.extensions.payment_identifier",
    "x402.schemas",
    "x402.mechanisms.evm",
    "x402.mechanisms.evm.eip712",
    "x402.mechanisms.evm.exact.permit2_utils",
    "x402.mechanisms.evm.signers",
    "x402.mechanisms.evm.types",
    "x402.mechanisms.evm.upto.client",
    "x402.mechanisms.evm.utils",
)
# Loaded by eth-keys and eth-hash at the first signature and the first hash: secp256k1 and keccak.
# Optional: another installed backend is as good (a name that does not import is skipped).
BACKENDS = ("coincurve", "eth_hash.backends.pycryptodome", "Crypto.Hash.keccak")


def _import_all(modules: Iterable[str], optional: Iterable[str]) -> None:
    for name in modules:
        importlib.import_module(name)
    for name in optional:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("warm-up: %s not installed", name)


async def warm_up(
    modules: Iterable[str] = PAID_PATH,
    optional: Iterable[str] = BACKENDS,
    prepare: Callable[[], object] | None = None,
) -> float:
    """Import `modules` (and what of `optional` is installed) off the event loop, then run `prepare`
    there too (the wallet's signing account); returns the seconds."""
    started = time.perf_counter()
    names = (*modules, *optional)

    def load() -> None:
        _import_all(tuple(modules), tuple(optional))
        if prepare is not None:
            prepare()

    try:
        await asyncio.to_thread(load)
    except Exception:  # the paid path imports them again and reports what is wrong there
        log.exception("warm-up import failed")
        return time.perf_counter() - started
    # What the imports built lives as long as the process: keep it out of every later collection,
    # as the startup objects are (proxy/engine/server.py).
    gc.collect()
    gc.freeze()
    took = time.perf_counter() - started
    log.info("warm-up: paid path loaded (%d modules) in %.2f s", len(names), took)
    return took
