"""pytest fixture for the local x402 stack.

Register it once for the whole test session, e.g. in `tests/conftest.py`:

    pytest_plugins = ["stack.fixtures"]   # or import x402_stack from this module

The stack is started at most once per pytest session even if this module is registered or imported
from several places (the instance is cached on the pytest config, not in this module, so importing
it under two module names does not start two stacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from . import Stack, start_stack

if TYPE_CHECKING:
    from .channels import ChannelStack

_CONFIG_ATTR = "_x402_local_stack"


@pytest.fixture(scope="session")
def x402_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """Session-wide local x402 stack: anvil + TestUSDC + facilitator + py/express_v2/express_v1 servers."""
    config = request.config
    stack: Stack | None = getattr(config, _CONFIG_ATTR, None)
    if stack is None:
        stack = start_stack(tmp_path_factory.mktemp("x402-stack"))
        setattr(config, _CONFIG_ATTR, stack)
        config.add_cleanup(stack.stop)
    return stack


_CHANNELS_ATTR = "_x402_local_channel_stack"


@pytest.fixture(scope="session")
def x402_channel_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ChannelStack:
    """Session-wide batch-settlement stack on its own anvil: our channel contracts at the SDK's
    addresses, the SDK's channel facilitator and a channel resource server (tests/stack/channels.py)."""
    config = request.config
    stack: ChannelStack | None = getattr(config, _CHANNELS_ATTR, None)
    if stack is None:
        from .channels import start_channel_stack  # only sessions that use channels load it

        stack = start_channel_stack(tmp_path_factory.mktemp("x402-channels"))
        setattr(config, _CHANNELS_ATTR, stack)
        config.add_cleanup(stack.stop)
    return stack

