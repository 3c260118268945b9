"""Fixtures for fault tests whose outcome does not depend on the broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.system import System, first_broker_url, kill_all


@pytest.fixture
def system_on_one_broker(database_url: str, tmp_path: Path) -> Iterator[System]:
    """Real processes on one broker, for faults the broker plays no part in (database races,
    poison rows, late deliveries): running them per broker would double their cost and test
    nothing more. Processes end by SIGKILL: their graceful shutdown is not under test."""
    sut = System(database_url, first_broker_url(), tmp_path)
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()
