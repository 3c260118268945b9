"""G2 with real processes paused at the racy step: a mutation that commits while the same
property's recalculation is underway (research T05) or while the relay is between publishing
and marking its job (T04) is reflected once everything is idle."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from kombu import Connection

from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.observe import (
    assert_fresh_score,
    connect,
    history_count,
    job,
    job_status,
    property_locked_elsewhere,
    waits_on_a_lock,
)
from tests.harness.system import System, wait_until

FAR = date(2031, 6, 30)


def messages_in_queue(broker_url: str, queue: str) -> int:
    with Connection(broker_url, connect_timeout=5) as broker:
        try:
            return broker.channel().queue_declare(queue=queue, passive=True).message_count
        except broker.channel_errors:
            return 0  # not declared yet


def test_a_mutation_committed_while_the_recalculation_computes_is_reflected_once_idle(
    system: System, database_url: str, tmp_path: Path
) -> None:
    gate = tmp_path / "release-worker"
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        [first_job] = conn.execute("SELECT id FROM outbox_job").fetchone()
        system.start_worker(env={"RECALQ_FAULT": f"recalculation.after_read_state=wait:{gate}"})
        system.start_relay()
        wait_until(lambda: property_locked_elsewhere(database_url, property_id), 60,
                   "the worker to pause after reading the state")

        with connect(database_url) as mutator, ThreadPoolExecutor(1) as pool:
            mutation = pool.submit(
                upload, mutator, property_id, new_document("gas_safety", FAR, DocumentStatus.VERIFIED)
            )
            wait_until(lambda: mutation.done() or waits_on_a_lock(conn, mutator.info.backend_pid),
                       30, "the mutation to commit or to wait for the property lock")
            assert job_status(conn, first_job) == "running"  # the mutation overlaps the run
            gate.touch()
            mutation_job = mutation.result(timeout=60)
        system.wait_idle()

        first_snapshot = conn.execute(
            "SELECT score FROM property_compliance_score_history WHERE job_id = %s", [first_job]
        ).fetchone()
        assert first_snapshot == (0,), "the paused run read the state before the mutation"
        assert mutation_job != first_job, "a mutation after the run started needs a run of its own"
        assert job_status(conn, mutation_job) == "done"
        assert assert_fresh_score(conn, property_id) == 25
        assert history_count(conn, property_id) == 2
        assert_invariants(conn)


def test_a_mutation_committed_while_the_relay_is_between_publish_and_mark_is_reflected_once_idle(
    system: System, database_url: str, broker_url: str, tmp_path: Path
) -> None:
    gate = tmp_path / "release-relay"
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        [published_job] = conn.execute("SELECT id FROM outbox_job").fetchone()
        system.start_relay(env={"RECALQ_FAULT": f"relay.after_publish=wait:{gate}"})
        wait_until(lambda: messages_in_queue(broker_url, system.queue) == 1, 60,
                   "the relay to publish the job (it then pauses before marking it)")
        assert job_status(conn, published_job) == "pending"

        joined = upload(conn, property_id, new_document("gas_safety", FAR, DocumentStatus.VERIFIED))
        # The job is on the broker but not marked: joining it is right only if its run reads
        # this mutation, which the worker (not started yet) will.
        assert joined == published_job

        gate.touch()
        wait_until(lambda: job_status(conn, published_job) == "published", 30, "the relay to mark the job")
        system.start_worker()
        system.wait_idle()

        assert job(conn, published_job)["status"] == "done"
        assert assert_fresh_score(conn, property_id) == 25
        assert history_count(conn, property_id) == 1
        assert_invariants(conn)
