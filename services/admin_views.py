"""Read models of the admin API: a property's score history and recalculation status, the
queue, jobs, and what an earlier request did (the answer to its replay).

A status page that reads the property and its jobs in two snapshots can show a contradiction
(pending, yet every job done), so the multi-query reads run in one REPEATABLE READ, READ ONLY
transaction: one snapshot, no locks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from services.errors import InvalidInput, PropertyNotFound
from services.property_views import score_status
from services.queries import QUERIES
from services.recalc_requests import coalescing_key

MAX_PAGE_SIZE = 200
#: Jobs shown by the recalculation status, and requests shown per job.
STATUS_JOBS = 20
REQUESTS_PER_JOB = 20


@dataclass(frozen=True, slots=True)
class CurrentScore:
    score: int | None
    breakdown: dict[str, Any] | None
    version: int | None
    calculated_at: datetime | None
    pending: bool
    status: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    job_id: int
    score: int
    breakdown: dict[str, Any]
    version: int
    as_of: date
    calculated_at: datetime


@dataclass(frozen=True, slots=True)
class ScoreHistory:
    property_id: int
    current: CurrentScore
    snapshots: tuple[Snapshot, ...]


@dataclass(frozen=True, slots=True)
class JobRequest:
    trigger_reason: str
    actor_type: str
    actor_id: str | None
    correlation_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyJob:
    job_id: int
    status: str
    attempts: int
    max_attempts: int
    last_error: str | None
    next_run_at: datetime
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    celery_task_id: str
    #: The oldest requests that joined the job, at most REQUESTS_PER_JOB of them.
    requests: tuple[JobRequest, ...]
    requests_total: int


@dataclass(frozen=True, slots=True)
class RecalcStatus:
    property_id: int
    pending: bool
    status: str
    last_calculated_at: datetime | None
    score: int | None
    jobs: tuple[KeyJob, ...]


@dataclass(frozen=True, slots=True)
class QueueState:
    task: str
    status: str
    jobs: int | None
    oldest_age_s: float | None
    relay_lag_s: float | None
    finished_last_1m: int
    finished_last_5m: int
    per_second_5m: float


@dataclass(frozen=True, slots=True)
class Job:
    job_id: int
    task: str
    coalescing_key: str
    status: str
    attempts: int
    max_attempts: int
    last_error: str | None
    next_run_at: datetime
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    celery_task_id: str
    requeue_count: int


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: tuple[Job, ...]
    #: Pass as `before_id` for the next (older) page; None on the last page.
    next_before_id: int | None


def score_history(conn: psycopg.Connection, property_id: int, *, limit: int = 50) -> ScoreHistory:
    _check_limit(limit)
    with _snapshot(conn), conn.cursor(row_factory=dict_row) as cur:
        current = _current(cur, property_id)
        rows = cur.execute(QUERIES["admin_score_history"], {"property_id": property_id, "limit": limit}).fetchall()
    return ScoreHistory(property_id, current, tuple(Snapshot(**row) for row in rows))


def recalc_status(conn: psycopg.Connection, property_id: int) -> RecalcStatus:
    with _snapshot(conn), conn.cursor(row_factory=dict_row) as cur:
        current = _current(cur, property_id)
        jobs = cur.execute(
            QUERIES["admin_jobs_of_key"], {"coalescing_key": coalescing_key(property_id), "limit": STATUS_JOBS}
        ).fetchall()
        requests = cur.execute(
            QUERIES["admin_requests_of_jobs"],
            {"job_ids": [j["job_id"] for j in jobs], "per_job": REQUESTS_PER_JOB},
        ).fetchall()
    by_job: dict[int, list[dict[str, Any]]] = {}
    for request in requests:
        by_job.setdefault(request["job_id"], []).append(request)
    return RecalcStatus(
        property_id=property_id,
        pending=current.pending,
        status=current.status,
        last_calculated_at=current.calculated_at,
        score=current.score,
        jobs=tuple(_key_job(job, by_job.get(job["job_id"], [])) for job in jobs),
    )


def queue_state(conn: psycopg.Connection) -> list[QueueState]:
    with conn.cursor(row_factory=dict_row) as cur:
        return [QueueState(**row) for row in cur.execute(QUERIES["admin_queue_state"]).fetchall()]


def jobs(
    conn: psycopg.Connection,
    *,
    status: str | None = None,
    key: str | None = None,
    task: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
) -> JobPage:
    _check_limit(limit)
    with conn.cursor(row_factory=dict_row) as cur:
        # One row more than asked tells whether an older page follows.
        rows = cur.execute(
            QUERIES["admin_jobs"],
            {"status": status, "coalescing_key": key, "task": task, "before_id": before_id, "limit": limit + 1},
        ).fetchall()
    page = tuple(Job(**row) for row in rows[:limit])
    return JobPage(page, page[-1].job_id if len(rows) > limit else None)


@dataclass(frozen=True, slots=True)
class AwaitingDocument:
    id: int
    property_id: int
    property_name: str
    client_id: int
    client_name: str
    requirement_code: str
    expires_at: date | None
    file_name: str
    size_bytes: int
    created_at: datetime


def documents_awaiting_verification(conn: psycopg.Connection, *, limit: int = 50) -> list[AwaitingDocument]:
    _check_limit(limit)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["admin_documents_awaiting_verification"], {"limit": limit}).fetchall()
    return [AwaitingDocument(**row) for row in rows]


def cancellable_tasks(conn: psycopg.Connection) -> frozenset[str]:
    return frozenset(row[0] for row in conn.execute(QUERIES["admin_cancellable_tasks"]))


def job(conn: psycopg.Connection, job_id: int) -> Job | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(QUERIES["admin_job"], {"job_id": job_id}).fetchone()
    return Job(**row) if row is not None else None


def job_status(conn: psycopg.Connection, job_id: int) -> str | None:
    row = conn.execute(QUERIES["admin_job_status"], {"job_id": job_id}).fetchone()
    return row[0] if row is not None else None


def token(conn: psycopg.Connection, client_id: int, token_id: int) -> dict[str, Any] | None:
    """A token of this client, revoked or not, without anything secret."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(QUERIES["admin_token"], {"client_id": client_id, "token_id": token_id}).fetchone()


