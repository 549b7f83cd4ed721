"""What the soak drives: one paying proxy with its admin API, three reference servers, a plain upstream.

The payer and the payee are fresh accounts used by nothing else, so their on-chain balance changes are
this run's payments and nothing more, even on a stack shared with other tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eth_account import Account

from tests.stack import PyServer, Stack
from tests.support.admin import AdminProxy
from tests.support.paying_proxy import stack_config
from tests.support.upstream import Upstream

PAYER_FUNDS = 20 * 10**6  # 20 TestUSDC: hundreds of payments at the stack's 0.001 price
# Generous on purpose: the soak is about stability, so no request should meet a budget refusal.
POLICY = 'daily_budget = "20"\nper_host_daily_budget = "20"'
PAID_SCOPE_TTL = 60  # the shortest TTL allowed: per-payment sessions expire during the run


@dataclass
class Rig:
    stack: Stack
    proxy: AdminProxy
    upstream: Upstream  # pass-through target (HTTP and HTTPS, intercepted)
    paid: PyServer  # honours no reusable credential; its /paid/* URLs get exact scopes: each new URL pays
    siwx: PyServer  # sessions reused by Sign-In-With-X
    token: PyServer  # sessions reused by the proxy's signed session token (`--reuse token`)
    payer: str
    pay_to: str
    payer_start: int
    pay_to_start: int

    @property
    def proxy_ca(self) -> Path:
        return self.proxy.home / "ca.pem"

    def stop(self) -> None:
        self.proxy.stop()
        for server in (self.paid, self.siwx, self.token):
            server.stop()


def _session_rules(paid_url: str) -> str:
    return (
        "[[sessions.rules]]\n"
        f'pattern = "{paid_url}/paid/*"\nscope_kind = "exact"\nttl_seconds = {PAID_SCOPE_TTL}\n'
    )


def start_rig(stack: Stack, upstream: Upstream, upstream_ca: Path, workdir: Path) -> Rig:
    payer = Account.create()
    pay_to: str = Account.create().address
    stack.mint(payer.address, PAYER_FUNDS)
    servers: list[PyServer] = []
    try:
        paid = stack.start_py_server(pay_to=pay_to)
        servers.append(paid)
        siwx = stack.start_py_server(pay_to=pay_to, siwx=True)
        servers.append(siwx)
        token = stack.start_py_server(pay_to=pay_to, extra_args=["--reuse", "token"])
        servers.append(token)
        config = stack_config(stack, policy=POLICY, extra=_session_rules(paid.url), upstream_ca=upstream_ca)
        home = workdir / "proxy-home"
        proxy = AdminProxy(
            home, config, {"X402_PROXY_PRIVATE_KEY": "0x" + payer.key.hex().removeprefix("0x")}
        )
        proxy.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return Rig(
        stack=stack,
        proxy=proxy,
        upstream=upstream,
        paid=paid,
        siwx=siwx,
        token=token,
        payer=payer.address,
        pay_to=pay_to,
        payer_start=stack.balance_of(payer.address),
        pay_to_start=stack.balance_of(pay_to),
    )
