"""`x402-proxy` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.config import Config, ConfigError, load_config, redacted
from proxy.home import resolve_home

NO_PROXY_DEFAULT = "localhost,127.0.0.1,::1"
# A default for --config, so that every command of a container or service (the health check, `docker exec`)
# reads the same file as the running proxy.
CONFIG_ENV = "X402_PROXY_CONFIG"


def _parser() -> argparse.ArgumentParser:
    # --config/--home are accepted before or after the subcommand; SUPPRESS keeps one from erasing the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help=f"TOML config file (env {CONFIG_ENV})"
    )
    common.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        help="state directory (env X402_PROXY_HOME, default ~/.x402-proxy)",
    )
    parser = argparse.ArgumentParser(
        prog="x402-proxy", description="Forward proxy that pays x402 challenges.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    run = add("run", help="start the proxy")
    run.add_argument("--listen", help="HOST:PORT for the proxy listener (default 127.0.0.1:8402)")
    run.add_argument(
        "--admin",
        help="HOST:PORT for the admin API (default: proxy port + 1 on 127.0.0.1, i.e. 127.0.0.1:8403)",
    )

    ca = add("ca", help="the local CA used for HTTPS interception")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    # `common` on the leaf commands too, so `x402-proxy config check --config FILE` works as documented.
    ca_sub.add_parser("path", parents=[common], help="print the CA certificate path")
    ca_sub.add_parser("export", parents=[common], help="print the CA certificate (PEM)")

    env = add("env", help="print shell exports that route a tool through the proxy")
    env.add_argument("--listen", help="proxy address, if not the configured one")
    env.add_argument(
        "--no-proxy", default=NO_PROXY_DEFAULT, help=f"NO_PROXY value (default {NO_PROXY_DEFAULT})"
    )

    config = add("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser(
        "check", parents=[common], help="validate and print the effective config (secrets redacted)"
    )

    from proxy.wallet_cli import add_parser as add_wallet_parser

    add_wallet_parser(sub, common)

    from proxy.admin_cli import add_parsers as add_admin_parsers

    add_admin_parsers(sub, common)

    from proxy.health_cli import add_parser as add_health_parser

    add_health_parser(sub, common)

    from proxy.store_cli import add_parser as add_store_parser

    add_store_parser(sub, common)
    return parser


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides.setdefault("proxy", {})["listen"] = args.listen
    if getattr(args, "admin", None):
        overrides.setdefault("admin", {})["listen"] = args.admin
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_env = os.environ.get(CONFIG_ENV)
    args.config = getattr(args, "config", None) or (Path(config_env) if config_env else None)
    home = resolve_home(getattr(args, "home", None), os.environ)
    try:
        config = load_config(args.config, os.environ, _cli_overrides(args))
    except ConfigError as exc:
        print(f"x402-proxy: {exc}", file=sys.stderr)
        return 2
    handler = {
        "run": _run,
        "ca": _ca,
        "env": _env,
        "config": _config,
        "wallet": _wallet,
        "sessions": _admin,
        "payments": _admin,
        "refusals": _admin,
        "budget": _admin,
        "audit": _admin,
        "approvals": _admin,
        "health": _health,
        "store": _store,
    }[args.command]
    return handler(args, config, home)


def _run(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.admin.auth import TokenError
    from proxy.app import run_loop, serve_forever
    from proxy.observability.logs import configure_logging
    from proxy.store.base import StoreError
    from proxy.tls.authority import CAError

    configure_logging(config.log.level, config.log.format)
    overrides = _cli_overrides(args)

    def reload() -> Config:  # SIGHUP: same file, environment and flags as at start
        return load_config(args.config, os.environ, overrides)

    try:
        return run_loop(lambda: serve_forever(config, home, reload))
    except (CAError, TokenError, StoreError) as exc:
        print(f"x402-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"x402-proxy: cannot start: {exc}", file=sys.stderr)
        return 2


def _ca(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.home import ensure_home
    from proxy.tls.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(ensure_home(home))
    if args.ca_command == "path":
        print(ca.ca_pem_path)
    else:
        sys.stdout.write(ca.ca_pem_path.read_text())
    return 0


def env_exports(proxy_url: str, bundle: Path, ca_pem: Path, no_proxy: str) -> list[tuple[str, str]]:
    return [
        ("HTTP_PROXY", proxy_url),
        ("http_proxy", proxy_url),
        ("HTTPS_PROXY", proxy_url),
        ("https_proxy", proxy_url),
        ("NO_PROXY", no_proxy),
        ("no_proxy", no_proxy),
        # These replace a client's default roots, hence the combined bundle rather than our CA alone.
        ("SSL_CERT_FILE", str(bundle)),
        ("REQUESTS_CA_BUNDLE", str(bundle)),
        ("CURL_CA_BUNDLE", str(bundle)),
        # Node adds this to its built-in roots, so our CA alone is right.
        ("NODE_EXTRA_CA_CERTS", str(ca_pem)),
        ("NODE_USE_ENV_PROXY", "1"),
    ]


def _env(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.home import ensure_home
    from proxy.tls.ca import CertificateAuthority
    from proxy.tls.trust import write_combined_bundle

    ca = CertificateAuthority.load_or_create(ensure_home(home))
    bundle = write_combined_bundle(home, ca.ca_pem_path)
    host, port = config.proxy.listen_address
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    auth = ""
    if config.proxy.auth.enabled:
        from urllib.parse import quote

        auth = f"{quote(config.proxy.auth.username, safe='')}:{quote(config.proxy.auth.password, safe='')}@"
    url = f"http://{auth}{shown}:{port}"
    for name, value in env_exports(url, bundle, ca.ca_pem_path, args.no_proxy):
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _config(args: argparse.Namespace, config: Config, home: Path) -> int:
    print(json.dumps(redacted(config), indent=2, default=str))
    return 0


def _wallet(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.wallet_cli import run

    return run(args, config, home)


def _admin(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.admin_cli import run

    return run(args, config, home)


def _health(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.health_cli import run

    return run(args, config, home)


def _store(args: argparse.Namespace, config: Config, home: Path) -> int:
    from proxy.store_cli import run

    return run(args, config, home)


if __name__ == "__main__":
    sys.exit(main())