def lock_client(conn: psycopg.Connection, client_id: int) -> bool:
    """Locks the client row until the transaction ends; False if there is no such client."""
    return conn.execute(QUERIES["admin_lock_client"], {"client_id": client_id}).fetchone() is not None


def lock_job(conn: psycopg.Connection, job_id: int) -> str | None:
    """Locks the job row until the transaction ends; its status, or None if there is no such job."""
    row = conn.execute(QUERIES["admin_lock_job"], {"job_id": job_id}).fetchone()
    return row[0] if row is not None else None


@contextmanager
def _snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """One snapshot for the reads inside; within a caller's own transaction, that one's."""
    if conn.info.transaction_status != TransactionStatus.IDLE:
        yield
        return
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def _current(cur: psycopg.Cursor, property_id: int) -> CurrentScore:
    row = cur.execute(QUERIES["admin_property_current"], {"property_id": property_id}).fetchone()
    if row is None:
        raise PropertyNotFound(f"property {property_id} does not exist")
    return CurrentScore(
        score=row["compliance_score"],
        breakdown=row["compliance_breakdown"],
        version=row["compliance_version"],
        calculated_at=row["compliance_last_calculated_at"],
        pending=row["compliance_score_pending"],
        status=score_status(row["compliance_score_pending"], row["latest_job_status"]),
    )


def _key_job(row: dict[str, Any], requests: list[dict[str, Any]]) -> KeyJob:
    return KeyJob(
        **row,
        requests=tuple(
            JobRequest(r["trigger_reason"], r["actor_type"], r["actor_id"], r["correlation_id"], r["created_at"])
            for r in requests
        ),
        requests_total=requests[0]["total"] if requests else 0,
    )


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be 1 to {MAX_PAGE_SIZE}", field="limit", rule=f"range_1_{MAX_PAGE_SIZE}")
