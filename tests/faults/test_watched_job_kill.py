"""kill -9 of the worker in the middle of a watched job's unit: the job is taken over after its
lease, and the new attempt carries on from the checkpoint; no unit's work is done twice (a unit
commits with its checkpoint, so the one in flight rolled back with the worker)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox import watched
from tests.harness.system import FAST_RESCUE, System, first_broker_url, kill_all, wait_until
from tests.harness.toy_kind import TOY_UNIT_TABLE, WATCHED_TASK, register_watched_toy

pytestmark = pytest.mark.broker

TOY_APP = "tests.harness.toy_kind"
UNITS = 10


@pytest.fixture
def system(database_url: str, tmp_path: Any) -> Iterator[System]:
    sut = System(database_url, first_broker_url(), tmp_path)
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()


def units_done(db: psycopg.Connection, job_id: int) -> list[tuple[int, int]]:
    return db.execute("SELECT unit, attempt FROM toy_unit WHERE job_id = %s ORDER BY unit, attempt",
                      [job_id]).fetchall()


def test_a_worker_killed_mid_unit_is_taken_over_after_its_lease_and_no_finished_unit_runs_again(
    system: System,
) -> None:
    queue = f"{system.queue}-watched"
    with system.connect() as db:
        register_watched_toy(db, queue=queue, lease_seconds=2, heartbeats=True, time_limit_seconds=60,
                             soft_time_limit_seconds=50)
        db.execute(TOY_UNIT_TABLE)
        first = system.start_worker(concurrency=1, app=TOY_APP, queue=queue)
        system.start_relay(env=FAST_RESCUE)
        with db.transaction():
            job_id = watched.submit(db, task=WATCHED_TASK, coalescing_key=f"toy:{uuid.uuid4().hex}",
                                    payload={"units": UNITS, "unit_seconds": 0.4}, correlation_id=uuid.uuid4().hex,
                                    trigger_reason="test", actor_type="client", actor_id="1").job_id
        wait_until(lambda: len(units_done(db, job_id)) >= 3, 60, "three units to commit")

        system.kill(first)
        before = units_done(db, job_id)
        system.start_worker(concurrency=1, app=TOY_APP, queue=queue)
        wait_until(lambda: db.execute("SELECT status::text FROM outbox_job WHERE id = %s",
                                      [job_id]).fetchone()[0] == "done", 90, "the job to be taken over and finish")

        done = units_done(db, job_id)
        attempts = db.execute("SELECT attempt, outcome::text FROM outbox_attempt WHERE job_id = %s ORDER BY attempt",
                              [job_id]).fetchall()

    assert [unit for unit, _ in done] == list(range(UNITS)), "every unit once, none twice"
    assert all(attempt == 1 for _, attempt in before)
    assert {attempt for unit, attempt in done if unit >= len(before)} == {2}, "the rest by the new attempt"
    assert attempts == [(1, "lost"), (2, "succeeded")]
