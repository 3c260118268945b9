"""Messages of older jobs arriving after newer ones (research T18): a broker redelivery, a relay
re-publication or a rescue can hand a worker the message of a job that an earlier delivery
already applied, after a newer job of the same property applied newer data. The late message
must change nothing: no second snapshot or audit row, no score of older data.

Three concurrent deliveries of one message are in test_relay_kill.py (t17).
"""

from __future__ import annotations

from datetime import date

import pytest

from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.jobs import effects_of, job_row, task_log
from tests.harness.observe import assert_fresh_score, connect, history_count
from tests.harness.system import System, publish_jobs_again, start_together, wait_until

pytestmark = pytest.mark.broker

FAR = date(2031, 6, 30)


def test_messages_of_older_jobs_delivered_after_a_newer_job_applied_change_nothing(
    system_on_one_broker: System, database_url: str
) -> None:
    system = system_on_one_broker
    with connect(database_url) as db:
        [property_id] = provision(db)
        [oldest] = db.execute("SELECT id FROM outbox_job").fetchone()
        worker, _ = start_together(system.start_worker, system.start_relay)
        system.wait_idle(timeout=60)
        older = upload(db, property_id, new_document("gas_safety", FAR))
        system.wait_idle(timeout=60)
        newest = upload(db, property_id, new_document("eicr", FAR, DocumentStatus.VERIFIED))
        system.wait_idle(timeout=60)
        assert len({oldest, older, newest}) == 3
        fresh = assert_fresh_score(db, property_id)
        assert fresh == 33  # 12.5 pending gas + 20 verified eicr, half up
        applied_at = {j: effects_of(db, j) for j in (oldest, older, newest)}

        publish_jobs_again(system, db, newest, older, oldest, older)  # newest first, then back in time

        deliveries = {oldest: 2, older: 3, newest: 2}  # the relay's publication plus the late ones
        task_ids = {j: job_row(db, j)["task_id"] for j in deliveries}
        wait_until(lambda: all(len(task_log([worker], task_ids[j], "succeeded")) == n for j, n in deliveries.items()),
                   timeout=30, what=f"every late message handled:\n{system.logs()}")
        for job_id in deliveries:
            outcomes = task_log([worker], task_ids[job_id], "succeeded")
            assert sum("'outcome': 'applied'" in line for line in outcomes) == 1, outcomes
            assert all("'outcome': 'applied'" in line or "the job already finished" in line for line in outcomes)
            assert effects_of(db, job_id) == applied_at[job_id] == {
                "snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
            assert job_row(db, job_id)["attempts"] == 1

        assert assert_fresh_score(db, property_id) == fresh
        assert history_count(db, property_id) == 3
        latest = db.execute(
            "SELECT job_id FROM property_compliance_score_history WHERE property_id = %s ORDER BY id DESC LIMIT 1",
            [property_id],
        ).fetchone()
        assert latest == (newest,), "an older job's run was recorded after the newest"
        assert_invariants(db)
