"""The attempt history of jobs (outbox_attempt): every attempt's outcome, error, worker and
Celery task id, so an operator sees every error of a job, not only its last."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row

from outbox.queries import QUERIES

#: A job keeps at most max_attempts (100) attempts per run; this many rows is every one of a
#: job requeued a few times.
MAX_ATTEMPTS_SHOWN = 500


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    job_id: int
    #: 0 for the job's first run, n after its n-th requeue.
    run: int
    attempt: int
    #: succeeded | failed | lost | cancelled; None for the attempt running now.
    outcome: str | None
    error: str | None
    worker: str | None
    celery_task_id: str
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class FailedAttempts:
    task: str
    outcome: str
    attempts: int


def attempts_of_job(conn: psycopg.Connection, job_id: int, *, limit: int = MAX_ATTEMPTS_SHOWN) -> list[AttemptRecord]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["attempts_of_job"], {"job_id": job_id, "limit": limit}).fetchall()
    return [AttemptRecord(**row) for row in rows]


def failed_attempts_since(conn: psycopg.Connection, *, seconds: float) -> list[FailedAttempts]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["failed_attempts_since"], {"seconds": seconds}).fetchall()
    return [FailedAttempts(**row) for row in rows]
