"""Reads what end-to-end tests assert on: a property's stored score against the formula, a
job's row, the queue view. Read-only, on an autocommit connection, so every read is fresh.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.harness.invariants import expected_score


def connect(database_url: str) -> psycopg.Connection:
    return psycopg.connect(database_url, autocommit=True)


def property_row(conn: psycopg.Connection, property_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """SELECT id, compliance_score, compliance_score_pending, compliance_as_of, compliance_breakdown,
                      generation, scored_generation
                 FROM properties WHERE id = %s""",
            [property_id],
        ).fetchone()
    assert row is not None, f"property {property_id} does not exist"
    return row


def assert_fresh_score(conn: psycopg.Connection, property_id: int) -> int:
    """The stored score is the formula on the current data and nothing is pending; returns it."""
    row = property_row(conn, property_id)
    assert row["compliance_score_pending"] is False, f"property {property_id} is still pending: {row}"
    assert row["compliance_as_of"] is not None, f"property {property_id} was never scored"
    want, breakdown = expected_score(conn, property_id, row["compliance_as_of"])
    assert row["compliance_score"] == want, f"property {property_id}: stored {row['compliance_score']}, formula {want}"
    assert row["compliance_breakdown"] == breakdown, f"property {property_id}: breakdown differs from the formula"
    return want


def job(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT * FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    assert row is not None, f"job {job_id} does not exist"
    return row


def job_status(conn: psycopg.Connection, job_id: int) -> str:
    return str(job(conn, job_id)["status"])


def queue_rows(
    conn: psycopg.Connection, correlation_id: str | None = None, *, property_id: int | None = None
) -> list[dict[str, Any]]:
    """The compliance_recalc_queue rows of one request, or of one property."""
    column, value = ("correlation_id", correlation_id) if property_id is None else ("property_id", property_id)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM compliance_recalc_queue WHERE {column} = %s ORDER BY created_at", [value]
        ).fetchall()


def audit_rows(conn: psycopg.Connection, action: str, property_id: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT * FROM audit_log WHERE action = %s AND property_id = %s ORDER BY id",
            [action, property_id],
        ).fetchall()


def history_count(conn: psycopg.Connection, property_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM property_compliance_score_history WHERE property_id = %s", [property_id]
    ).fetchone()
    assert row is not None
    return int(row[0])


def property_locked_elsewhere(database_url: str, property_id: int) -> bool:
    """Someone holds the property's row lock: with no mutation under way, the worker paused
    after reading the state (it reads under that lock and keeps it until it commits). Asked of
    the lock itself rather than of pg_stat_activity's last statement, whose text depends on how
    the worker batches its statements."""
    with psycopg.connect(database_url) as probe:
        try:
            probe.execute("SELECT 1 FROM properties WHERE id = %s FOR SHARE NOWAIT", [property_id])
        except psycopg.errors.LockNotAvailable:
            return True
        finally:
            probe.rollback()
    return False


def waits_on_a_lock(conn: psycopg.Connection, backend_pid: int) -> bool:
    row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [backend_pid]).fetchone()
    return row is not None and row[0] == "Lock"
