"""Fault points for tests that kill or pause real processes at an exact step.

RECALQ_FAULT="<point>=kill" sends SIGKILL to the process when it reaches <point>;
RECALQ_FAULT="<point>=wait:<path>" blocks there until <path> exists (at most 120 s), then
goes on. Points: relay.after_claim, relay.after_publish, relay.after_mark,
recalculation.after_read_state, recalculation.before_commit. Unset in production: the probe
is then a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def probe_from_spec(spec: str | None) -> Callable[[str], None]:
    if not spec:
        return _nothing
    point, _, action = spec.partition("=")
    if not point or not action:
        raise ValueError(f"RECALQ_FAULT must look like '<point>=kill' or '<point>=wait:<path>', got {spec!r}")
    if action == "kill":
        def kill(reached: str) -> None:
            if reached == point:
                os.kill(os.getpid(), signal.SIGKILL)
        return kill
    if action.startswith("wait:"):
        if not action.removeprefix("wait:"):
            # Path("") is ".", which always exists: the wait would silently never pause.
            raise ValueError(f"fault action 'wait:' needs a path, got {spec!r}")
        gate = Path(action.removeprefix("wait:"))

        def wait(reached: str) -> None:
            if reached == point:
                deadline = time.monotonic() + 120
                while not gate.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        return wait
    raise ValueError(f"unknown fault action {action!r}; use kill or wait:<path>")


def _nothing(point: str) -> None:
    """No fault configured."""
