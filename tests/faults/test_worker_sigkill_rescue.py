"""A whole worker (main process and pool child) SIGKILLed mid-recalculation: rescued, applied once.

The pool child pauses with its writes done and uncommitted (RECALQ_FAULT=
recalculation.before_commit=wait:<gate>, a gate that never opens); the test then kills the
worker's whole process group, and the relay too, so nothing but the beat's rescue task can
re-send a message. A new worker and a celery beat are started:

- RabbitMQ hands the unacked message back when the dead worker's connection drops, and the new
  worker takes the job over as a redelivery;
- Redis keeps it unacked until the visibility timeout (an hour), so only the beat's rescue of a
  running job whose lease ran out brings it back (G7).

Either way attempt 1 counts as lost, attempt 2 applies the job, and its effects land once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row, property_with_one_job
from tests.harness.system import System, wait_until

pytestmark = pytest.mark.broker

BEAT_FAST = {"RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}
RESCUE_FAST = {"RECALQ_RESCUE_AFTER_SECONDS": "1"}


@pytest.fixture(autouse=True)
def sigkill_leftovers(system: System) -> Iterator[None]:
    """Ends this test's processes by SIGKILL: their graceful shutdown is not under test."""
    yield
    for proc in system.processes:
        system.kill(proc)


def lease_settings(system: System) -> dict[str, str]:
    """On Redis only the rescue brings the job back, after the lease: keep it short (but the
    paused attempt must not reach its soft time limit before the test kills it). On RabbitMQ
    the redelivery must reach the new worker while attempt 1's lease still runs."""
    if system.broker_url.startswith("redis"):
        return {"RECALQ_TASK_SOFT_TIME_LIMIT": "6", "RECALQ_TASK_TIME_LIMIT": "7", "RECALQ_JOB_LEASE_SECONDS": "8"}
    return {"RECALQ_TASK_SOFT_TIME_LIMIT": "8", "RECALQ_TASK_TIME_LIMIT": "10", "RECALQ_JOB_LEASE_SECONDS": "20"}


def test_a_whole_worker_killed_mid_recalculation_has_its_job_rescued_and_applied_exactly_once(
    system: System, database_url: str, tmp_path: Path
) -> None:
    lease = lease_settings(system)
    system.apply_task_policy(lease)
    property_id, job_id = property_with_one_job(database_url)
    gate = tmp_path / "never-opened"
    pause = f"recalculation.before_commit=wait:{gate}"
    faulty = system.start_worker(concurrency=1, env={**lease, "RECALQ_FAULT": pause})
    relay = system.start_relay(env=lease)

    with system.connect() as db:
        def paused_before_commit() -> bool:
            # A transaction still open whose last statement completed the job. Its state is
            # 'idle in transaction', or 'active' when the worker pipelines its statements (no
            # Sync is sent until the COMMIT).
            row = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state IN ('idle in transaction', 'active') AND xact_start IS NOT NULL "
                "AND pid <> pg_backend_pid() AND query LIKE '%%outbox_complete%%'").fetchone()
            return row is not None and row[0] == 1

        wait_until(paused_before_commit, timeout=30, what=f"the attempt to pause before commit:\n{system.logs()}")
        system.kill(relay)
        system.kill(faulty)  # the whole process group: main process and pool child
        assert faulty.popen.returncode == -9

        row = job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("running", 1)
        wait_until(lambda: not paused_before_commit(), timeout=10, what="the dead attempt's transaction to end")
        assert effects_of(db, job_id)["snapshots"] == 0  # rolled back with the dead backend

        system.start_worker(env={**lease, **RESCUE_FAST})
        system.start_beat(tmp_path, {**lease, **BEAT_FAST})
        system.wait_idle(timeout=60)

        row = job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("done", 2)
        assert row["last_error"] == "attempt 1 was lost (worker died or lease expired)"
        if system.broker_url.startswith("redis"):
            assert row["rescue_count"] >= 1, "on Redis only the beat's rescue can have brought the job back"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [2]}
        assert_invariants(db, [property_id])
