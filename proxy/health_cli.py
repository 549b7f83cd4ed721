"""`x402-proxy health [--ready]`: exit 0 when the admin API answers `/healthz` (or `/readyz`), else 1.

Made for container health checks (the Dockerfile's HEALTHCHECK): the slim image has no curl. The
probes answer without a token, but one that is sent must be right, so this sends the token it finds the
way the other admin commands do (env X402_PROXY_ADMIN_TOKEN, `[admin] token`, `<home>/admin-token`).
Every failure exits 1, because Docker reserves exit code 2 for health checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from proxy.admin.auth import TokenError, resolve_token
from proxy.admin_cli import AdminClient, ApiError, admin_address
from proxy.config import Config

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
DEFAULT_TIMEOUT = 5.0


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    health = sub.add_parser(
        "health", parents=[common], help="exit 0 if the running proxy's admin API is healthy (for probes)"
    )
    health.add_argument(
        "--admin", default=argparse.SUPPRESS, help="HOST:PORT of the admin API (default: [admin] listen)"
    )
    health.add_argument(
        "--ready", action="store_true", help="check /readyz (503 while draining) instead of /healthz"
    )
    health.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds (default 5)")


def run(args: argparse.Namespace, config: Config, home: Path) -> int:
    path = "/readyz" if args.ready else "/healthz"
    if not config.admin.enabled:
        print("x402-proxy health: the admin API is off ([admin] enabled = false)", file=sys.stderr)
        return EXIT_UNHEALTHY
    try:
        host, port = admin_address(args, config)
        token = resolve_token(config.admin, home, os.environ, create=False)
    except (ValueError, TokenError) as exc:
        print(f"x402-proxy health: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        AdminClient(host, port, token.value, timeout=args.timeout).call("GET", path)
    except ApiError as exc:
        status = f" ({exc.status})" if exc.status else ""
        print(f"x402-proxy health: {shown}{path}{status}: {exc.detail}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"ok: {shown}{path}")
    return EXIT_HEALTHY
