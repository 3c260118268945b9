"""Named points in the relay's and the runner's work where a probe is called.

Production passes `no_probe`; tests (and recalq.faults, through RECALQ_FAULT) pass one that
pauses, kills or raises at a point, to try a guarantee at its worst moment.
"""

from __future__ import annotations

from collections.abc import Callable

Probe = Callable[[str], None]


def no_probe(point: str) -> None:
    """The production probe: does nothing."""
