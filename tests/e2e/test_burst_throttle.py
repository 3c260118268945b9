"""A burst on one property with the recalculation task's minimum interval set: the real relay
and worker recalculate it a bounded number of times however many mutations arrive, each run
starting at least the interval after the previous one, and the score still ends exact."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from recalq import migrate
from recalq.settings import Settings
from tests.harness.data import provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.observe import assert_fresh_score, connect
from tests.harness.system import System, first_broker_url

MIN_INTERVAL = 1.0
BURST_SECONDS = 4.0


@pytest.fixture
def throttled_system(database_url: str, tmp_path: Path) -> Iterator[System]:
    """One broker: the throttle lives in PostgreSQL and the relay, whatever carries the messages."""
    migrate.apply_task_policy(Settings(database_url=database_url, recalc_min_interval_seconds=MIN_INTERVAL))
    sut = System(database_url, first_broker_url(), tmp_path)
    yield sut
    sut.stop()


def test_a_burst_on_one_property_costs_about_one_recalculation_per_interval_and_ends_fresh(
    throttled_system: System, database_url: str
) -> None:
    with connect(database_url) as conn:
        [property_id] = provision(conn)
    throttled_system.start_worker(concurrency=1)
    throttled_system.start_relay()
    throttled_system.wait_idle(timeout=30)

    with connect(database_url) as conn:
        [first_burst_job] = conn.execute("SELECT max(id) + 1 FROM outbox_job").fetchone()
        mutations = 0
        began = time.monotonic()
        while time.monotonic() - began < BURST_SECONDS:
            upload(conn, property_id)
            mutations += 1
        burst_seconds = time.monotonic() - began
    throttled_system.wait_idle(timeout=30)

    with connect(database_url) as conn:
        runs = conn.execute(
            "SELECT id, started_at, status::text FROM outbox_job WHERE id >= %s AND started_at IS NOT NULL ORDER BY id",
            [first_burst_job],
        ).fetchall()
        applied = conn.execute(
            "SELECT count(*) FROM property_compliance_score_history WHERE property_id = %s AND job_id >= %s",
            [property_id, first_burst_job],
        ).fetchone()[0]
        bound = math.ceil(burst_seconds / MIN_INTERVAL) + 2
        print(f"\n{mutations} mutations in {burst_seconds:.1f}s: {len(runs)} runs, {applied} applied (bound {bound})")
        assert mutations > 4 * bound, "the burst must outnumber the bound for the test to mean anything"
        assert 1 <= applied <= bound
        assert all(status == "done" for _, _, status in runs), runs
        gaps = [later - earlier for (_, earlier, _), (_, later, _) in pairwise(runs)]
        assert all(gap >= timedelta(seconds=MIN_INTERVAL) for gap in gaps), gaps
        assert_fresh_score(conn, property_id)
        assert_invariants(conn)
