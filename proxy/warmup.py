"""After the listener is up: load what the first paid request would otherwise import cold.

Two tiers, so an idle proxy holds only what its configuration can reach:

* `PAID_PATH`, always with a wallet: the default paid path. x402 `exact` on an EIP-3009 token is
  signed by `payments/evm_sign.py` (coincurve and keccak), session tokens and SIWX texts too, so
  this tier is a few MiB and a few tens of ms.
* `SIWX_PATH`, when a restored session signs in with SIWX; otherwise at the first offer, off the loop.
* `SDK_PATH`, when the configuration reaches it: the x402 SDK's EVM package (web3 comes with it,
  ~0.7 s and ~25 MiB with eth-account), for Permit2 and `upto` payments, batch-settlement channels
  and the chain reconciler. Loaded when `[policy] enable_upto`, `[channels] enabled` or an `[rpc]`
  URL is set (`sdk_needed`); otherwise the first Permit2 payment, SIWX sign-in or keystore signature
  imports what it uses then (`docs/architecture.md`, "What loads when").

The imports run in a worker thread right after the proxy accepts, so the event loop keeps serving
meanwhile. `tests/test_startup.py` checks that a payment signed after each tier's warm-up imports
nothing new.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("x402_proxy.warmup")

PAID_PATH = (
    "coincurve",
    "sha3",
    "proxy.payments.evm_sign",
    "proxy.purchase.schemes",
    "proxy.payments.signer",
)
SDK_PATH = (
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
    "siwe",  # imported inside the SDK's SIWX message builder
)
# Loaded by eth-keys and eth-hash at the first signature and the first hash: secp256k1 and keccak.
# Optional: another installed backend is as good (a name that does not import is skipped).
BACKENDS = ("eth_hash.backends.pycryptodome",)


# Sign-In-With-X: the SDK's message builder and payload model (pydantic, jsonschema: ~11 MiB). Loaded
# when a server first offers it (`load_off_loop` before the offer is used) or when a restored session
# holds SIWX parameters (the warm-up then includes it), so an idle proxy without such servers holds none.
# The SDK imports siwe (and siwe eth-account) inside its message builder: named here so they are loaded too.
SIWX_PATH = (
    "eth_account",
    "eth_account.messages",
    "eth_hash.backends.pycryptodome",  # the backend eth-hash picks at its first hash
    "siwe",
    "x402.extensions.sign_in_with_x",
)

# One importing thread at a time: two threads importing parts of one package graph at once can each find
# the other's module half-initialised ("cannot import name ... partially initialized module"). The loop
# thread itself never imports these: it awaits `load_off_loop` first.
_IMPORT_LOCK = threading.Lock()
_loaded: set[str] = set()  # fully imported through here (sys.modules also holds modules mid-import)


def loaded(modules: Iterable[str]) -> bool:
    return all(name in _loaded for name in modules)


async def load_off_loop(modules: Iterable[str]) -> None:
    """Import what of `modules` is not loaded yet in a worker thread (after any warm-up in progress), so
    the event loop never stalls on a cold import; an import error is left to the code that uses it."""
    names = tuple(modules)
    if loaded(names):
        return
    try:
        await asyncio.to_thread(_import_all, names, ())
    except Exception:
        log.debug("importing %s failed", names, exc_info=True)


def sdk_needed(*, upto: bool, channels: bool, chain_reads: bool) -> bool:
    """Whether the configuration reaches the SDK tier (see the module docstring)."""
    return upto or channels or chain_reads


def _import_all(modules: Iterable[str], optional: Iterable[str]) -> None:
    with _IMPORT_LOCK:
        for name in modules:
            importlib.import_module(name)
            _loaded.add(name)
        _import_optional(optional)


def _import_optional(optional: Iterable[str]) -> None:
    for name in optional:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("warm-up: %s not installed", name)


async def warm_up(
    modules: Iterable[str] = PAID_PATH,
    optional: Iterable[str] = (),
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
