"""Mutations that land at the racy moments of a real relay and a real worker (research T04, T05).

The processes are paused at an exact step (RECALQ_FAULT=<point>=wait:<gate>) while the test
commits a mutation of the same property, then released. What must never happen: the mutation's
request lost (the property ends with a score of older data, not pending), or a run that read the
data before the mutation stored as if it were fresh.

tests/e2e/test_no_lost_update.py covers the relay paused between publish and mark, and the worker
paused after reading; these cover the relay paused between claim and publish, and what a stale
run leaves behind before its follow-up job has run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import pytest

from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row
from tests.harness.observe import (
    assert_fresh_score,
    connect,
    history_count,
    property_locked_elsewhere,
    property_row,
    waits_on_a_lock,
)
from tests.harness.system import System, queue_depth, start_together, wait_until

pytestmark = pytest.mark.broker

FAR = date(2031, 6, 30)


def test_a_mutation_committed_while_the_relay_holds_the_claimed_job_unpublished_is_reflected_once(
    system_on_one_broker: System, database_url: str, tmp_path: Path
) -> None:
    system = system_on_one_broker
    gate = tmp_path / "release-relay"
    with connect(database_url) as db:
        [property_id] = provision(db)
        [claimed_job] = db.execute("SELECT id FROM outbox_job").fetchone()
        start_together(system.start_worker,
                       lambda: system.start_relay(env={"RECALQ_FAULT": f"relay.after_claim=wait:{gate}"}))
        wait_until(lambda: job_row(db, claimed_job)["claimed_until"] is not None, 30,
                   "the relay to claim the job (it then pauses before publishing it)")
        assert (job_row(db, claimed_job)["status"], queue_depth(system)) == ("pending", 0)

        joined = upload(db, property_id, new_document("gas_safety", FAR, DocumentStatus.VERIFIED))
        # The claimed job has not started, so the mutation joins it: its run reads the mutation.
        assert joined == claimed_job
        assert property_row(db, property_id)["compliance_score_pending"] is True

        gate.touch()
        system.wait_idle(timeout=60)

        row = job_row(db, claimed_job)
        assert (row["status"], row["publish_count"], row["attempts"]) == ("done", 1, 1)
        assert assert_fresh_score(db, property_id) == 25, "the run did not read the late mutation"
        assert effects_of(db, claimed_job) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        assert history_count(db, property_id) == 1
        assert_invariants(db)


def test_a_run_that_read_the_data_before_a_mutation_leaves_the_property_pending_until_its_follow_up_applies(
    system_on_one_broker: System, database_url: str, tmp_path: Path
) -> None:
    system = system_on_one_broker
    gate = tmp_path / "release-worker"
    with connect(database_url) as db:
        [property_id] = provision(db)
        [stale_job] = db.execute("SELECT id FROM outbox_job").fetchone()
        _, relay = start_together(
            lambda: system.start_worker(env={"RECALQ_FAULT": f"recalculation.after_read_state=wait:{gate}"}),
            system.start_relay,
        )
        wait_until(lambda: job_row(db, stale_job)["status"] == "running"
                   and property_locked_elsewhere(database_url, property_id),
                   60, "the worker to pause after reading the state")
        # No relay while the follow-up job exists, so the stale run's result can be looked at
        # before anything corrects it.
        system.kill(relay)

        with connect(database_url) as mutator, ThreadPoolExecutor(1) as pool:
            mutation = pool.submit(upload, mutator, property_id,
                                   new_document("gas_safety", FAR, DocumentStatus.VERIFIED))
            wait_until(lambda: mutation.done() or waits_on_a_lock(db, mutator.info.backend_pid), 30,
                       "the mutation to wait for the property lock the paused run holds")
            assert job_row(db, stale_job)["status"] == "running"
            gate.touch()
            follow_up = mutation.result(timeout=60)

        wait_until(lambda: job_row(db, stale_job)["status"] == "done", 30, "the paused run to finish")
        assert follow_up != stale_job, "a mutation after the run started needs a run of its own"
        stale = property_row(db, property_id)
        assert stale["compliance_score"] == 0, "the paused run scored the data it read"
        assert stale["compliance_score_pending"] is True, "a score older than the data is stored as fresh"
        assert stale["scored_generation"] < stale["generation"]
        assert job_row(db, follow_up)["status"] == "pending"

        system.start_relay()
        system.wait_idle(timeout=60)
        assert job_row(db, follow_up)["status"] == "done"
        assert assert_fresh_score(db, property_id) == 25
        assert history_count(db, property_id) == 2
        assert_invariants(db)
