"""Run the load and the sampler for a while, then audit: resources, 5xx, and money on chain."""

from __future__ import annotations

import asyncio
import time

from tests.soak.load import Load, LoadShape
from tests.soak.rig import Rig
from tests.soak.sampler import Sampler
from tests.soak.verdict import SoakResult, flatness, money, windows
from tests.support.paying_proxy import ledger

DRAIN_TIMEOUT = 120.0  # in-flight payments finish (settlement included) before the audit


async def run_soak(
    rig: Rig, duration: float, *, sample_interval: float = 2.0, shape: LoadShape | None = None
) -> SoakResult:
    windows(duration)  # refuse a run too short for its windows before spending minutes on it
    started = time.monotonic()
    load = Load(rig, shape or LoadShape(), started)
    sampler = Sampler(rig.proxy.pid(), rig.proxy.admin_url, rig.proxy.token, started, sample_interval)
    sampling_done = asyncio.Event()
    load_task = asyncio.create_task(load.run())
    sampler_task = asyncio.create_task(sampler.run(sampling_done))
    try:
        await asyncio.wait({load_task, sampler_task}, timeout=duration, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        load.stop.set()
        sampling_done.set()
        await asyncio.wait_for(asyncio.gather(load_task, sampler_task), DRAIN_TIMEOUT)

    seen = set(load.tally.payments)
    found = money(
        ledger(rig.proxy),
        seen,
        pay_to_delta=rig.stack.balance_of(rig.pay_to) - rig.pay_to_start,
        payer_decrease=rig.payer_start - rig.stack.balance_of(rig.payer),
    )
    samples = sampler.samples
    return SoakResult(
        duration=duration,
        sample_interval=sample_interval,
        tally=load.tally,
        samples=samples,
        money=found,
        flat=[flatness(samples, "rss_kb", duration), flatness(samples, "fds", duration)],
        tasks=flatness(samples, "tasks", duration),
    )
