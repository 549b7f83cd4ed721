"""Samples of the proxy process every few seconds: RSS and threads (/proc/PID/status), open fds
(/proc/PID/fd) and live asyncio tasks (the admin `/metrics` gauge `x402_proxy_asyncio_tasks`)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import proc_status

TASKS_METRIC = "x402_proxy_asyncio_tasks"


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    rss_kb: int
    fds: int
    tasks: int
    threads: int


def read_proc(pid: int) -> tuple[int, int, int]:
    """(VmRSS in KiB, open fds, threads) of a live process."""
    fields = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return int(fields["VmRSS"].split()[0]), fds, int(fields["Threads"])


def task_count(metrics_text: str) -> int:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == TASKS_METRIC:
            return int(family.samples[0].value)
    raise ValueError(f"{TASKS_METRIC} missing from /metrics")


class Sampler:
    def __init__(self, pid: int, admin_url: str, token: str, started: float, interval: float) -> None:
        self.pid = pid
        self.metrics_url = f"{admin_url}/metrics"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.started = started
        self.interval = interval
        self.samples: list[Sample] = []

    async def take(self, client: aiohttp.ClientSession) -> Sample:
        # One kept-alive admin connection serves every scrape, so each sample counts it alike.
        async with client.get(self.metrics_url, headers=self.headers) as response:
            response.raise_for_status()
            tasks = task_count(await response.text())
        rss_kb, fds, threads = read_proc(self.pid)
        sample = Sample(round(time.monotonic() - self.started, 2), rss_kb, fds, tasks, threads)
        self.samples.append(sample)
        return sample

    async def run(self, stop: asyncio.Event) -> None:
        """Sample on a fixed grid (t = 0, interval, 2*interval, ...) until `stop`, then once more."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as client:
            tick = 0
            while not stop.is_set():
                await self.take(client)
                tick += 1
                delay = self.started + tick * self.interval - time.monotonic()
                try:
                    await asyncio.wait_for(stop.wait(), max(delay, 0))
                except TimeoutError:
                    pass
            await self.take(client)
