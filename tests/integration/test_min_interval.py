"""A task's minimum interval between the runs of one coalescing key (outbox_task.min_interval,
outbox_v3.sql), against real PostgreSQL: a job created for a key that started recently is due
that long after the start; everything else about enqueueing is as it was."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta

import psycopg
import pytest
from psycopg import errors

import outbox
from outbox import lifecycle
from outbox.relay import OutboxMessage, Relay
from recalq import migrate
from recalq.settings import Settings
from tests.harness.system import wait_until

TASK = "compliance.recalculate_property"
OTHER_TASK = "reports.nightly_export"


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """Autocommit: every statement (and so every enqueue) is its own committed transaction."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def set_min_interval(db: psycopg.Connection, seconds: float, task: str = TASK) -> None:
    db.execute("UPDATE outbox_task SET min_interval = make_interval(secs => %s) WHERE name = %s", [seconds, task])


def enqueue(db: psycopg.Connection, key: str = "property:1") -> outbox.Enqueued:
    return outbox.enqueue(
        db, task=TASK, coalescing_key=key, payload={"property_id": 1}, correlation_id=f"cid-{uuid.uuid4()}",
        trigger_reason="client_upload", actor_type="client", actor_id="client-1",
    )


def started_job(db: psycopg.Connection, key: str = "property:1", ago_seconds: float = 0.0) -> int:
    """A job of `key` that is running and started `ago_seconds` before now."""
    job_id = enqueue(db, key).job_id
    assert lifecycle.start(db, job_id, redelivered=False, lease_seconds=600).outcome is lifecycle.StartOutcome.STARTED
    db.execute("UPDATE outbox_job SET started_at = now() - make_interval(secs => %s) WHERE id = %s",
               [ago_seconds, job_id])
    return job_id


def job_times(db: psycopg.Connection, job_id: int) -> tuple[datetime, datetime]:
    """(next_run_at, the created_at of the job: the now() of the transaction that created it)."""
    return db.execute("SELECT next_run_at, created_at FROM outbox_job WHERE id = %s", [job_id]).fetchone()


def started_at(db: psycopg.Connection, job_id: int) -> datetime:
    return db.execute("SELECT started_at FROM outbox_job WHERE id = %s", [job_id]).fetchone()[0]


def test_with_min_interval_zero_a_job_created_while_the_key_runs_is_due_at_once(db: psycopg.Connection) -> None:
    assert db.execute("SELECT min_interval FROM outbox_task WHERE name = %s", [TASK]).fetchone() == (timedelta(0),)
    started_job(db, ago_seconds=0.0)

    created = enqueue(db)

    assert created.created_job
    next_run_at, created_at = job_times(db, created.job_id)
    assert next_run_at == created_at


def test_the_first_job_of_a_key_is_due_at_once_whatever_the_min_interval(db: psycopg.Connection) -> None:
    set_min_interval(db, 60)

    first = enqueue(db, "property:fresh")

    next_run_at, created_at = job_times(db, first.job_id)
    assert first.created_job and next_run_at == created_at


def test_a_job_created_while_the_keys_last_job_runs_is_due_min_interval_after_that_start(
    db: psycopg.Connection,
) -> None:
    set_min_interval(db, 30)
    running = started_job(db, ago_seconds=10)

    created = enqueue(db)

    assert created.created_job and created.job_id != running
    next_run_at, _ = job_times(db, created.job_id)
    assert next_run_at == started_at(db, running) + timedelta(seconds=30)


def test_a_job_created_after_the_keys_last_job_finished_is_due_min_interval_after_its_start(
    db: psycopg.Connection,
) -> None:
    set_min_interval(db, 30)
    done = started_job(db, ago_seconds=5)
    assert lifecycle.complete(db, done, 1)

    created = enqueue(db)

    next_run_at, _ = job_times(db, created.job_id)
    assert next_run_at == started_at(db, done) + timedelta(seconds=30)


def test_the_first_change_after_a_quiet_period_longer_than_min_interval_is_due_at_once(
    db: psycopg.Connection,
) -> None:
    set_min_interval(db, 3)
    done = started_job(db, ago_seconds=4)
    assert lifecycle.complete(db, done, 1)

    created = enqueue(db)

    next_run_at, created_at = job_times(db, created.job_id)
    assert next_run_at == created_at


def test_only_the_keys_own_starts_and_its_own_tasks_interval_count(db: psycopg.Connection) -> None:
    db.execute("INSERT INTO outbox_task (name, description, min_interval) VALUES (%s, 'other', '0')", [OTHER_TASK])
    set_min_interval(db, 30)
    started_job(db, "property:busy", ago_seconds=1)

    other_key = enqueue(db, "property:quiet")
    other_task = outbox.enqueue(
        db, task=OTHER_TASK, coalescing_key="export:1", payload={}, correlation_id="c-1",
        trigger_reason="nightly", actor_type="system",
    )

    for job in (other_key, other_task):
        next_run_at, created_at = job_times(db, job.job_id)
        assert next_run_at == created_at


