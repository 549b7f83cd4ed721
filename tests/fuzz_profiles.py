"""Hypothesis settings for the fuzz tests (tests/test_fuzz_*.py): a short mode and a long mode.

``make test`` runs the short mode (every fuzz test together well under a minute). ``make fuzz`` sets
``HYPOTHESIS_PROFILE=fuzz-long``: at least 100,000 examples for each pure property, fewer for the
properties that drive a real proxy over sockets (each example there costs a few round trips).

The profiles are applied per test (``@PURE``, ``@sized(...)``) instead of with ``load_profile``, so
importing this module never changes the settings of the other hypothesis tests in the same run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SHORT = "fuzz-short"
LONG = "fuzz-long"

settings.register_profile(
    SHORT,
    max_examples=300,
    deadline=None,  # the box is shared: wall-clock deadlines would make the suite flaky
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    LONG,
    max_examples=100_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)

PROFILE = LONG if os.environ.get("HYPOTHESIS_PROFILE") == LONG else SHORT
IS_LONG = PROFILE == LONG

PURE = settings.get_profile(PROFILE)
"""For pure properties: 300 examples in the short mode, 100,000 in the long one."""


def sized(short: int, long: int) -> settings:
    """The active profile with an explicit example count per mode (for I/O-bound or slow properties)."""
    return settings(PURE, max_examples=long if IS_LONG else short)
