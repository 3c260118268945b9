"""The task policy's coalescing modes against real PostgreSQL: `coalesce` (the recalculation, as
before), `unique_active` (one active job per key, a lock with a cooldown) and `none` (every
submission its own job), and the CHECK constraints that keep a policy coherent."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest

import outbox
from outbox import lifecycle
from outbox.errors import ActiveJobExists, CoolingDown

LOCKED = "test.locked_job"
EACH = "test.each_job"


@pytest.fixture
def db(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    conn.autocommit = True
    conn.execute(
        """INSERT INTO outbox_task (name, description, mode, cancellable, cooldown)
           VALUES (%s, 'one at a time', 'unique_active', true, '0'), (%s, 'every submission', 'none', true, '0')""",
        [LOCKED, EACH],
    )
    yield conn


def submit(conn: psycopg.Connection, task: str, key: str, correlation_id: str | None = None) -> outbox.Enqueued:
    return outbox.enqueue(conn, task=task, coalescing_key=key, payload={"n": 1},
                          correlation_id=correlation_id or uuid.uuid4().hex,
                          trigger_reason="submitted", actor_type="client", actor_id="c-1")


def counts(conn: psycopg.Connection, key: str) -> tuple[int, int]:
    return conn.execute("SELECT (SELECT count(*) FROM outbox_job WHERE coalescing_key = %(k)s),"
                        " (SELECT count(*) FROM outbox_request WHERE coalescing_key = %(k)s)", {"k": key}).fetchone()


def finish(conn: psycopg.Connection, job_id: int) -> None:
    with conn.transaction():
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=30)
        assert lifecycle.complete(conn, job_id, started.attempt)


def test_a_task_of_mode_none_gives_every_submission_its_own_job_and_a_repeat_the_first_answer(
    db: psycopg.Connection,
) -> None:
    first = submit(db, EACH, "owner:7", "key-a")
    second = submit(db, EACH, "owner:7", "key-b")
    repeat = submit(db, EACH, "owner:7", "key-a")

    assert first.job_id != second.job_id and first.created_job and second.created_job
    assert repeat == outbox.Enqueued(first.job_id, first.request_id, created_request=False, created_job=False)
    assert counts(db, "owner:7") == (2, 2)


def test_a_unique_active_key_refuses_a_second_submission_naming_the_active_job_and_writes_nothing(
    db: psycopg.Connection,
) -> None:
    first = submit(db, LOCKED, "rebuild", "click-1")
    with db.transaction():
        with pytest.raises(ActiveJobExists) as refused:
            submit(db, LOCKED, "rebuild", "click-2")
        # The refusal is an answer, not an error of the transaction: it can go on and commit.
        db.execute("SELECT 1")

    assert refused.value.active_job_id == first.job_id
    assert counts(db, "rebuild") == (1, 1)
    assert submit(db, LOCKED, "rebuild", "click-1").job_id == first.job_id, "a replay still answers the first job"


def test_a_unique_active_key_is_free_again_once_its_job_finishes_and_waits_out_a_cooldown_counted_from_the_finish(
    db: psycopg.Connection,
) -> None:
    first = submit(db, LOCKED, "rebuild")
    finish(db, first.job_id)
    second = submit(db, LOCKED, "rebuild")
    assert second.created_job and second.job_id != first.job_id

    db.execute("UPDATE outbox_task SET cooldown = '1 hour' WHERE name = %s", [LOCKED])
    finish(db, second.job_id)
    with pytest.raises(CoolingDown) as cooling:
        submit(db, LOCKED, "rebuild")
    assert 3590 < cooling.value.retry_after_seconds <= 3600
    assert counts(db, "rebuild") == (2, 2)

    db.execute("UPDATE outbox_job SET finished_at = finished_at - interval '61 minutes' "
               "WHERE coalescing_key = 'rebuild'")
    assert submit(db, LOCKED, "rebuild").created_job


def test_two_racing_submissions_for_a_unique_active_key_make_one_job_and_refuse_the_other(
    db: psycopg.Connection, database_url: str
) -> None:
    """The first holds its uncommitted job; the second waits on the lock index, then sees it."""
    with psycopg.connect(database_url) as first_conn, psycopg.connect(database_url) as second_conn:
        first = submit(first_conn, LOCKED, "global")  # open transaction: not committed yet
        outcome: dict[str, object] = {}

        def second() -> None:
            try:
                outcome["job"] = submit(second_conn, LOCKED, "global")
            except ActiveJobExists as exc:
                outcome["refused"] = exc.active_job_id
            second_conn.commit()

        racer = threading.Thread(target=second)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), "the second submission waits for the first transaction"
        first_conn.commit()
        racer.join(10)

    assert outcome == {"refused": first.job_id}
    assert counts(db, "global") == (1, 1)


def test_the_sql_contract_refuses_a_busy_unique_active_key_with_an_error_that_names_the_active_job(
    db: psycopg.Connection,
) -> None:
    active = submit(db, LOCKED, "rebuild")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
        db.execute("SELECT outbox_enqueue(%s, 'rebuild', '{}'::jsonb, 'sql-1', 'submitted', 'system', NULL)",
                   [LOCKED])
    assert f"already has active job {active.job_id}" in str(refused.value)


def test_a_failed_attempt_of_a_non_coalescing_job_retries_itself_whatever_else_its_key_has_waiting(
    db: psycopg.Connection,
) -> None:
    failing = submit(db, EACH, "owner:9").job_id
    submit(db, EACH, "owner:9")
    with db.transaction():
        started = lifecycle.start(db, failing, redelivered=False, lease_seconds=30)
        outcome = lifecycle.fail(db, failing, started.attempt, error="provider 500", retryable=True,
                                 retry_in_seconds=1)
    assert outcome is lifecycle.FailOutcome.RETRYING, "only a coalescing job is covered by its key's next job"


def test_a_dead_unique_active_job_is_not_requeued_while_another_job_holds_its_key(db: psycopg.Connection) -> None:
    dead = submit(db, LOCKED, "rebuild").job_id
    with db.transaction():
        started = lifecycle.start(db, dead, redelivered=False, lease_seconds=30)
        lifecycle.fail(db, dead, started.attempt, error="bad", retryable=False, retry_in_seconds=1)
    holder = submit(db, LOCKED, "rebuild").job_id

    with db.transaction():
        assert lifecycle.requeue(db, dead) is None
    assert db.execute("SELECT status::text FROM outbox_job WHERE id = %s", [dead]).fetchone() == ("dead",)

    finish(db, holder)
    with db.transaction():
        assert lifecycle.requeue(db, dead) == dead


@pytest.mark.parametrize(("change", "constraint"), [
    ("mode = 'coalesce', cancellable = true", "ck_outbox_task_coalesced_not_cancellable"),
    ("lease_seconds = 60, time_limit_seconds = 90, soft_time_limit_seconds = 60, heartbeats = false",
     "ck_outbox_task_lease"),
    ("time_limit_seconds = 1800, lease_seconds = 2000", "ck_outbox_task_time_limits"),
    ("soft_time_limit_seconds = 95, time_limit_seconds = 90", "ck_outbox_task_time_limits"),
    ("mode = 'none', cooldown = '5 minutes'", "ck_outbox_task_cooldown"),
    ("queue = 'no spaces allowed'", "ck_outbox_task_queue_name"),
])
def test_an_incoherent_task_policy_is_refused_by_the_constraint_that_names_the_rule(
    db: psycopg.Connection, change: str, constraint: str
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        db.execute(f"UPDATE outbox_task SET {change} WHERE name = %s", [EACH])
    assert refused.value.diag.constraint_name == constraint


def test_a_heartbeating_task_may_hold_a_lease_shorter_than_its_time_limit(db: psycopg.Connection) -> None:
    db.execute("UPDATE outbox_task SET heartbeats = true, lease_seconds = 10, time_limit_seconds = 600, "
               "soft_time_limit_seconds = 570 WHERE name = %s", [EACH])
    job_id = submit(db, EACH, "owner:1").job_id
    with db.transaction():
        started = lifecycle.start(db, job_id, redelivered=False, lease_seconds=None)
    lease = db.execute("SELECT lease_expires_at - started_at FROM outbox_job WHERE id = %s", [job_id]).fetchone()[0]
    assert (started.lease_s, lease) == (10.0, timedelta(seconds=10)), "the task's own lease, not a global one"

    db.execute("UPDATE outbox_job SET lease_expires_at = now() + interval '1 second' WHERE id = %s", [job_id])
    with db.transaction():
        assert lifecycle.heartbeat(db, job_id, started.attempt) is True
    extended = db.execute("SELECT lease_expires_at - heartbeat_at FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    assert extended == (timedelta(seconds=10),)
    with db.transaction():
        assert lifecycle.heartbeat(db, job_id, started.attempt + 1) is False, "a stale attempt's heartbeat is refused"
