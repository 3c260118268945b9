"""compliance_recalc_queue version 2: the job id and key it appends, version 1's columns left
as they were, and the latest-first look-ups operators are told to run answered from indexes
without a sort (issue 5, bench 6)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from migrations.pinned import pinned_sql
from outbox import lifecycle
from tests.harness.data import provision
from tests.harness.databases import DatabaseFactory

TASK = "compliance.recalculate_property"
V1_COLUMNS = (
    "property_id, client_id, trigger_reason, actor_type, actor_id, correlation_id, status, attempts,"
    " next_run_at, last_error, created_at, updated_at"
)
RECALC = "SELECT * FROM compliance_request_recalculation(%s, %s, 'verify', 'system', NULL)"


@pytest.fixture(scope="module")
def schema_conn(db_factory: DatabaseFactory) -> Iterator[psycopg.Connection]:
    """A migrated database the plan tests only read, shared to save a database each."""
    url = db_factory.create()
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            yield connection
    finally:
        db_factory.drop(url)


def several_jobs(conn: psycopg.Connection) -> tuple[int, int]:
    """Two properties: the first with a running job carrying two requests and a waiting job
    behind it, the second with one pending job; plus a job whose payload names no property."""
    first, second = provision(conn, n_properties=2)
    running = conn.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{first}"]).fetchone()[0]
    conn.execute(RECALC, [first, "before-start"])
    lifecycle.start(conn, running, redelivered=False, lease_seconds=60)
    conn.execute(RECALC, [first, "after-start"])
    conn.execute(
        "SELECT outbox_enqueue(%s, 'broken:1', '{\"property_id\": \"x\"}'::jsonb, 'poison', 'verify', 'system', NULL)",
        [TASK],
    )
    conn.commit()
    return first, second


def test_each_request_row_names_the_job_that_carries_it_and_that_jobs_key(conn: psycopg.Connection) -> None:
    first, second = several_jobs(conn)
    job_of = dict(conn.execute("SELECT correlation_id, job_id FROM outbox_request WHERE coalescing_key <> %s",
                               [f"property:{second}"]).fetchall())
    [(second_cid, second_job)] = conn.execute(
        "SELECT correlation_id, job_id FROM outbox_request WHERE coalescing_key = %s", [f"property:{second}"]
    ).fetchall()
    provisioned = next(cid for cid in job_of if cid not in ("before-start", "after-start", "poison"))
    running, waiting = job_of["before-start"], job_of["after-start"]
    assert job_of[provisioned] == running and waiting > running, "a request after the start waits in the next job"

    rows = conn.execute(
        "SELECT property_id, correlation_id, status::text, job_id, coalescing_key FROM compliance_recalc_queue"
    ).fetchall()

    assert sorted(rows, key=lambda r: (r[3], r[1])) == sorted([
        (first, provisioned, "running", running, f"property:{first}"),
        (first, "before-start", "running", running, f"property:{first}"),
        (first, "after-start", "pending", waiting, f"property:{first}"),
        (second, second_cid, "pending", second_job, f"property:{second}"),
        (None, "poison", "pending", job_of["poison"], "broken:1"),
    ], key=lambda r: (r[3], r[1]))
    latest = conn.execute(
        "SELECT correlation_id FROM compliance_recalc_queue WHERE property_id = %s ORDER BY job_id DESC LIMIT 1",
        [first],
    ).fetchall()
    assert latest == [("after-start",)], "job_id DESC puts the newest job's requests first"


def test_the_r_a1_columns_show_exactly_what_version_1_of_the_view_showed(conn: psycopg.Connection) -> None:
    several_jobs(conn)
    v1 = pinned_sql("views/compliance_recalc_queue_v1.sql").replace(
        "CREATE VIEW compliance_recalc_queue AS", "CREATE TEMP VIEW recalc_queue_v1 AS"
    )
    conn.execute(v1)
    types = """SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
                WHERE attrelid = %s::regclass AND attnum > 0 ORDER BY attnum"""

    v1_types = conn.execute(types, ["recalc_queue_v1"]).fetchall()
    v2_types = conn.execute(types, ["compliance_recalc_queue"]).fetchall()
    only_v1 = conn.execute(
        f"SELECT {V1_COLUMNS} FROM recalc_queue_v1 EXCEPT ALL SELECT {V1_COLUMNS} FROM compliance_recalc_queue"
    ).fetchall()
    only_v2 = conn.execute(
        f"SELECT {V1_COLUMNS} FROM compliance_recalc_queue EXCEPT ALL SELECT {V1_COLUMNS} FROM recalc_queue_v1"
    ).fetchall()

    assert [name for name, _ in v1_types] == [c.strip() for c in V1_COLUMNS.split(",")]
    assert v2_types[: len(v1_types)] == v1_types
    assert v2_types[len(v1_types):] == [("job_id", "bigint"), ("coalescing_key", "text")]
    assert conn.execute("SELECT count(*) FROM recalc_queue_v1").fetchone() == (5,)
    assert (only_v1, only_v2) == ([], [])


def plan(conn: psycopg.Connection, query: str) -> str:
    """The plan the planner picks when a full scan or a sort is not an option: whether it can
    answer from an index at all, which an empty test table cannot show by cost."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_sort = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        return "\n".join(line for (line,) in conn.execute(f"EXPLAIN {query}"))


def test_a_propertys_latest_requests_are_read_newest_job_first_from_an_index_without_a_sort(
    schema_conn: psycopg.Connection,
) -> None:
    by_property = plan(
        schema_conn, "SELECT * FROM compliance_recalc_queue WHERE property_id = 7 ORDER BY job_id DESC LIMIT 50"
    )
    by_key = plan(
        schema_conn,
        "SELECT * FROM compliance_recalc_queue WHERE coalescing_key = 'property:7' ORDER BY job_id DESC LIMIT 50",
    )

    assert "ix_outbox_job_compliance_property_id" in by_property, by_property
    assert "ix_outbox_job_key_id" in by_key, by_key
    assert "Sort" not in by_property + by_key, by_property + by_key


def test_the_newest_first_index_covers_only_recalculation_jobs_by_property_then_id(
    schema_conn: psycopg.Connection,
) -> None:
    [(definition,)] = schema_conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_job_compliance_property_id'"
    ).fetchall()

    assert definition.endswith(
        "USING btree (compliance_property_id(payload), id DESC)"
        " WHERE (task = 'compliance.recalculate_property'::text)"
    )
