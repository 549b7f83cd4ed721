"""A real x402 stack on loopback for tests: anvil + TestUSDC + the reference facilitator + servers.

    stack = start_stack(workdir)          # or: with start_stack(workdir) as stack: ...
    stack.py / stack.express_v2 / stack.express_v1    # base URLs of the three resource servers
    stack.balance_of(stack.pay_to)                     # on-chain TestUSDC balance
    extra = stack.start_py_server(siwx=True, price=5000)   # another FastAPI server variant
    stack.stop()

Everything listens on 127.0.0.1 only. Process output goes to `<workdir>/*.log`; startup errors
include the failing component's log tail. The pytest fixture lives in `fixtures.py` (`x402_stack`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from ._proc import (
    NODE_MODULES,
    STACK_DIR,
    ManagedProcess,
    StackStartupError,
    free_port,
    http_ready,
    wait_all,
)
from .chain import (
    CHAIN_ID,
    DEV_ACCOUNTS,
    FACILITATOR,
    NETWORK_V1,
    NETWORK_V2,
    PAY_TO,
    PAY_TO_2,
    PAYER,
    PAYER_2,
    TOKEN_DECIMALS,
    TOKEN_NAME,
    TOKEN_VERSION,
    Chain,
    DevAccount,
    spawn_anvil,
)

__all__ = [
    "CHAIN_ID",
    "DEV_ACCOUNTS",
    "NETWORK_V1",
    "NETWORK_V2",
    "PAYER",
    "PAYER_2",
    "PAY_TO",
    "PAY_TO_2",
    "TOKEN_DECIMALS",
    "TOKEN_NAME",
    "TOKEN_VERSION",
    "Chain",
    "DevAccount",
    "PyServer",
    "Stack",
    "StackStartupError",
    "start_stack",
]

DEFAULT_PRICE = 1000  # 0.001 USDC in atomic units
DEFAULT_PAYER_FUNDS = 100 * 10**TOKEN_DECIMALS  # 100 USDC
STARTUP_TIMEOUT = 60.0  # generous: a loaded 2-core CI box; normal startup is a few seconds


@dataclass
class PyServer:
    """A FastAPI reference server started on demand (see `Stack.start_py_server`)."""

    url: str
    proc: ManagedProcess
    args: list[str]

    def stop(self) -> None:
        self.proc.stop()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.url}/__stats", timeout=10, trust_env=False, verify=False
        ).json()
        return data

    def __enter__(self) -> PyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Stack:
    """Handles to a running local x402 stack. Create with `start_stack`; stop with `stop()`."""

    workdir: Path
    chain: Chain
    token: str  # TestUSDC address (checksummed)
    facilitator_url: str
    py: str  # FastAPI + PaymentMiddlewareASGI (V2)
    express_v2: str  # @x402/express (V2)
    express_v1: str  # x402-express 1.x (V1, network base-sepolia)
    price: int  # atomic units charged by the default servers' paid routes
    payer_key: str
    payer_address: str
    pay_to: str
    chain_id: int = CHAIN_ID
    network_v2: str = NETWORK_V2
    network_v1: str = NETWORK_V1
    token_name: str = TOKEN_NAME
    token_version: str = TOKEN_VERSION
    token_decimals: int = TOKEN_DECIMALS
    startup_seconds: float = 0.0
    _procs: list[ManagedProcess] = field(default_factory=list, repr=False)
    _extra: list[PyServer] = field(default_factory=list, repr=False)

    # -- chain -----------------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return self.chain.rpc_url

    @property
    def payer(self) -> LocalAccount:
        """eth-account signer for the funded payer (what x402 clients sign with)."""
        account: LocalAccount = Account.from_key(self.payer_key)
        return account

    def balance_of(self, address: str) -> int:
        """On-chain TestUSDC balance in atomic units."""
        return self.chain.balance_of(address)

    def mint(self, address: str, amount: int) -> str:
        """Mint TestUSDC (atomic units) to any address; returns the tx hash."""
        return self.chain.mint(address, amount)

    # -- servers ---------------------------------------------------------------------------

    def start_py_server(
        self,
        *,
        price: int | None = None,
        price_b: int | None = None,
        pay_to: str | None = None,
        siwx: bool = False,
        payment_identifier: str = "off",
        max_timeout_seconds: int = 60,
        host: str = "127.0.0.1",
        ssl_certfile: str | Path | None = None,
        ssl_keyfile: str | Path | None = None,
        extra_args: list[str] | None = None,
        timeout: float = STARTUP_TIMEOUT,
        script: str = "server_py.py",
    ) -> PyServer:
        """Start another FastAPI reference server (e.g. with SIWX or another price) and wait for it.

        It is stopped with the stack; stop it earlier with `.stop()` or use it as a context manager.
        `payment_identifier` is "off", "optional" or "required". With `ssl_certfile`/`ssl_keyfile` it
        serves HTTPS (the URL is https://host:port); `host` may be another loopback address such as
        127.0.0.2 to match a test certificate. `script="server_mcp.py"` starts the paid MCP server
        instead (same options; its MCP endpoint is `/mcp`).
        """
        port = free_port(host)
        args = _server_argv(
            "py",
            port=port,
            facilitator_url=self.facilitator_url,
            token=self.token,
            pay_to=pay_to or self.pay_to,
            price=self.price if price is None else price,
            script=script,
        )
        if price_b is not None:
            args += ["--price-b", str(price_b)]
        if siwx:
            args.append("--siwx")
        args += ["--payment-identifier", payment_identifier, "--max-timeout", str(max_timeout_seconds)]
        args += ["--host", host]
        if ssl_certfile is not None:
            args += ["--ssl-certfile", str(ssl_certfile), "--ssl-keyfile", str(ssl_keyfile or ssl_certfile)]
        args += list(extra_args or [])
        name = f"{script.split('.')[0]}-{port}"
        proc = ManagedProcess(name, args, self.workdir / f"{name}.log")
        url = f"{'https' if ssl_certfile else 'http'}://{host}:{port}"
        server = PyServer(url=url, proc=proc, args=args)
        self._extra.append(server)
        try:
            wait_all([(proc, http_ready(f"{url}/free"), "serving /free")], timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def server_stats(self, base_url: str) -> dict[str, Any]:
        """`GET /__stats` of one of the resource servers (handler invocation counts, settlements)."""
        data: dict[str, Any] = httpx.get(f"{base_url}/__stats", timeout=10, trust_env=False).json()
        return data

    # -- facilitator -----------------------------------------------------------------------

    def facilitator_stats(self) -> dict[str, Any]:
        """Facilitator call counters and the transactions it settled."""
        data: dict[str, Any] = httpx.get(
            f"{self.facilitator_url}/__stats", timeout=10, trust_env=False
        ).json()
        return data

    def facilitator_faults(
        self, *, settle_delay_s: float | None = None, settle_fail_reason: str | None = None
    ) -> dict[str, Any]:
        """Inject settle faults (a delay before settling, or a forced failure reason).

        The stack is shared by the whole session: call `reset_facilitator_faults()` afterwards.
        """
        body: dict[str, Any] = {}
        if settle_delay_s is not None:
            body["settle_delay_s"] = settle_delay_s
        if settle_fail_reason is not None:
            body["settle_fail_reason"] = settle_fail_reason
        data: dict[str, Any] = httpx.post(
            f"{self.facilitator_url}/__control", json=body, timeout=10, trust_env=False
        ).json()
        return data

    def reset_facilitator_faults(self) -> None:
        httpx.post(
            f"{self.facilitator_url}/__control",
            json={"settle_delay_s": 0, "settle_fail_reason": ""},
            timeout=10,
            trust_env=False,
        ).raise_for_status()

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill every process of the stack (idempotent)."""
        for server in self._extra:
            server.stop()
        # Servers first, then the facilitator, then the chain they depend on.
        for proc in reversed(self._procs):
            proc.stop()
        self.chain.stop()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SERVER_SCRIPTS = {
    "py": "server_py.py",
    "express_v2": "server_express_v2.mjs",
    "express_v1": "server_express_v1.mjs",
}


def _server_argv(
    kind: str,
    *,
    port: int,
    facilitator_url: str,
    token: str,
    pay_to: str,
    price: int,
    script: str | None = None,
) -> list[str]:
    script = script or SERVER_SCRIPTS[kind]
    interpreter = sys.executable if script.endswith(".py") else "node"
    return [
        interpreter,
        str(STACK_DIR / script),
        "--port",
        str(port),
        "--facilitator",
        facilitator_url,
        "--asset",
        token,
        "--pay-to",
        pay_to,
        "--price",
        str(price),
    ]


def start_stack(
    workdir: Path,
    *,
    price: int = DEFAULT_PRICE,
    payer: DevAccount = PAYER,
    pay_to: DevAccount = PAY_TO,
    payer_funds: int = DEFAULT_PAYER_FUNDS,
    timeout: float = STARTUP_TIMEOUT,
    confirmation_timeout: float = 30,
) -> Stack:
    """Bring up anvil -> TestUSDC -> facilitator -> the three reference servers; wait for each.

    anvil and the facilitator start together (the facilitator only dials the chain per request);
    the servers start once the token address is known and the facilitator answers, because they
    fetch `/supported` at startup.
    """
    t0 = time.monotonic()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not NODE_MODULES.is_dir():
        raise StackStartupError(f"{NODE_MODULES} is missing; run `cd tests/stack && npm ci` (or `make npm`)")

    procs: list[ManagedProcess] = []
    chain = spawn_anvil(workdir)
    try:
        fac_port = free_port()
        facilitator_url = f"http://127.0.0.1:{fac_port}"
        fac = ManagedProcess(
            "facilitator",
            [
                sys.executable,
                str(STACK_DIR / "facilitator.py"),
                "--port",
                str(fac_port),
                "--rpc",
                chain.rpc_url,
                "--key",
                FACILITATOR.key,
                "--confirmation-timeout",
                str(confirmation_timeout),
            ],
            workdir / "facilitator.log",
        )
        procs.append(fac)

        chain.wait_ready(timeout)
        chain.install_multicall()
        token = chain.deploy_token()
        chain.mint(payer.address, payer_funds)

        wait_all([(fac, http_ready(f"{facilitator_url}/supported"), "serving /supported")], timeout)

        ports = {kind: free_port() for kind in SERVER_SCRIPTS}
        servers = {
            kind: ManagedProcess(
                f"server_{kind}",
                _server_argv(
                    kind,
                    port=ports[kind],
                    facilitator_url=facilitator_url,
                    token=token,
                    pay_to=pay_to.address,
                    price=price,
                ),
                workdir / f"server_{kind}.log",
            )
            for kind in SERVER_SCRIPTS
        }
        procs.extend(servers.values())
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        wait_all(
            [(servers[name], http_ready(f"{urls[name]}/free"), "serving /free") for name in servers],
            timeout,
        )
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        chain.stop()
        raise

    return Stack(
        workdir=workdir,
        chain=chain,
        token=token,
        facilitator_url=facilitator_url,
        py=urls["py"],
        express_v2=urls["express_v2"],
        express_v1=urls["express_v1"],
        price=price,
        payer_key=payer.key,
        payer_address=payer.address,
        pay_to=pay_to.address,
        startup_seconds=time.monotonic() - t0,
        _procs=procs,
    )
