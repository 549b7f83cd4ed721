"""The whole configuration: one dataclass per section, owned by the module that uses it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxy.admin.settings import AdminSettings
from proxy.channels.settings import ChannelSettings
from proxy.config_loader import ConfigError, Layer, build, env_layer, file_layer, merge_layers, to_plain
from proxy.engine.settings import ProxySettings, UpstreamSettings
from proxy.mcp_pay.settings import McpSettings
from proxy.payments.assets import AssetConfig
from proxy.payments.networks import NetworkConfig
from proxy.payments.policy import PolicyConfig
from proxy.payments.reconcile import ReconcileSettings
from proxy.payments.wallet import WalletConfig
from proxy.sessions.settings import SessionSettings
from proxy.store.settings import StoreSettings, redact_url

__all__ = ["Config", "ConfigError", "LogSettings", "load_config", "redacted"]


@dataclass
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["plain", "json"] = "plain"
    access_log: bool = True


@dataclass
class Config:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    log: LogSettings = field(default_factory=LogSettings)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    # Tokens beyond the built-in USDC list, and networks beyond the built-in table (e.g. a local chain).
    assets: list[AssetConfig] = field(default_factory=list)
    networks: list[NetworkConfig] = field(default_factory=list)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    # JSON-RPC endpoint per network (CAIP-2 id or V1 name): balances, and reconciling unknown payments.
    rpc: dict[str, str] = field(default_factory=dict)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    # Where the ledger lives: the SQLite file in the home directory, or a PostgreSQL URL shared by a fleet.
    store: StoreSettings = field(default_factory=StoreSettings)
    # x402 over MCP: tool calls answered with a payment-required result are paid (docs/mcp.md).
    mcp: McpSettings = field(default_factory=McpSettings)
    # x402 batch-settlement channels held as sessions (proxy/channels/; off by default).
    channels: ChannelSettings = field(default_factory=ChannelSettings)
    # Where the config came from, for messages; not a config key.
    sources: dict[str, str] = field(default_factory=dict, repr=False)


TOP_LEVEL = {
    "proxy",
    "upstream",
    "log",
    "policy",
    "wallet",
    "assets",
    "networks",
    "rpc",
    "reconcile",
    "sessions",
    "admin",
    "store",
    "mcp",
    "channels",
}
SECRET_KEYS = ("password", "token", "private_key", "passphrase", "secret")


def load_config(
    path: Path | None, env: Mapping[str, str] | None = None, cli: dict[str, Any] | None = None
) -> Config:
    """defaults < TOML file < env X402_PROXY_SECTION__KEY < CLI flags."""
    env = os.environ if env is None else env
    layers: list[Layer] = []
    if path is not None:
        layers.append(file_layer(path))
    layers.append(env_layer(env, TOP_LEVEL))
    if cli:
        layers.append(Layer(cli, lambda dotted: f"command line ({dotted})"))
    values, sources = merge_layers(layers)
    for key in values:
        if key not in TOP_LEVEL:
            allowed = ", ".join(sorted(TOP_LEVEL))
            raise ConfigError(key, sources.get(key, "?"), f"unknown section; allowed: {allowed}")
    config = build(Config, values, sources)
    config.sources = sources
    return config


def redacted(config: Config) -> dict[str, Any]:
    plain = to_plain(config)
    plain.pop("sources", None)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("<redacted>" if v and any(s in k for s in SECRET_KEYS) else scrub(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    result: dict[str, Any] = scrub(plain)
    # A database URL may carry a password: show it without (user, host, port, database stay readable).
    if result.get("store", {}).get("url"):
        result["store"]["url"] = redact_url(result["store"]["url"])
    return result
