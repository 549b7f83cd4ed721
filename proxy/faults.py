"""Named fault points, so crash tests can SIGKILL the real proxy at an exact step of a payment.

`checkpoint(name)` does nothing unless the environment variable ``X402_PROXY_FAULT_PAUSE`` equals
`name` when the process starts. Then it writes ``fault point reached: <name>`` to stderr and blocks
the whole process (event loop included) until it is killed: nothing after the point can run, which is
what a crash at that point looks like. The variable is read once at import, so in normal runs a
checkpoint costs one call to a function that returns at once.

Points (see docs/payments.md, "Crash recovery"):
    payment.pending_written   ledger row pending and durable; nothing signed yet
    payment.answered          the upstream answered the paid request; outcome not yet recorded
    payment.recorded          outcome recorded; the client has not been answered
    session.before_save       payment settled; its new session not yet saved
    session.saved             new session saved; the payment not yet linked to it
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

FAULT_PAUSE_ENV = "X402_PROXY_FAULT_PAUSE"


def _noop(name: str) -> None:
    return None


def _pause_at(target: str) -> Callable[[str], None]:
    def checkpoint(name: str) -> None:
        if name != target:
            return
        sys.stderr.write(f"fault point reached: {name}\n")
        sys.stderr.flush()
        threading.Event().wait()  # never set: only a signal ends the process from here

    return checkpoint


_TARGET = os.environ.get(FAULT_PAUSE_ENV) or None
checkpoint: Callable[[str], None] = _noop if _TARGET is None else _pause_at(_TARGET)
