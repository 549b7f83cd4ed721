"""`x402-proxy store check|migrate`: the configured ledger's schema version, and applying its migrations.

`check` changes nothing: it prints the applied version and this program's, and exits 0 when the store answers
(migrations still to apply are said, and applied at the proxy's next start or by `migrate`). `migrate` applies
them (safe while replicas run or start: migrations are serialised by an advisory lock). Both exit 2, with a
named error and no traceback, when the store is unreachable, refuses, or has a schema newer than this program.
The store is named by its URL without the password.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from proxy.config import Config
from proxy.store.base import StoreError
from proxy.store.factory import migrate, schema_status

EXIT_OK = 0
EXIT_STORE = 2


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    store = sub.add_parser("store", parents=[common], help="the ledger's database ([store] url)")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    store_sub.add_parser(
        "check", parents=[common], help="connect and print the ledger's schema version (changes nothing)"
    )
    store_sub.add_parser("migrate", parents=[common], help="apply the ledger's schema migrations")


def run(args: argparse.Namespace, config: Config, home: Path) -> int:
    try:
        if args.store_command == "check":
            status = asyncio.run(schema_status(config.store, home))
            if not status.exists:
                print(
                    f"{status.store}: no ledger yet (created at the first start; "
                    f"this program: v{status.program})"
                )
            elif status.pending:
                print(
                    f"{status.store}: ledger schema v{status.current}, this program: v{status.program} "
                    "(applied at the next start, or now by `x402-proxy store migrate`)"
                )
            else:
                print(f"{status.store}: ledger schema v{status.current}, up to date")
            return EXIT_OK
        after, before = asyncio.run(migrate(config.store, home))
        change = "up to date" if before == after.current else f"migrated from v{before}"
        print(f"{after.store}: ledger schema v{after.current}, {change}")
        return EXIT_OK
    except StoreError as exc:
        print(f"x402-proxy: {exc}", file=sys.stderr)
        return EXIT_STORE
