"""`make soak`: the local stack, a local upstream, one proxy, 10 minutes of mixed load, a verdict.

    .venv/bin/python -m tests.soak [--duration 600] [--sample-interval 2] [--workdir .soak]

Prints the summary table, writes <workdir>/results.json, exits 0 on pass and 1 on fail. Process logs
(anvil, facilitator, servers, proxy) stay in <workdir> for a post-mortem.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import ssl
import sys
from pathlib import Path

from tests.soak import run_soak, start_rig
from tests.stack import start_stack
from tests.support.certs import UpstreamCA
from tests.support.upstream import start_upstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--sample-interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--workdir", type=Path, default=Path(".soak"), help="logs, proxy home, results")
    args = parser.parse_args(argv)
    work: Path = args.workdir.resolve()
    for stale in ("stack", "proxy-home", "certs"):  # a fresh chain and ledger for every run
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "certs").mkdir(parents=True)

    ca = UpstreamCA.create(work / "certs", "soak-upstream-ca")
    cert = ca.issue(work / "certs", ["127.0.0.2", "localhost"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert.cert_path, cert.key_path)
    upstream, stop_upstream = start_upstream(tls, tls)  # the second listener (bad TLS) goes unused
    print(f"starting the local x402 stack in {work / 'stack'} ...", flush=True)
    try:
        with start_stack(work / "stack") as stack:
            rig = start_rig(stack, upstream, ca.cert_path, work)
            try:
                print(
                    f"proxy {rig.proxy.url} (pid {rig.proxy.pid()}); load for {args.duration:g} s", flush=True
                )
                result = asyncio.run(run_soak(rig, args.duration, sample_interval=args.sample_interval))
            finally:
                rig.stop()
    finally:
        stop_upstream()
    result.write(work / "results.json")
    print(result.table())
    print(f"results: {work / 'results.json'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
