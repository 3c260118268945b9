"""A delivered message no worker could run: its attempt counts, so the job cannot circulate.

Celery discards a message whose task name the receiving worker does not know ("Received
unregistered task"): a task registered in `outbox_task` before any worker runs it, or a worker
left on an older release. Postgres would still see the job published and unfinished, and the
relay's rescue pass would re-send it every grace period for ever. Recording each such delivery
as a failed, retryable attempt (with the reason) bounds that: a later delivery may reach a
worker that does know the task (a rolling deploy loses nothing), and otherwise the job ends
DEAD after its last attempt, visible and requeueable, like any other poison job.
"""

from __future__ import annotations

import uuid

import psycopg

from outbox import lifecycle
from outbox.backoff import RetryPolicy
from outbox.lifecycle import FailOutcome, StartOutcome
from outbox.queries import QUERIES


def record_unrunnable_delivery(
    conn: psycopg.Connection,
    celery_task_id: str,
    *,
    reason: str,
    lease_seconds: float | None,
    retry: RetryPolicy,
) -> FailOutcome | None:
    """Counts the delivery as a failed attempt of its job; None when there is nothing to count
    (not an outbox message, or a job that is finished, running elsewhere or not due)."""
    try:
        task_id = uuid.UUID(celery_task_id)
    except (TypeError, ValueError):
        return None  # not one of ours: outbox task ids are UUIDs
    with conn.transaction():
        row = conn.execute(QUERIES["job_by_celery_task_id"], {"celery_task_id": task_id}).fetchone()
        if row is None:
            return None
        job_id = row[0]
        # Start and fail in one transaction: the attempt is counted exactly when its failure is.
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=lease_seconds)
        if started.outcome is not StartOutcome.STARTED or started.attempt is None:
            return None
        return lifecycle.fail(
            conn, job_id, started.attempt, error=reason, retryable=True,
            retry_in_seconds=retry.delay(started.attempt),
        )
