"""Admin endpoints of the queue (X-API-Key): its state, its jobs with every attempt, requeue.

These read Postgres, the source of truth about every job; Flower shows the same jobs under the
same Celery task ids, but what a job is and why it failed is answered here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from api.dependencies import Conn, IdempotencyKey, correlation_id, replay_response
from api.idempotency import answer_once, keyed
from api.problems import COMMON_RESPONSES, CONFLICT_RESPONSES
from api.security import Admin
from outbox import JobStatus, lifecycle
from outbox.history import attempts_of_job
from services import admin_views, audit
from services.errors import InvalidTransition, NotFound
from services.vocabulary import AuditAction

router = APIRouter(prefix="/api/admin", tags=["admin"], responses=COMMON_RESPONSES)

#: Ids are bigints: a larger number is "no such id" (422 here), never a database error.
MAX_ID = 2**63 - 1
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="The job's id")]
#: No NUL characters: PostgreSQL text cannot hold them.
_NO_NUL = r"^[^\x00]*$"


class QueueStateOut(BaseModel):
    task: str
    status: JobStatus
    jobs: int | None = Field(description="Jobs in this status now; null for done and superseded (history)")
    oldest_age_s: float | None
    relay_lag_s: float | None = Field(description="pending only: how long the oldest due job has waited")
    finished_last_1m: int
    finished_last_5m: int
    per_second_5m: float


class JobOut(BaseModel):
    job_id: int
    task: str
    coalescing_key: str
    status: JobStatus
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


class JobPageOut(BaseModel):
    jobs: list[JobOut]
    next_before_id: int | None = Field(description="Pass as before_id for the next, older page; null on the last")


class AttemptOut(BaseModel):
    run: int = Field(description="0 for the job's first run, n after its n-th requeue")
    attempt: int
    outcome: str | None = Field(description="succeeded, failed, lost (its worker died or its lease ran out) "
                                "or cancelled; null while the attempt runs")
    error: str | None
    worker: str | None = Field(description="The Celery worker that ran the attempt")
    celery_task_id: str = Field(description="The Celery task id the attempt ran under (Flower's name for it)")
    started_at: datetime
    finished_at: datetime | None


class JobDetailOut(JobOut):
    attempts_history: list[AttemptOut] = Field(description="Every attempt of every run, oldest first")


class RequeuedOut(BaseModel):
    job_id: int = Field(description="The job that will run: the dead job itself, or the key's job already "
                        "waiting, which then covers the dead job's requests")
    status: JobStatus


@router.get("/queue", response_model=list[QueueStateOut])
def queue(_: Admin, conn: Conn) -> Any:
    """The outbox_queue_state view: per task and status, counts, ages, relay lag, throughput."""
    return admin_views.queue_state(conn)


@router.get("/jobs", response_model=JobPageOut)
def list_jobs(
    _: Admin,
    conn: Conn,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
    key: Annotated[str | None, Query(max_length=200, pattern=_NO_NUL,
                                     description="Only this coalescing key, e.g. property:1")] = None,
    task: Annotated[str | None, Query(max_length=200, pattern=_NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=admin_views.MAX_PAGE_SIZE)] = 50,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only jobs older than this id")] = None,
) -> Any:
    """Jobs, newest first, keyset-paged with before_id."""
    return admin_views.jobs(conn, status=status, key=key, task=task, limit=limit, before_id=before_id)


@router.get("/jobs/{job_id}", response_model=JobDetailOut)
def get_job(job_id: JobId, _: Admin, conn: Conn) -> Any:
    """One job with every attempt it made: each one's outcome, error, worker and Celery task id."""
    with conn.transaction():
        job = admin_views.job(conn, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        history = attempts_of_job(conn, job_id)
    return JobDetailOut(
        **{field: getattr(job, field) for field in JobOut.model_fields},
        attempts_history=[AttemptOut(**{f: getattr(a, f) for f in AttemptOut.model_fields}) for a in history],
    )


@router.post("/jobs/{job_id}/requeue", response_model=RequeuedOut,
             responses={**CONFLICT_RESPONSES, **replay_response(RequeuedOut)})
def requeue(job_id: JobId, admin: Admin, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """Gives a DEAD job a fresh set of attempts; 409 if the job is not dead."""

    def change() -> RequeuedOut:
        current = admin_views.lock_job(conn, job_id)
        if current is None:
            raise NotFound(f"job {job_id} does not exist")
        if current != JobStatus.DEAD:
            raise InvalidTransition(f"job {job_id} is {current}; only a dead job can be requeued")
        runs = lifecycle.requeue(conn, job_id)
        if runs is None:
            raise InvalidTransition(f"job {job_id}'s key is held by another active job; "
                                    "requeue it once that one has finished")
        audit.record(conn, AuditAction.JOB_REQUEUED, admin.actor, job_id=job_id,
                     correlation_id=correlation_id(admin.actor, key), details={"runs_as": runs})
        return RequeuedOut(job_id=runs, status=admin_views.job_status(conn, runs))

    return answer_once(conn, keyed(request, admin.actor, key), change)
