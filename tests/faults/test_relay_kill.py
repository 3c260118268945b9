"""Relay deaths, duplicate and lost messages, and a poisoned message: real processes, both brokers.

Every relay and worker here is a real subprocess killed by a real SIGKILL at an exact step
(RECALQ_FAULT, see recalq/faults.py); what matters afterwards is whether each job's effects
landed exactly once (G4, G7) and the I1-I6 invariants hold.
"""

from __future__ import annotations

import pickle
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from kombu import Connection

from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row, property_with_one_job, task_log
from tests.harness.system import (
    System,
    celery_app,
    publish_jobs_again,
    queue_depth,
    start_together,
    wait_until,
)

pytestmark = pytest.mark.broker


@pytest.fixture(autouse=True)
def sigkill_leftovers(system: System) -> Iterator[None]:
    """Ends this test's processes by SIGKILL: their graceful shutdown is not under test, and
    waiting for it costs seconds per process."""
    yield
    for proc in system.processes:
        system.kill(proc)


RESCUE_FAST = {"RECALQ_RESCUE_AFTER_SECONDS": "1", "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}


def purge_queue(system: System) -> None:
    with Connection(system.broker_url, connect_timeout=5) as conn:
        conn.default_channel.queue_purge(system.queue)


def killed_relay(system: System, point: str) -> None:
    relay = system.start_relay(env={"RECALQ_FAULT": f"{point}=kill"})
    assert relay.popen.wait(30) == -signal.SIGKILL, f"the relay did not die at {point}:\n{relay.output()}"


def test_t01_a_relay_killed_between_publish_and_mark_causes_a_second_delivery_applied_once(
    system: System, database_url: str
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    killed_relay(system, "relay.after_publish")
    with system.connect() as db:
        dead = job_row(db, job_id)
        assert (dead["status"], dead["publish_count"]) == ("pending", 0)  # published, never marked
        assert dead["claimed_until"] is not None
        wait_until(lambda: queue_depth(system) == 1, timeout=10, what="the dead relay's message in the queue")

        system.start_relay()
        wait_until(lambda: job_row(db, job_id)["status"] == "published", timeout=15, what="the re-publication")
        republished = job_row(db, job_id)
        assert republished["published_at"] >= dead["claimed_until"], "re-published inside the dead relay's lease"
        assert queue_depth(system) == 2  # the same job twice: nothing has consumed either yet

        worker = system.start_worker()
        system.wait_idle(timeout=60)
        task_id = republished["task_id"]
        wait_until(lambda: len(task_log([worker], task_id, "succeeded")) == 2, timeout=20,
                   what=f"both deliveries handled:\n{system.logs()}")
        outcomes = task_log([worker], task_id, "succeeded")
        assert sum("'outcome': 'applied'" in line for line in outcomes) == 1, outcomes
        assert sum("'outcome': 'dropped'" in line for line in outcomes) == 1, outcomes

        assert job_row(db, job_id)["status"] == "done"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])


def test_t02_a_relay_killed_after_claiming_leaves_the_row_to_be_published_after_its_lease(
    system: System, database_url: str
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    killed_relay(system, "relay.after_claim")
    with system.connect() as db:
        claimed = job_row(db, job_id)
        assert (claimed["status"], claimed["publish_count"]) == ("pending", 0)
        assert claimed["claimed_until"] is not None
        assert queue_depth(system) == 0  # it died before publishing anything

        start_together(system.start_worker, system.start_relay)
        system.wait_idle(timeout=60)
        row = job_row(db, job_id)
        assert (row["status"], row["publish_count"]) == ("done", 1)
        assert row["published_at"] >= claimed["claimed_until"], "published inside the dead relay's lease"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])


