"""A second job kind through the real pipeline: relay, broker, `celery worker` subprocesses.

The toy kind (tests/harness/toy_kind.py) is registered the way a real one is: a handler in the
composition root's `job_kinds`, and an outbox_task row with its own queue, lease and time limits.
It runs through the same runner and Celery adapter as the recalculation, on workers of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import outbox
from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import provision
from tests.harness.system import FAST_RESCUE, System, first_broker_url, wait_until
from tests.harness.toy_kind import TOY_TASK

pytestmark = pytest.mark.broker

TOY_APP = "tests.harness.toy_kind"


@pytest.fixture
def system(database_url: str, tmp_path: Any) -> Iterator[System]:
    sut = System(database_url, first_broker_url(), tmp_path)
    yield sut
    sut.stop()


def register_toy(conn: psycopg.Connection, queue: str, *, lease: float, soft: float, hard: float) -> None:
    conn.execute(
        """INSERT INTO outbox_task (name, description, queue, lease_seconds, soft_time_limit_seconds,
                                    time_limit_seconds, heartbeats, mode, max_attempts)
           VALUES (%s, 'a job kind of the tests', %s, %s, %s, %s, true, 'none', 5)""",
        [TOY_TASK, queue, lease, soft, hard],
    )


def submit(conn: psycopg.Connection, payload: dict[str, Any]) -> int:
    with conn.transaction():
        return outbox.enqueue(conn, task=TOY_TASK, coalescing_key="toy", payload=payload,
                              correlation_id=uuid.uuid4().hex, trigger_reason="submitted",
                              actor_type="system").job_id


def attempts_of(conn: psycopg.Connection, job_id: int) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT attempt, outcome::text, error, worker FROM outbox_attempt WHERE job_id = %s "
                        "ORDER BY run, attempt", [job_id]).fetchall()


def finished(conn: psycopg.Connection, job_id: int) -> bool:
    row = conn.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    return row is not None and row[0] in {"done", "dead"}


def node_of(process_name: str) -> str:
    return f"{process_name}@"


def test_a_second_kind_runs_on_its_own_queue_and_workers_beside_the_recalculation(system: System) -> None:
    toy_queue = f"{system.queue}-toy"
    with system.connect() as db:
        register_toy(db, toy_queue, lease=30, soft=10, hard=15)
        recalc_worker = system.start_worker(concurrency=1)
        toy_worker = system.start_worker(concurrency=1, app=TOY_APP, queue=toy_queue)
        system.start_relay()
        [property_id] = provision(db)
        toy_job = submit(db, {"seconds": 0})
        system.wait_idle(timeout=60)

        [recalc_job] = db.execute("SELECT id FROM outbox_job WHERE task = %s", [RECALCULATE_TASK]).fetchone()
        [(_, recalc_outcome, _, recalc_node)] = attempts_of(db, recalc_job)
        [(_, toy_outcome, _, toy_node)] = attempts_of(db, toy_job)
        assert (recalc_outcome, toy_outcome) == ("succeeded", "succeeded")
        assert recalc_node.startswith(node_of(recalc_worker.name)), "the recalculation stays on its own workers"
        assert toy_node.startswith(node_of(toy_worker.name)), "the toy kind is served by the workers of its queue"
        assert db.execute("SELECT compliance_score_pending FROM properties WHERE id = %s",
                          [property_id]).fetchone() == (False,)


def test_a_long_attempt_that_heartbeats_keeps_a_lease_shorter_than_its_run_and_is_never_taken_over(
    system: System,
) -> None:
    toy_queue = f"{system.queue}-toy"
    with system.connect() as db:
        register_toy(db, toy_queue, lease=2, soft=20, hard=25)
        system.start_worker(concurrency=2, app=TOY_APP, queue=toy_queue)
        system.start_relay(env=FAST_RESCUE)
        job_id = submit(db, {"seconds": 7, "heartbeat": True})
        wait_until(lambda: finished(db, job_id), 60, "the heart-beating toy job to finish")

        row = db.execute("SELECT status::text, attempts, rescue_count FROM outbox_job WHERE id = %s",
                         [job_id]).fetchone()
        assert row == ("done", 1, 0), "a live attempt with heartbeats was taken over"
        assert [a[:2] for a in attempts_of(db, job_id)] == [(1, "succeeded")]


def test_a_long_attempt_without_heartbeats_outlives_its_lease_and_is_taken_over_and_fenced_out(
    system: System,
) -> None:
    toy_queue = f"{system.queue}-toy"
    with system.connect() as db:
        register_toy(db, toy_queue, lease=2, soft=20, hard=25)
        worker = system.start_worker(concurrency=2, app=TOY_APP, queue=toy_queue)
        system.start_relay(env=FAST_RESCUE)
        job_id = submit(db, {"seconds_first_attempt": 9, "heartbeat": False})
        wait_until(lambda: finished(db, job_id), 60, "the toy job to be taken over and finish")
        wait_until(lambda: any("fenced out" in line for line in worker.lines), 30,
                   "the first attempt to finish its work and find itself fenced out")

        row = db.execute("SELECT status::text, attempts, rescue_count >= 1 FROM outbox_job WHERE id = %s",
                         [job_id]).fetchone()
        assert row == ("done", 2, True)
        assert [a[:3] for a in attempts_of(db, job_id)] == [
            (1, "lost", "worker died or lease expired"), (2, "succeeded", None)]


def test_a_kinds_own_soft_time_limit_reaches_its_worker_in_the_message_and_ends_the_attempt_as_a_failure(
    system: System,
) -> None:
    """The deployment's global soft limit is 8 s; the toy's row says 2 s, and wins."""
    toy_queue = f"{system.queue}-toy"
    with system.connect() as db:
        register_toy(db, toy_queue, lease=10, soft=2, hard=5)
        system.start_worker(concurrency=1, app=TOY_APP, queue=toy_queue)
        system.start_relay()
        job_id = submit(db, {"seconds_first_attempt": 4, "heartbeat": True})
        wait_until(lambda: finished(db, job_id), 60, "the toy job to fail its first attempt and finish")

        attempts = attempts_of(db, job_id)
        assert [a[:2] for a in attempts] == [(1, "failed"), (2, "succeeded")]
        assert attempts[0][2].startswith("SoftTimeLimitExceeded"), attempts[0][2]
        assert db.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone() == ("done",)
