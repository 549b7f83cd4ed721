"""SIGHUP: re-read the configuration and apply what can change under live connections.

Policy and session settings (rules, TTLs, credential kinds, renewal) and the channel deposit settings
(`[channels]` deposit_prices, deposit_amount, max_deposit, refund_interval) are swapped in place: the
next decision uses them, requests in flight finish under the old ones, and no connection is dropped.
Everything else (listeners, wallet, TLS, storage, `[channels] enabled`) is bound at start; a change
there is reported as needing a restart and left alone. A config that fails to load or validate changes
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from proxy.config import Config, ConfigError
from proxy.payments.payer import Payer
from proxy.payments.policy import Policy
from proxy.sessions.stage import SessionStage

if TYPE_CHECKING:
    from proxy.channels.holder import ChannelHolder

log = logging.getLogger("x402_proxy.reload")

RELOADABLE = frozenset({"policy", "sessions", "channels"})
# Session keys read once at start.
SESSION_KEYS_FIXED_AT_START = ("enabled", "flush_interval")
# Channel keys read once at start: the holder exists (or not) from the start.
CHANNEL_KEYS_FIXED_AT_START = ("enabled",)


@dataclass(frozen=True)
class ReloadResult:
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]
    error: str | None = None


def reload_config(
    running: Config,
    load: Callable[[], Config],
    payer: Payer,
    sessions: SessionStage | None,
    channels: ChannelHolder | None = None,
) -> ReloadResult:
    """Load a fresh config and apply its reloadable sections to `running` (mutated in place)."""
    try:
        fresh = load()
        policy = Policy.compile(fresh.policy, payer.assets.networks)
    except (ConfigError, ValueError) as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return ReloadResult((), (), str(exc))
    applied: list[str] = []
    needs_restart = [
        f.name
        for f in fields(Config)
        if f.name not in RELOADABLE
        and f.name != "sources"
        and getattr(fresh, f.name) != getattr(running, f.name)
    ]
    if fresh.policy != running.policy:
        payer.policy = policy
        running.policy = fresh.policy
        applied.append("policy")
    if fresh.sessions != running.sessions:
        for key in SESSION_KEYS_FIXED_AT_START:
            if getattr(fresh.sessions, key) != getattr(running.sessions, key):
                needs_restart.append(f"sessions.{key}")
                setattr(fresh.sessions, key, getattr(running.sessions, key))
        if sessions is not None and fresh.sessions != running.sessions:
            sessions.apply_settings(fresh.sessions)
            applied.append("sessions")
        running.sessions = fresh.sessions
    if fresh.channels != running.channels:
        for key in CHANNEL_KEYS_FIXED_AT_START:
            if getattr(fresh.channels, key) != getattr(running.channels, key):
                needs_restart.append(f"channels.{key}")
                setattr(fresh.channels, key, getattr(running.channels, key))
        if channels is not None and fresh.channels != running.channels:
            # The holder reads its settings at each use: the next channel opened is sized by the new
            # deposit keys, and the sweep's next wait is the new refund_interval.
            channels.settings = fresh.channels
            if fresh.channels.max_deposit != running.channels.max_deposit and payer.policy is not policy:
                # The holder's sweep re-checks the open channels (the budget cut, max_deposit included)
                # when payer.policy is another object than the one it last checked: a new max_deposit
                # asks for that check as a new policy does (this one compiles the same [policy]).
                payer.policy = policy
            applied.append("channels")
        running.channels = fresh.channels
    running.sources = fresh.sources
    if applied:
        log.info("configuration reloaded: %s", ", ".join(applied))
    else:
        log.info("configuration reloaded: nothing to change")
    if needs_restart:
        log.warning("changed but only applied at the next start: %s", ", ".join(needs_restart))
    return ReloadResult(tuple(applied), tuple(needs_restart))
