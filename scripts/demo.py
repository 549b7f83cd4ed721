#!/usr/bin/env python3
"""`make demo`: pay a real x402 server through the proxy, on a throwaway local chain, in ~15 seconds.

1. start the local stack (anvil + TestUSDC + the reference facilitator + reference servers);
2. create a wallet with `x402-proxy wallet new` and fund it with 1 TUSDC;
3. write a config (policy, wallet, the local token, the chain's RPC) and start `x402-proxy run`;
4. curl a paid endpoint directly (402) and through the proxy (200, paid);
5. print the payment headers, the ledger row and payTo's on-chain balance before and after;
6. tear everything down, also on Ctrl-C or an error.

Needs what `make test` sets up: the venv and `tests/stack` npm packages; and curl.
Run from the repository: `.venv/bin/python scripts/demo.py [--keep] [--serve]`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.payments.amounts import format_units  # noqa: E402
from tests.stack import Stack, StackStartupError, start_stack  # noqa: E402

FUNDING = 1_000_000  # 1 TUSDC (6 decimals)
SYMBOL = "TUSDC"
KEY_HEADERS = ("x-402-proxy-payment", "x-402-proxy-error", "payment-response", "content-type")


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n==> {text}")


def child_env() -> dict[str, str]:
    # No inherited proxy settings (curl and the proxy must not loop through something else) and
    # no inherited wallet: the demo uses only the key it creates.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("X402_PROXY_PRIVATE_KEY", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(home: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "proxy", "--home", str(home), "--config", str(config), *args]
    return subprocess.run(  # noqa: S603 (our own CLI, fixed arguments)
        cmd, env=child_env(), capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def write_config(path: Path, stack: Stack, key_file: Path) -> None:
    path.write_text(
        "[policy]\n"
        'max_per_payment = "0.01"\n'
        'daily_budget = "0.05"\n'
        "\n[wallet]\n"
        f'key_file = "{key_file}"\n'
        "\n[[assets]]\n"
        f'network = "{stack.network_v2}"\n'
        f'address = "{stack.token}"\n'
        f"decimals = {stack.token_decimals}\n"
        f'symbol = "{SYMBOL}"\n'
        f'eip712_name = "{stack.token_name}"\n'
        f'eip712_version = "{stack.token_version}"\n'
        "\n[rpc]\n"
        f'"{stack.network_v2}" = "{stack.rpc_url}"\n'
    )


class Proxy:
    """`x402-proxy run` as a child process; stderr (the log) goes to a file."""

    def __init__(self, home: Path, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "proxy", "--home", str(home), "--config", str(config),
            "run", "--listen", "127.0.0.1:0",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 (our own CLI, fixed arguments)
                cmd, env=child_env(), stdout=subprocess.PIPE, stderr=log, cwd=REPO, start_new_session=True
            )
        self.url = self._wait_listening(timeout=30)

    def _wait_listening(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buffered = b""
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.2):
                if self.proc.poll() is not None:
                    break
                continue
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
            for line in buffered.decode(errors="replace").splitlines():
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
        raise RuntimeError(f"the proxy did not start; its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def curl(url: str, proxy_url: str | None = None) -> tuple[str, dict[str, str], str]:
    cmd = ["curl", "-sS", "-i", "--max-time", "60"]
    cmd += ["-x", proxy_url, "--noproxy", ""] if proxy_url else ["--noproxy", "*"]
    result = subprocess.run(  # noqa: S603 (curl with loopback URLs we built)
        [*cmd, url], env=child_env(), capture_output=True, text=True, timeout=90, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"curl failed ({result.returncode}): {result.stderr.strip()}")
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    status, *lines = head.split("\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def show_response(status: str, headers: dict[str, str], body: str) -> None:
    say(f"    {status}")
    for name in KEY_HEADERS:
        if name in headers:
            say(f"    {name}: {headers[name]}")
    if "payment-response" in headers:
        receipt = json.loads(base64.b64decode(headers["payment-response"]))
        say(f"    (payment-response decoded: {json.dumps(receipt)})")
    if body.strip():
        say(f"    body: {body.strip()[:200]}{'...' if len(body.strip()) > 200 else ''}")


def ledger_row(db: Path, row_id: int) -> dict[str, Any]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM payments WHERE id = ?", (row_id,)).fetchone()
    if row is None:
        raise RuntimeError(f"ledger row #{row_id} not found")
    return dict(row)


def tusdc(stack: Stack, amount: int) -> str:
    return f"{format_units(amount, stack.token_decimals)} {SYMBOL}"


def serve(stack: Stack, proxy: Proxy, home: Path, config: Path) -> int:
    """Keep everything running for the README's quickstart: the reader's own shell pays through the proxy."""
    # 127.0.0.2: `x402-proxy env` puts 127.0.0.1 in NO_PROXY, so a server there would be reached directly.
    server = stack.start_py_server(host="127.0.0.2")
    listen = proxy.url.removeprefix("http://")
    step("still running: chain, facilitator, a paid server and the proxy (Ctrl-C stops them)")
    say("    In another shell:")
    say(f'    eval "$(.venv/bin/x402-proxy --home {home} --config {config} env --listen {listen})"')
    say(f"    curl -i {server.url}/paid/b")
    try:
        while proxy.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    say(f"the proxy exited unexpectedly; its log:\n{proxy.log_tail()}")
    return 1


def demo(workdir: Path, keep_serving: bool = False) -> int:
    if shutil.which("curl") is None:
        say("curl is not installed (apt-get install curl, or `make apt-test`)")
        return 2
    step("starting the local x402 stack (anvil, TestUSDC, facilitator, reference servers)")
    stack = start_stack(workdir / "stack")
    proxy: Proxy | None = None
    try:
        say(f"    chain {stack.rpc_url} (chain id {stack.chain_id}), token {stack.token}")
        say(f"    paid endpoint {stack.py}/paid/a, price {tusdc(stack, stack.price)}, payTo {stack.pay_to}")

        home = workdir / "home"
        config = workdir / "config.toml"
        key_file = workdir / "wallet.key"
        write_config(config, stack, key_file)

        step("creating a wallet: x402-proxy wallet new")
        created = cli(home, config, "wallet", "new", "--key-file", str(key_file))
        if created.returncode != 0:
            raise RuntimeError(f"wallet new failed: {created.stderr.strip()}")
        address = created.stdout.strip()
        say(f"    {address}  (key in {key_file}, mode 0600)")
        stack.mint(address, FUNDING)
        say(f"    funded with {tusdc(stack, FUNDING)} on the local chain")
        balance = cli(home, config, "wallet", "balance")
        if balance.returncode != 0:
            raise RuntimeError(f"wallet balance failed: {balance.stderr.strip()}")
        say("    x402-proxy wallet balance:")
        for line in balance.stdout.splitlines():
            say(f"      {line}")

        step("starting the proxy: x402-proxy run")
        proxy = Proxy(home, config, workdir / "proxy.log")
        say(f"    listening on {proxy.url}; config {config}")

        step(f"curl {stack.py}/paid/a   (directly, no proxy)")
        show_response(*curl(f"{stack.py}/paid/a"))

        before = stack.balance_of(stack.pay_to)
        payer_before = stack.balance_of(address)
        step(f"curl -x {proxy.url} {stack.py}/paid/a   (through the proxy)")
        status, headers, body = curl(f"{stack.py}/paid/a", proxy.url)
        show_response(status, headers, body)
        after = stack.balance_of(stack.pay_to)
        payer_after = stack.balance_of(address)
        if " 200" not in status or "x-402-proxy-payment" not in headers:
            raise RuntimeError(f"the paid request did not succeed: {status}\n{proxy.log_tail()}")

        step(f"ledger row #{headers['x-402-proxy-payment']} ({home / 'state.db'})")
        row = ledger_row(home / "state.db", int(headers["x-402-proxy-payment"]))
        for name in ("state", "amount", "asset", "network", "pay_to", "payer", "url", "tx_hash", "nonce"):
            value = row[name]
            if name == "amount":
                value = f"{value} ({tusdc(stack, int(value))})"
            say(f"    {name:9} {value}")

        step("on-chain balances")
        say(f"    payTo {stack.pay_to}: {tusdc(stack, before)} -> {tusdc(stack, after)}")
        say(f"    payer {address}: {tusdc(stack, payer_before)} -> {tusdc(stack, payer_after)}")
        if after - before != stack.price or row["state"] != "settled":
            raise RuntimeError("unexpected outcome: the payment did not settle for exactly the price")
        say("\nDone: one request, one payment, one ledger row, settled on chain.")
        return serve(stack, proxy, home, config) if keep_serving else 0
    finally:
        step("tearing down")
        if proxy is not None:
            proxy.stop()
        stack.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledger, config)")
    parser.add_argument(
        "--serve", action="store_true", help="then keep the stack and the proxy running for your own requests"
    )
    args = parser.parse_args()
    # Ctrl-C stops the demo even when it was started with SIGINT ignored (a background job of a
    # non-interactive shell inherits SIG_IGN, and Python then installs no handler of its own).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="x402-demo-"))
    code = 1
    try:
        code = demo(workdir, keep_serving=args.serve)
    except KeyboardInterrupt:
        say("\ninterrupted")
        code = 130
    except (StackStartupError, RuntimeError, subprocess.SubprocessError, OSError) as exc:
        say(f"\ndemo failed: {exc}")
        code = 1
    finally:
        if args.keep or code != 0:
            say(f"work directory kept: {workdir} (logs: stack/*.log, proxy.log)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
