"""A delivery no worker could run (its task is unknown to the worker that got it) counts as a
failed, retryable attempt with its reason, so the job ends DEAD after its last attempt instead
of being re-sent by the rescue for ever."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

import outbox
from outbox.backoff import RetryPolicy
from outbox.lifecycle import FailOutcome
from outbox.unrunnable import record_unrunnable_delivery

TASK = "reports.retired_export"
REASON = "no worker that received it runs task 'reports.retired_export'"
RETRY = RetryPolicy(base_seconds=0.001, max_seconds=0.001, jitter=0.0)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("INSERT INTO outbox_task (name, description) VALUES (%s, 'no worker runs it')", [TASK])
        yield connection


def published_job(db: psycopg.Connection, max_attempts: int = 3) -> tuple[int, str]:
    with db.transaction():
        job_id = outbox.enqueue(
            db, task=TASK, coalescing_key=f"report:{uuid.uuid4().hex}", payload={"report_id": 1},
            correlation_id="c1", trigger_reason="manual", actor_type="system", max_attempts=max_attempts,
        ).job_id
    row = db.execute(
        "UPDATE outbox_job SET status = 'published', published_at = now() WHERE id = %s RETURNING celery_task_id",
        [job_id],
    ).fetchone()
    assert row is not None
    return job_id, str(row[0])


def record(db: psycopg.Connection, celery_task_id: str) -> FailOutcome | None:
    return record_unrunnable_delivery(db, celery_task_id, reason=REASON, lease_seconds=60, retry=RETRY)


def state(db: psycopg.Connection, job_id: int) -> tuple:
    row = db.execute("SELECT status::text, attempts, last_error FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    return tuple(row)


def test_each_unrunnable_delivery_counts_one_attempt_with_its_reason_and_the_last_one_is_dead(
    db: psycopg.Connection,
) -> None:
    job_id, task_id = published_job(db, max_attempts=3)

    assert record(db, task_id) is FailOutcome.RETRYING
    assert state(db, job_id) == ("retrying", 1, REASON)
    db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])  # the rescue's re-send
    assert record(db, task_id) is FailOutcome.RETRYING
    db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])
    assert record(db, task_id) is FailOutcome.DEAD

    assert state(db, job_id) == ("dead", 3, REASON)


def test_a_delivery_of_a_finished_job_records_nothing(db: psycopg.Connection) -> None:
    job_id, task_id = published_job(db, max_attempts=1)
    assert record(db, task_id) is FailOutcome.DEAD

    assert record(db, task_id) is None
    assert state(db, job_id) == ("dead", 1, REASON)


def test_a_delivery_before_the_job_is_due_again_records_nothing(db: psycopg.Connection) -> None:
    job_id, task_id = published_job(db)
    db.execute("UPDATE outbox_job SET next_run_at = now() + interval '1 hour' WHERE id = %s", [job_id])

    assert record(db, task_id) is None
    assert state(db, job_id) == ("published", 0, None)


@pytest.mark.parametrize("task_id", ["not-a-uuid", "", str(uuid.uuid4())], ids=["not-a-uuid", "empty", "unknown-uuid"])
def test_a_message_that_is_not_an_outbox_job_records_nothing(db: psycopg.Connection, task_id: str) -> None:
    job_id, _ = published_job(db)

    assert record(db, task_id) is None
    assert state(db, job_id) == ("published", 0, None)
