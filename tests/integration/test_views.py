"""The SQL views ops read (G8) and the R-A1 queue shape: columns, values, counts, indexes."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row

from outbox import lifecycle
from services.documents import add_documents
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import new_document, provision
from tests.harness.databases import DatabaseFactory

TASK = "compliance.recalculate_property"
R_A1_COLUMNS = [
    "property_id",
    "client_id",
    "trigger_reason",
    "actor_type",
    "actor_id",
    "correlation_id",
    "status",
    "attempts",
    "next_run_at",
    "last_error",
    "created_at",
    "updated_at",
]
#: What version 2 of the view appends after the R-A1 columns (CREATE OR REPLACE only appends).
V2_COLUMNS = ["job_id", "coalescing_key"]


@pytest.fixture(scope="module")
def schema_conn(db_factory: DatabaseFactory) -> Iterator[psycopg.Connection]:
    """A migrated database the catalog tests only read, shared to save a database each."""
    url = db_factory.create()
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            yield connection
    finally:
        db_factory.drop(url)


def queue_rows(conn: psycopg.Connection, property_id: int | None = None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        if property_id is None:
            return cur.execute("SELECT * FROM compliance_recalc_queue ORDER BY created_at, correlation_id").fetchall()
        return cur.execute(
            "SELECT * FROM compliance_recalc_queue WHERE property_id = %s ORDER BY created_at, correlation_id",
            [property_id],
        ).fetchall()


# --- compliance_recalc_queue -----------------------------------------------------------------


def test_the_compliance_queue_has_the_r_a1_columns_in_order_then_the_job_id_and_key(
    schema_conn: psycopg.Connection,
) -> None:
    columns = schema_conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_name = 'compliance_recalc_queue' ORDER BY ordinal_position"
    ).fetchall()

    assert [name for (name,) in columns] == R_A1_COLUMNS + V2_COLUMNS


def test_the_compliance_queue_shows_one_row_per_request_with_its_jobs_state(conn: psycopg.Connection) -> None:
    first, other = provision(conn, n_properties=2)
    client_id = conn.execute("SELECT client_id FROM properties WHERE id = %s", [first]).fetchone()[0]
    add_documents(
        conn,
        property_id=first,
        documents=[new_document()],
        source="client",
        actor=Actor(ActorType.CLIENT, "client-7"),
        trigger=TriggerReason.CLIENT_UPLOAD,
        correlation_id="upload-1",
    )
    conn.execute("SELECT * FROM compliance_request_recalculation(%s, 'svc-1', 'verify', 'system', NULL)", [first])
    conn.commit()
    [(job_id, next_run_at, updated_at)] = conn.execute(
        "SELECT id, next_run_at, updated_at FROM outbox_job WHERE coalescing_key = %s", [f"property:{first}"]
    ).fetchall()
    requests = dict(
        conn.execute("SELECT correlation_id, created_at FROM outbox_request WHERE job_id = %s", [job_id]).fetchall()
    )
    provisioning_cid = next(c for c in requests if c not in ("upload-1", "svc-1"))

    rows = queue_rows(conn, first)

    common = {
        "property_id": first,
        "client_id": client_id,
        "status": "pending",
        "attempts": 0,
        "next_run_at": next_run_at,
        "last_error": None,
        "updated_at": updated_at,
        "job_id": job_id,
        "coalescing_key": f"property:{first}",
    }
    expected = [
        {
            **common,
            "trigger_reason": "provisioning",
            "actor_type": "admin",
            "actor_id": "admin-1",
            "correlation_id": provisioning_cid,
        },
        {
            **common,
            "trigger_reason": "client_upload",
            "actor_type": "client",
            "actor_id": "client-7",
            "correlation_id": "upload-1",
        },
        {**common, "trigger_reason": "verify", "actor_type": "system", "actor_id": None, "correlation_id": "svc-1"},
    ]
    for row in expected:
        row["created_at"] = requests[row["correlation_id"]]
    assert sorted(rows, key=lambda r: r["correlation_id"]) == sorted(expected, key=lambda r: r["correlation_id"])
    assert [r["correlation_id"] for r in queue_rows(conn, other)] == [provisioning_cid]


def test_the_compliance_queue_follows_each_request_through_its_jobs_failure_and_retry(
    conn: psycopg.Connection,
) -> None:
    [property_id] = provision(conn)
    job_id = conn.execute("SELECT id FROM outbox_job").fetchone()[0]
    started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
    lifecycle.fail(conn, job_id, started.attempt, error="lock timeout", retryable=True, retry_in_seconds=30)
    conn.commit()
    next_run_at, updated_at = conn.execute(
        "SELECT next_run_at, updated_at FROM outbox_job WHERE id = %s", [job_id]
    ).fetchone()

    [row] = queue_rows(conn, property_id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("retrying", 1, "lock timeout")
    assert (row["next_run_at"], row["updated_at"]) == (next_run_at, updated_at)

    # The retry runs; a request that arrives meanwhile gets the key's next job.
    conn.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])
    assert lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60).attempt == 2
    conn.execute("SELECT compliance_request_recalculation(%s, 'later', 'verify', 'system', NULL)", [property_id])
    conn.commit()

    rows = queue_rows(conn, property_id)
    assert [(r["trigger_reason"], r["status"], r["attempts"], r["last_error"]) for r in rows] == [
        ("provisioning", "running", 2, "lock timeout"),
        ("verify", "pending", 0, None),
    ]


def test_a_malformed_payload_does_not_break_the_queue_view(conn: psycopg.Connection) -> None:
    [property_id] = provision(conn)
    malformed = [
        '{"property_id": "not-a-number"}',
        '{"property_id": 99999999999999999999}',
        '{"property_id": -5}',
        '{"property_id": 1.5}',
        '{"property_id": null}',
        '{"property_id": {"id": 1}}',
        '{"something_else": 1}',
    ]
    for n, payload in enumerate(malformed):
        conn.execute(
            "SELECT outbox_enqueue(%s, %s, %s::jsonb, 'corr', 'client_upload', 'client', NULL)",
            [TASK, f"broken:{n}", payload],
        )
    conn.commit()

    rows = queue_rows(conn)

    assert len(rows) == 1 + len(malformed)
    assert [r["property_id"] for r in rows if r["property_id"] is not None] == [property_id]
    broken = [r for r in rows if r["property_id"] is None]
    assert len(broken) == len(malformed)
    assert all(r["client_id"] is None and r["status"] == "pending" for r in broken)
    assert conn.execute(
        "SELECT jobs FROM outbox_queue_state WHERE task = %s AND status = 'pending'", [TASK]
    ).fetchone()[0] == 1 + len(malformed)


# --- outbox_queue_state ----------------------------------------------------------------------

OTHER_TASK = "test.other_task"


def insert_job(conn: psycopg.Connection, key: str, task: str = TASK, **columns: str) -> None:
    """A job in a given state, written directly; `columns` are SQL expressions."""
    values = {"task": f"'{task}'", "coalescing_key": f"'{key}'", "payload": "'{}'", **columns}
    conn.execute(f"INSERT INTO outbox_job ({', '.join(values)}) VALUES ({', '.join(values.values())})")


def test_the_queue_state_counts_jobs_per_task_and_status_with_ages_lag_and_recent_finishes(
    conn: psycopg.Connection,
) -> None:
    conn.execute("INSERT INTO outbox_task (name, description) VALUES (%s, 'a second task')", [OTHER_TASK])
    ago = "now() - interval '{} seconds'".format
    # compliance: two pending (one due for 40 s and created 100 s ago, one not due yet)
    insert_job(conn, "p:1", created_at=ago(100), next_run_at=ago(40))
    insert_job(conn, "p:2", next_run_at="now() + interval '1 hour'")
    insert_job(conn, "p:3", status="'published'", published_at="now()", created_at=ago(20))
    insert_job(
        conn,
        "p:4",
        status="'running'",
        attempts="1",
        started_at="now()",
        lease_expires_at="now() + interval '1 minute'",
    )
    insert_job(conn, "p:5", status="'retrying'", attempts="1", last_error="'x'")
    insert_job(conn, "p:6", status="'dead'", attempts="5", last_error="'x'", finished_at=ago(10), created_at=ago(600))
    insert_job(conn, "p:7", status="'done'", attempts="1", started_at=ago(5), finished_at=ago(5))
    insert_job(conn, "p:8", status="'done'", attempts="1", started_at=ago(200), finished_at=ago(180))
    insert_job(conn, "p:9", status="'done'", attempts="1", started_at=ago(900), finished_at=ago(900))
    insert_job(
        conn, "p:10", status="'superseded'", superseded_by="(SELECT min(id) FROM outbox_job)", finished_at=ago(30)
    )
    # the other task: one pending job that is not due yet
    insert_job(conn, "o:1", task=OTHER_TASK, next_run_at="now() + interval '1 minute'")
    conn.commit()

    with conn.cursor(row_factory=dict_row) as cur:
        state = {(r.pop("task"), r.pop("status")): r for r in cur.execute(
            "SELECT * FROM outbox_queue_state WHERE task IN (%s, %s)", [TASK, OTHER_TASK])}

    statuses = ["pending", "published", "running", "retrying", "done", "dead", "superseded", "cancelled"]
    assert set(state) == {(task, status) for task in (TASK, OTHER_TASK) for status in statuses}
    jobs = {key: row["jobs"] for key, row in state.items() if key[0] == TASK}
    assert jobs == {
        (TASK, "pending"): 2,
        (TASK, "published"): 1,
        (TASK, "running"): 1,
        (TASK, "retrying"): 1,
        (TASK, "dead"): 1,
        (TASK, "done"): None,
        (TASK, "superseded"): None,
        (TASK, "cancelled"): None,
    }

    pending = state[TASK, "pending"]
    assert Decimal(100) <= pending["oldest_age_s"] < Decimal(110)
    assert Decimal(40) <= pending["relay_lag_s"] < Decimal(50)
    assert Decimal(20) <= state[TASK, "published"]["oldest_age_s"] < Decimal(30)
    assert Decimal(600) <= state[TASK, "dead"]["oldest_age_s"] < Decimal(610)
    assert all(row["relay_lag_s"] is None for (task, status), row in state.items() if status != "pending")

    recent = {
        status: (state[TASK, status]["finished_last_1m"], state[TASK, status]["finished_last_5m"])
        for status in statuses
    }
    assert recent == {
        "pending": (0, 0),
        "published": (0, 0),
        "running": (0, 0),
        "retrying": (0, 0),
        "done": (1, 2),
        "dead": (1, 1),
        "superseded": (1, 1),
        "cancelled": (0, 0),
    }
    assert state[TASK, "done"]["per_second_5m"] == Decimal("0.007")

    other = state[OTHER_TASK, "pending"]
    assert (other["jobs"], other["relay_lag_s"]) == (1, Decimal(0)), "a job not yet due is no relay lag"
    assert all(
        row["jobs"] in (0, None) for (task, status), row in state.items() if task == OTHER_TASK and status != "pending"
    )


# --- R-A1 indexes and uniqueness -------------------------------------------------------------


def index_definitions(conn: psycopg.Connection, table: str) -> dict[str, str]:
    return dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table]).fetchall())


def test_the_queue_is_indexed_by_status_and_next_run_at(schema_conn: psycopg.Connection) -> None:
    definitions = index_definitions(schema_conn, "outbox_job").values()

    assert any(d.endswith("USING btree (status, next_run_at)") for d in definitions), definitions


def test_the_queue_is_indexed_by_property_and_status(schema_conn: psycopg.Connection) -> None:
    definitions = index_definitions(schema_conn, "outbox_job")

    assert definitions["ix_outbox_job_compliance_property_status"].endswith(
        "USING btree (compliance_property_id(payload), status) WHERE (task = 'compliance.recalculate_property'::text)"
    )


def plan(conn: psycopg.Connection, query: str, *, hide_index: str | None = None) -> str:
    """The plan when a full scan is not an option, so it shows whether indexes can answer at all
    (tables here are empty and cost alone would pick anything). `hide_index` is dropped in the
    rolled-back transaction, to see that the others answer on their own."""
    with conn.transaction(force_rollback=True):
        if hide_index is not None:
            conn.execute(f"DROP INDEX {hide_index}")
        conn.execute("SET LOCAL enable_seqscan = off")
        return "\n".join(line for (line,) in conn.execute(f"EXPLAIN {query}"))


def test_the_planner_can_answer_r_a1_lookups_from_those_indexes(schema_conn: psycopg.Connection) -> None:
    # The newest-first index (version 2 of the view) leads with the property as well and
    # ties with the R-A1 index on an empty table: hidden, so the R-A1 one is what is shown.
    by_property = plan(
        schema_conn,
        "SELECT * FROM compliance_recalc_queue WHERE property_id = 7 AND status = 'pending'",
        hide_index="ix_outbox_job_compliance_property_id",
    )
    due = plan(schema_conn, "SELECT id FROM outbox_job WHERE status = 'pending' AND next_run_at <= now()")

    assert "ix_outbox_job_compliance_property_status" in by_property, by_property
    assert "ix_outbox_job_status_next_run_at" in due, due


def test_a_property_accepts_each_correlation_id_once(conn: psycopg.Connection) -> None:
    first, second = provision(conn, n_properties=2)
    recalc = "SELECT created_request FROM compliance_request_recalculation(%s, %s, 'verify', 'system', NULL)"
    assert conn.execute(recalc, [first, "same-id"]).fetchone() == (True,)
    assert conn.execute(recalc, [second, "same-id"]).fetchone() == (True,), "another property may reuse the id"
    assert conn.execute(recalc, [first, "same-id"]).fetchone() == (False,)
    conn.commit()
    job_id = conn.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{first}"]).fetchone()[0]

    with pytest.raises(errors.UniqueViolation) as refused:
        conn.execute(
            "INSERT INTO outbox_request (job_id, coalescing_key, correlation_id, trigger_reason, actor_type)"
            " VALUES (%s, %s, 'same-id', 'verify', 'system')",
            [job_id, f"property:{first}"],
        )

    assert refused.value.diag.constraint_name == "uq_outbox_request_key_correlation"
    conn.rollback()
    definition = index_definitions(conn, "outbox_request")["uq_outbox_request_key_correlation"]
    assert definition.endswith("USING btree (coalescing_key, correlation_id)")
    assert conn.execute("SELECT count(*) FROM compliance_recalc_queue WHERE correlation_id = 'same-id'").fetchone() == (
        2,
    )
