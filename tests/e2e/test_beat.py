"""celery beat end to end: a real `celery -A recalq.celery_app beat` sends a maintenance task on its
schedule and a real worker runs it. The entry under test is the rescue (the only one whose
period suits a test): with no relay running, a job whose message was lost can only finish if
the beat's rescue re-sends it. Both brokers. The nightly tasks are then sent by name to a real
worker, as an operator reruns one, to show each reaches its service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from outbox.backoff import RetryPolicy
from recalq.celery_config import DRIFT_SWEEP_TASK, PRUNE_TASK, ROLLOVER_TASK
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row, property_with_one_job
from tests.harness.services import brokers
from tests.harness.system import System, wait_until

pytestmark = pytest.mark.broker

#: The beat ticks every half second; the worker's rescue treats a job as lost after one second.
BEAT_FAST = {"RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}
RESCUE_FAST = {"RECALQ_RESCUE_AFTER_SECONDS": "1"}


def score_waiting_jobs(database_url: str, as_of: date) -> None:
    """Runs the waiting jobs in-process with the clock at `as_of`: scores from days ago."""

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(database_url, autocommit=True) as c:
            yield c

    policy = RecalculationPolicy(lease_seconds=30, retry=RetryPolicy(1, 10, 0.2), infra_retry=RetryPolicy(1, 10, 0.2),
                                 busy_retry_seconds=0.25, lock_timeout_ms=2000)
    recalculator = Recalculator(connection=connection, policy=policy, today=lambda: as_of)
    with psycopg.connect(database_url, autocommit=True) as c:
        jobs = [r[0] for r in c.execute("SELECT id FROM outbox_job WHERE status = 'pending' ORDER BY id")]
    for job_id in jobs:
        assert isinstance(recalculator.run(job_id), Applied)


def test_beat_sends_the_rescue_task_and_a_worker_finishes_a_job_whose_message_was_lost(
    system: System, database_url: str, tmp_path: Path
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    with system.connect() as db:
        # Published an hour ago, but the message never reached the broker (or was purged).
        db.execute("UPDATE outbox_job SET status = 'published', published_at = now() - interval '1 hour', "
                   "publish_count = 1 WHERE id = %s", [job_id])

        system.start_worker(env=RESCUE_FAST)
        beat = system.start_beat(tmp_path, BEAT_FAST)
        system.wait_idle(timeout=60)

        row = job_row(db, job_id)
        assert (row["status"], row["attempts"]) == ("done", 1)
        assert row["rescue_count"] >= 1, "only the beat's rescue can have sent the job"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])
    assert any("Sending due task rescue (maintenance.rescue)" in line for line in list(beat.lines)), system.logs()


def test_a_worker_runs_the_rollover_drift_sweep_and_prune_tasks_sent_by_name(database_url: str, tmp_path: Path) -> None:
    """What beat sends at night, sent by hand (the way an operator reruns one) to a real
    worker: each task reaches its service and the effects show in Postgres. One broker: the
    transport is the rescue test's business; this is about the tasks themselves."""
    broker = next(iter(brokers().values()))
    system = System(database_url, broker, tmp_path, extra_env={"RECALQ_DRIFT_SWEEP_BATCH_SIZE": "1"})
    today = datetime.now(UTC).date()
    long_ago = today - timedelta(days=5)
    app = Celery("operator", broker=broker)
    try:
        with system.connect() as db:
            expiring, steady = provision(db, 2)
            upload(db, expiring, new_document("gas_safety", today - timedelta(days=2), DocumentStatus.VERIFIED))
            upload(db, steady, new_document("gas_safety", today + timedelta(days=400), DocumentStatus.VERIFIED))
            score_waiting_jobs(database_url, as_of=long_ago)
            db.execute("UPDATE outbox_job SET finished_at = now() - interval '30 days' WHERE status = 'done'")
            done_jobs = db.execute("SELECT count(*) FROM outbox_job WHERE status = 'done'").fetchone()
            assert done_jobs == (2,)

            system.start_worker()
            for task in (ROLLOVER_TASK, DRIFT_SWEEP_TASK, PRUNE_TASK):
                app.send_task(task, queue=system.queue)

            def requests(trigger: str) -> set[tuple[int, str]]:
                return set(db.execute(
                    "SELECT compliance_property_id(j.payload), r.correlation_id FROM outbox_request r "
                    "JOIN outbox_job j ON j.id = r.job_id WHERE r.trigger_reason = %s", [trigger]).fetchall())

            wait_until(lambda: requests("expiry_rollover") == {(expiring, f"expiry-rollover:{today}")},
                       timeout=30, what=f"the rollover's request:\n{system.logs()}")
            wait_until(lambda: requests("drift_sweep") == {(expiring, f"drift-sweep:{today}"),
                                                           (steady, f"drift-sweep:{today}")},
                       timeout=30, what=f"the drift sweep's requests, one batch per property:\n{system.logs()}")
            wait_until(lambda: db.execute("SELECT count(*) FROM outbox_job WHERE status = 'done'").fetchone() == (0,),
                       timeout=30, what=f"the prune of the old done jobs:\n{system.logs()}")

            def sweep_batches() -> list[str]:
                return [line for line in system.logs().splitlines()
                        if f"{DRIFT_SWEEP_TASK}[" in line and "succeeded" in line]

            wait_until(lambda: any("'drift_detected': 0" in line for line in sweep_batches()),
                       timeout=30, what=f"the sweep's last batch to report the drift count:\n{system.logs()}")
            assert len(sweep_batches()) == 3, sweep_batches()  # two properties, then the empty batch
    finally:
        system.stop()
        app.close()
