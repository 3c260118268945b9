"""One recalculation job as a fault test sees it: its row, what it applied, what workers logged.

Fault tests kill processes around a single job and then ask whether that job's effects
landed exactly once; these are the questions they ask, answered from Postgres and the logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox import lifecycle
from services.scoring import DocumentStatus
from services.vocabulary import RECALCULATE_TASK
from tests.harness.api import new_tenant
from tests.harness.data import new_document, provision, upload
from tests.harness.system import Process


def property_with_one_job(database_url: str) -> tuple[int, int]:
    """A provisioned property with a verified upload: one pending job carries both requests."""
    with psycopg.connect(database_url) as conn:
        [property_id] = provision(conn)
        upload(conn, property_id, new_document("gas_safety", date(2030, 1, 1), DocumentStatus.VERIFIED))
        jobs = conn.execute(
            "SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{property_id}"]
        ).fetchall()
    assert len(jobs) == 1, f"expected the upload to join the provisioning job, got {jobs}"
    return property_id, jobs[0][0]


def dead_job(database_url: str) -> tuple[int, int]:
    """A property whose only job failed for good: (property id, job id)."""
    other = new_tenant(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        [job_id] = [r[0] for r in conn.execute(
            "SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{other.property_ids[0]}"]
        )]
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
        assert started.outcome == "started"
        assert lifecycle.fail(conn, job_id, started.attempt, error="boom: bad data", retryable=False,
                              retry_in_seconds=0) == "dead"
    return other.property_ids[0], job_id


def job_row(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """SELECT id, task, payload, status::text AS status, attempts, publish_count, rescue_count,
                      claimed_until, published_at, celery_task_id::text AS task_id, last_error
                 FROM outbox_job WHERE id = %s""",
            [job_id],
        ).fetchone()
    assert row is not None, f"job {job_id} does not exist"
    return row


def effects_of(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    """How many times the job's effects landed, and the attempt that applied them."""
    snapshots = conn.execute(
        "SELECT count(*) FROM property_compliance_score_history WHERE job_id = %s", [job_id]
    ).fetchone()
    audits = conn.execute(
        "SELECT details->>'attempt' FROM audit_log WHERE job_id = %s AND action = 'COMPLIANCE_SCORE_UPDATED'",
        [job_id],
    ).fetchall()
    return {
        "snapshots": snapshots[0] if snapshots else 0,
        "audits": len(audits),
        "applied_by_attempts": sorted(int(a[0]) for a in audits),
    }


def task_log(processes: Iterable[Process], task_id: str, event: str) -> list[str]:
    """Worker log lines for one Celery task id, e.g. event='received' or 'succeeded'."""
    marker = f"{RECALCULATE_TASK}[{task_id}] {event}"
    return [line for proc in processes for line in list(proc.lines) if marker in line]
