"""A worker's pool child SIGKILLed in the middle of a recalculation: run again, applied once.

The child dies with its writes done and uncommitted (RECALQ_FAULT=recalculation.before_commit
=kill), so its transaction rolls back while attempt 1 stays recorded as running. The faulty
worker is then killed whole before it can take its own redelivery (it would die again), and a
healthy worker finishes the job:

- RabbitMQ hands the unacked message back at once when the worker's connection drops;
- Redis keeps it unacked until the visibility timeout (an hour), so the relay's rescue of a
  running job whose lease ran out is what re-sends it (G7).

Either way the second delivery takes the job over as attempt 2 and applies it exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row, property_with_one_job
from tests.harness.system import System, wait_until

pytestmark = pytest.mark.broker

@pytest.fixture(autouse=True)
def sigkill_leftovers(system: System) -> Iterator[None]:
    """Ends this test's processes by SIGKILL: their graceful shutdown is not under test, and
    waiting for it costs seconds per process. Every job is finished by then, so nothing is lost."""
    yield
    for proc in system.processes:
        system.kill(proc)


RESCUE_FAST = {"RECALQ_RESCUE_AFTER_SECONDS": "1", "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}


def lease_settings(system: System) -> dict[str, str]:
    """Job lease for this broker, kept above the task time limits as the settings demand.

    On Redis only the rescue brings the job back, after the lease: keep it short. On RabbitMQ
    the broker's redelivery must reach the healthy worker while attempt 1's lease still runs,
    or the rescue would add a second copy beside the redelivered one; leave room for a worker
    to start on a loaded machine.
    """
    if system.broker_url.startswith("redis"):
        return {"RECALQ_TASK_SOFT_TIME_LIMIT": "3", "RECALQ_TASK_TIME_LIMIT": "4", "RECALQ_JOB_LEASE_SECONDS": "5"}
    return {"RECALQ_TASK_SOFT_TIME_LIMIT": "8", "RECALQ_TASK_TIME_LIMIT": "10", "RECALQ_JOB_LEASE_SECONDS": "20"}


def test_a_worker_child_killed_before_commit_is_run_again_and_applied_exactly_once(
    system: System, database_url: str
) -> None:
    lease = lease_settings(system)
    system.apply_task_policy(lease)
    property_id, job_id = property_with_one_job(database_url)
    faulty = system.start_worker(concurrency=1, env={**lease, "RECALQ_FAULT": "recalculation.before_commit=kill"})
    system.start_relay(env={**lease, **RESCUE_FAST})

    wait_until(lambda: any("exited with 'signal 9 (SIGKILL)'" in line for line in list(faulty.lines)),
               timeout=30, what=f"the pool child to die mid-task:\n{system.logs()}")
    assert faulty.popen.poll() is None, "the whole worker died, not just its pool child"
    with system.connect() as db:
        row = job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("running", 1)
        assert effects_of(db, job_id)["snapshots"] == 0  # the dead child's transaction rolled back

        system.kill(faulty)
        system.start_worker(env=lease)
        system.wait_idle(timeout=60)

        row = job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("done", 2)
        assert row["last_error"] == "attempt 1 was lost (worker died or lease expired)"
        if system.broker_url.startswith("redis"):
            assert row["rescue_count"] >= 1, "on Redis only the rescue can have brought the job back"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [2]}
        assert_invariants(db, [property_id])