def test_a_request_that_joins_a_held_back_job_neither_moves_nor_rewrites_it(db: psycopg.Connection) -> None:
    set_min_interval(db, 30)
    started_job(db, ago_seconds=1)
    waiting = enqueue(db)
    before = db.execute("SELECT xmin::text, ctid::text, next_run_at FROM outbox_job WHERE id = %s",
                        [waiting.job_id]).fetchone()

    joined = [enqueue(db) for _ in range(3)]

    assert all(j.job_id == waiting.job_id and j.created_request and not j.created_job for j in joined)
    after = db.execute("SELECT xmin::text, ctid::text, next_run_at FROM outbox_job WHERE id = %s",
                       [waiting.job_id]).fetchone()
    assert after == before, "a join writes no new version of the job row"


def test_a_delivery_before_the_held_back_job_is_due_is_answered_busy_without_spending_an_attempt(
    db: psycopg.Connection,
) -> None:
    set_min_interval(db, 30)
    running = started_job(db, ago_seconds=10)
    assert lifecycle.complete(db, running, 1)
    held_back = enqueue(db).job_id

    early = lifecycle.start(db, held_back, redelivered=False, lease_seconds=60)

    assert early.outcome is lifecycle.StartOutcome.BUSY
    assert early.retry_after_s is not None and 15 < early.retry_after_s <= 20
    assert db.execute("SELECT status::text, attempts, started_at FROM outbox_job WHERE id = %s",
                      [held_back]).fetchone() == ("pending", 0, None)

    db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [held_back])  # its time has come
    assert lifecycle.start(db, held_back, redelivered=False, lease_seconds=60).outcome is lifecycle.StartOutcome.STARTED


def test_the_min_interval_is_bounded_by_a_check_constraint(db: psycopg.Connection) -> None:
    for bad in ("-1 second", "1 hour 1 second"):
        with pytest.raises(errors.CheckViolation) as refused:
            db.execute("UPDATE outbox_task SET min_interval = %s::interval WHERE name = %s", [bad, TASK])
        assert refused.value.diag.constraint_name == "ck_outbox_task_min_interval_range"
    db.execute("UPDATE outbox_task SET min_interval = interval '1 hour' WHERE name = %s", [TASK])


def test_recalq_migrate_applies_the_setting_to_the_recalculation_task_only(
    database_url: str, db: psycopg.Connection
) -> None:
    db.execute("INSERT INTO outbox_task (name, description) VALUES (%s, 'other')", [OTHER_TASK])

    migrate.apply_task_policy(Settings(database_url=database_url, recalc_min_interval_seconds=2.5))
    assert dict(db.execute("SELECT name, min_interval FROM outbox_task WHERE name IN (%s, %s)",
                           [TASK, OTHER_TASK]).fetchall()) == {
        TASK: timedelta(seconds=2.5), OTHER_TASK: timedelta(0),
    }

    migrate.apply_task_policy(Settings(database_url=database_url))
    assert db.execute("SELECT min_interval FROM outbox_task WHERE name = %s", [TASK]).fetchone() == (timedelta(0),)


# -- the relay ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.published: dict[int, float] = {}
        self._lock = threading.Lock()

    def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        with self._lock:
            for m in messages:
                self.published.setdefault(m.job_id, time.monotonic())

    def has(self, job_id: int) -> Callable[[], bool]:
        return lambda: job_id in self.published


def test_the_relay_claims_a_held_back_job_only_once_due_and_wakes_for_it_without_waiting_a_whole_poll(
    database_url: str, db: psycopg.Connection
) -> None:
    set_min_interval(db, 1.0)
    recorder = Recorder()
    relay = Relay(connect=lambda: psycopg.connect(database_url, connect_timeout=10), publish=recorder,
                  poll_seconds=30)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    thread.start()
    try:
        first = enqueue(db).job_id
        wait_until(recorder.has(first), timeout=5, what="the first job, due at once")
        assert lifecycle.start(db, first, redelivered=False, lease_seconds=60).outcome is lifecycle.StartOutcome.STARTED
        held_back = enqueue(db).job_id
        [(due_in,)] = db.execute("SELECT extract(epoch FROM next_run_at - now())::float8 FROM outbox_job WHERE id = %s",
                                 [held_back]).fetchall()
        asked = time.monotonic()

        # Its NOTIFY woke the relay at once, but the job was not due: nothing was claimed.
        assert db.execute("SELECT status::text, claimed_until FROM outbox_job WHERE id = %s",
                          [held_back]).fetchone() == ("pending", None)
        wait_until(recorder.has(held_back), timeout=5, what="the held-back job once due (poll is 30 s)")
        waited = recorder.published[held_back] - asked
        assert due_in - 0.1 <= waited < due_in + 2.0
    finally:
        stop.set()
        db.execute("SELECT pg_notify('outbox_job_pending', '')")
        thread.join(15)
    assert not thread.is_alive(), "the relay did not stop"