def test_a_relay_killed_after_marking_leaves_one_message_and_nothing_to_publish_again(
    system: System, database_url: str
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    killed_relay(system, "relay.after_mark")
    with system.connect() as db:
        marked = job_row(db, job_id)
        assert (marked["status"], marked["publish_count"], marked["claimed_until"]) == ("published", 1, None)
        wait_until(lambda: queue_depth(system) == 1, timeout=10, what="the dead relay's message in the queue")

        worker, _ = start_together(system.start_worker, system.start_relay)
        system.wait_idle(timeout=60)
        row = job_row(db, job_id)
        assert (row["status"], row["publish_count"], row["attempts"]) == ("done", 1, 1)
        assert len(task_log([worker], row["task_id"], "succeeded")) == 1, "published again"
        assert queue_depth(system) == 0
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])


def test_t17_one_message_delivered_three_times_concurrently_is_applied_once(
    system: System, database_url: str
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    workers = start_together(lambda: system.start_worker(concurrency=2), lambda: system.start_worker(concurrency=2))
    with system.connect() as db:
        row = job_row(db, job_id)
        publish_jobs_again(system, db, job_id, job_id, job_id)

        system.wait_idle(timeout=60)
        wait_until(lambda: len(task_log(workers, row["task_id"], "succeeded")) == 3, timeout=20,
                   what=f"all three deliveries handled:\n{system.logs()}")
        outcomes = task_log(workers, row["task_id"], "succeeded")
        assert sum("'outcome': 'applied'" in line for line in outcomes) == 1, outcomes
        assert sum("'outcome': 'dropped'" in line for line in outcomes) == 2, outcomes
        assert job_row(db, job_id)["attempts"] == 1
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])


def test_a_published_job_whose_message_was_lost_is_rescued_and_applied_once(
    system: System, database_url: str
) -> None:
    property_id, job_id = property_with_one_job(database_url)
    first = system.start_relay()
    with system.connect() as db:
        wait_until(lambda: job_row(db, job_id)["status"] == "published", timeout=15, what="the first publication")
        system.kill(first, signal.SIGTERM)
        assert queue_depth(system) == 1
        purge_queue(system)  # the broker loses the message before any worker saw it
        assert queue_depth(system) == 0

        worker, _ = start_together(system.start_worker, lambda: system.start_relay(env=RESCUE_FAST))
        system.wait_idle(timeout=60)

        row = job_row(db, job_id)
        assert row["status"] == "done"
        assert row["rescue_count"] >= 1 and row["publish_count"] == 1 + row["rescue_count"]
        assert task_log([worker], row["task_id"], "succeeded"), "the re-sent message lost its task id"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])


class TouchOnUnpickle:
    """A payload whose mere unpickling creates a file: proof of execution if it ever appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_t30_a_pickle_message_in_the_queue_is_refused_unexecuted_and_the_worker_goes_on(
    system: System, database_url: str, tmp_path: Path
) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(TouchOnUnpickle(probe)))
    assert probe.exists(), "the payload would not have shown an execution"
    marker = tmp_path / "executed"

    worker, _ = start_together(system.start_worker, system.start_relay)
    with celery_app(system) as app:
        poisoned_id = str(uuid.uuid4())
        message = app.amqp.as_task_v2(
            poisoned_id, "compliance.recalculate_property", args=(),
            kwargs={"job_id": 1, "payload": TouchOnUnpickle(marker)},
        )
        queue = app.amqp.queues[system.queue]
        with Connection(system.broker_url, connect_timeout=5) as conn:
            conn.Producer(serializer="pickle").publish(
                message.body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                headers=message.headers, **message.properties,
            )
    wait_until(lambda: any("Refusing to deserialize untrusted content of type pickle" in line
                           for line in list(worker.lines)),
               timeout=20, what=f"the worker to refuse the pickle message:\n{worker.output()}")

    property_id, job_id = property_with_one_job(database_url)
    system.wait_idle(timeout=60)
    assert not marker.exists(), "the pickle payload was executed"
    assert worker.popen.poll() is None
    with psycopg.connect(database_url) as db:
        assert job_row(db, job_id)["status"] == "done"
        assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert_invariants(db, [property_id])
