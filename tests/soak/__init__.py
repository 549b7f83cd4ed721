"""Soak: mixed load through one real x402-proxy process, watching memory, fds, tasks and money.

    rig = start_rig(stack, upstream, upstream_ca_path, workdir)   # proxy + three reference servers
    result = asyncio.run(run_soak(rig, duration=60))
    print(result.table()); result.write(path); assert result.passed

`make soak` runs it for 10 minutes (`python -m tests.soak`); `tests/test_soak.py` runs the same code
for 60 seconds inside `make test`. Method and figures: docs/soak.md.
"""

from tests.soak.driver import run_soak
from tests.soak.rig import Rig, start_rig
from tests.soak.verdict import SoakResult

__all__ = ["Rig", "SoakResult", "run_soak", "start_rig"]
