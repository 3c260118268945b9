"""Poison written straight into the outbox tables with SQL, as a buggy producer in any language
could (research T16): rows the schema refuses never exist; rows it accepts but no run can
succeed on end DEAD at their first attempt with the reason recorded and audited, not after
five retries; and good rows committed before and after them still flow and converge.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import provision
from tests.harness.invariants import assert_invariants
from tests.harness.observe import assert_fresh_score, job
from tests.harness.system import System, wait_until

pytestmark = pytest.mark.broker

#: Payloads the recalculation task can never run: (coalescing key, payload, reason it records).
DEAD_ON_ARRIVAL: dict[str, tuple[str, Any, str]] = {
    "unknown property": ("property:999999", {"property_id": 999999}, "property 999999 does not exist"),
    "missing property_id": ("poison:missing", {}, "has no valid property_id"),
    "misspelt key": ("poison:misspelt", {"propertyId": 1}, "has no valid property_id"),
    "string id": ("poison:string", {"property_id": "1"}, "has no valid property_id"),
    "fractional id": ("poison:float", {"property_id": 1.5}, "has no valid property_id"),
    "boolean id": ("poison:bool", {"property_id": True}, "has no valid property_id"),
    "negative id": ("poison:negative", {"property_id": -1}, "has no valid property_id"),
    "null id": ("poison:null", {"property_id": None}, "has no valid property_id"),
    "nested id": ("poison:nested", {"property_id": {"id": 1}}, "has no valid property_id"),
}


def insert_job(conn: psycopg.Connection, task: str, key: str, payload: Any) -> int:
    """A job row as a producer that bypasses outbox_enqueue would write it: no request row."""
    row = conn.execute(
        "INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, %s, %s) RETURNING id",
        [task, key, Jsonb(payload)],
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("statement", "params", "error", "says"),
    [
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', '{}')",
         ["billing.no_such_task"], psycopg.errors.ForeignKeyViolation, "outbox_job_task_fkey"),
        ("SELECT outbox_enqueue(%s, 'k', '{}', 'c-1', 'manual_recalculation', 'admin', 'a')",
         ["billing.no_such_task"], psycopg.errors.InvalidParameterValue, 'unknown task "billing.no_such_task"'),
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', '[1, 2]')",
         [RECALCULATE_TASK], psycopg.errors.CheckViolation, "payload_check"),
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', '\"7\"')",
         [RECALCULATE_TASK], psycopg.errors.CheckViolation, "payload_check"),
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', 'null')",
         [RECALCULATE_TASK], psycopg.errors.CheckViolation, "payload_check"),
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', NULL)",
         [RECALCULATE_TASK], psycopg.errors.NotNullViolation, "payload"),
        ("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'k', '{not json')",
         [RECALCULATE_TASK], psycopg.errors.InvalidTextRepresentation, "json"),
        ("SELECT outbox_enqueue(%s, 'k', '[1]', 'c-1', 'manual_recalculation', 'admin', 'a')",
         [RECALCULATE_TASK], psycopg.errors.InvalidParameterValue, "payload must be a JSON object, got array"),
    ],
    ids=["unknown task", "unknown task via outbox_enqueue", "array payload", "string payload",
         "json null payload", "sql null payload", "malformed json", "array payload via outbox_enqueue"],
)
def test_an_outbox_row_the_schema_cannot_run_is_refused_at_insert_with_its_reason(
    conn: psycopg.Connection, statement: str, params: list[Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        conn.execute(statement, params)  # type: ignore[arg-type]
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM outbox_job").fetchone() == (0,)


def test_poison_rows_die_at_their_first_attempt_with_their_reason_while_good_rows_flow(
    system_on_one_broker: System, database_url: str
) -> None:
    system = system_on_one_broker
    with psycopg.connect(database_url, autocommit=True) as db:
        [before] = provision(db)
        poison = {name: insert_job(db, RECALCULATE_TASK, key, payload)
                  for name, (key, payload, _) in DEAD_ON_ARRIVAL.items()}
        [after] = provision(db)

        worker = system.start_worker()
        relay = system.start_relay()
        system.wait_idle(timeout=60)

        for name, job_id in poison.items():
            row = job(db, job_id)
            reason = DEAD_ON_ARRIVAL[name][2]
            assert (row["status"], row["attempts"]) == ("dead", 1), f"{name}: {row}"
            assert reason in row["last_error"], f"{name}: {row['last_error']}"
            failed = db.execute(
                "SELECT details FROM audit_log WHERE action = 'COMPLIANCE_RECALC_FAILED' AND job_id = %s",
                [job_id],
            ).fetchall()
            assert failed == [({"error": row["last_error"], "attempts": 1},)], f"{name}: {failed}"
        assert db.execute("SELECT count(*) FROM property_compliance_score_history").fetchone() == (2,)
        for property_id in (before, after):
            assert_fresh_score(db, property_id)
        assert worker.popen.poll() is None and relay.popen.poll() is None

        [later] = provision(db)  # the pipeline still works after swallowing the poison
        system.wait_idle(timeout=30)
        assert_fresh_score(db, later)
        assert_invariants(db)


def test_a_property_id_beyond_bigint_ends_dead_at_its_first_attempt_instead_of_crashing_each_attempt(
    system_on_one_broker: System, database_url: str
) -> None:
    """A JSON integer has no size limit; the properties' ids are bigint. Such a payload names no
    property, so it is as permanent an error as any other unknown id: one attempt, DEAD, audited.
    Nothing about it may escape the recalculation and leave the job running to be rescued."""
    system = system_on_one_broker
    rescue_fast = {"RECALQ_RESCUE_AFTER_SECONDS": "1", "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}
    short_lease = {"RECALQ_TASK_SOFT_TIME_LIMIT": "1", "RECALQ_TASK_TIME_LIMIT": "2", "RECALQ_JOB_LEASE_SECONDS": "3"}
    system.apply_task_policy(short_lease)
    with psycopg.connect(database_url, autocommit=True) as db:
        huge = insert_job(db, RECALCULATE_TASK, "property:huge", {"property_id": 2**63})
        [good] = provision(db)

        system.start_worker(env=short_lease)
        system.start_relay(env={**short_lease, **rescue_fast})
        try:
            wait_until(lambda: job(db, huge)["status"] == "dead", timeout=20, what="the job to end DEAD")
        except AssertionError:
            row = job(db, huge)
            raise AssertionError(
                f"job {huge} never ended: status {row['status']}, attempts {row['attempts']}, "
                f"rescued {row['rescue_count']} times, last_error {row['last_error']!r}\n{system.logs()[-4000:]}"
            ) from None
        row = job(db, huge)
        assert row["attempts"] == 1, row
        assert "9223372036854775808" in row["last_error"], row["last_error"]
        failed = db.execute(
            "SELECT details FROM audit_log WHERE action = 'COMPLIANCE_RECALC_FAILED' AND job_id = %s", [huge]
        ).fetchall()
        assert failed == [({"error": row["last_error"], "attempts": 1},)], failed
        system.wait_idle(timeout=30)
        assert_fresh_score(db, good)
        assert_invariants(db)


def test_a_registered_task_no_worker_runs_ends_dead_with_its_reason_instead_of_circulating(
    system_on_one_broker: System, database_url: str
) -> None:
    """The task registry (outbox_task) accepts any name an operator registers; a worker that
    does not know the task discards its message. The job must not then sit published forever,
    re-sent by every rescue pass: each such delivery counts an attempt with its reason (a later
    one may reach a worker that runs the task), so it ends DEAD after its last attempt
    (requeueable once a worker runs the task)."""
    system = system_on_one_broker
    rescue_fast = {"RECALQ_RESCUE_AFTER_SECONDS": "1", "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5"}
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute("INSERT INTO outbox_task (name, description) VALUES ('reports.retired_export', 'no worker runs it')")
        orphan = insert_job(db, "reports.retired_export", "report:1", {"report_id": 1})
        [good] = provision(db)

        worker = system.start_worker()
        system.start_relay(env=rescue_fast)
        wait_until(lambda: any("Received unregistered task of type 'reports.retired_export'" in line
                               for line in list(worker.lines)),
                   timeout=30, what=f"the worker to receive the orphan task:\n{system.logs()}")
        try:
            # Five deliveries, each one rescue grace after the last failure's retry time.
            wait_until(lambda: job(db, orphan)["status"] == "dead", timeout=60,
                       what="the orphan job to end DEAD")
        except AssertionError:
            row = job(db, orphan)
            raise AssertionError(
                f"the orphan job never ended: status {row['status']}, published {row['publish_count']} times, "
                f"rescued {row['rescue_count']} times, last_error {row['last_error']!r}"
            ) from None
        assert "reports.retired_export" in job(db, orphan)["last_error"]
        assert job(db, orphan)["attempts"] == 5
        system.wait_idle(timeout=30)
        assert_fresh_score(db, good)
        assert worker.popen.poll() is None
        assert_invariants(db)
