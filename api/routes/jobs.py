"""Every watched job over HTTP: its status, a caller's jobs of a kind, cancel, resume, delete.

One surface for every kind (evaluations, rebuilds, analyses, exports): what differs between
kinds is their handler and their domain, not these routes. The owner sees everything; an admin
sees status and errors but not the result (a memo's or a file's contents are the owner's);
anyone else gets the 404 of an unknown id. A job whose status expired or was deleted answers
its owner a 404 that says which (`expired`, `deleted`), and everyone else the plain 404.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.dependencies import Conn, IdempotencyKey, correlation_id
from api.idempotency import AnswerInstead, answer_once, keyed
from api.problems import COMMON_RESPONSES, CONFLICT_RESPONSES, problem_response
from api.security import Watcher
from outbox import job_views, watched
from outbox.job_views import JobSnapshot
from outbox.user_status import UserStatus
from outbox.watched import CancelOutcome, ResumeRefused

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=COMMON_RESPONSES)

MAX_ID = 2**63 - 1
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="A job's id")]


class StageOut(BaseModel):
    number: int = Field(description="1-based: step `number` of `len(stages)`")
    key: str
    display: str = Field(description="What a person is shown for this step")


class ProgressOut(BaseModel):
    fraction: float | None = Field(description="0-1 within the current stage, when known")
    message: str | None
    current: int | None
    total: int | None


class JobStateOut(BaseModel):
    """What a watcher is told of a job: also the data of its stream's `snapshot` event."""

    id: int
    kind: str
    status: UserStatus = Field(description="queued | running | done | failed | cancelled")
    attempt: int = Field(description="The attempt running or last run (a retry is the next attempt)")
    max_attempts: int
    stage: StageOut | None
    stages: list[StageOut]
    progress: ProgressOut
    result: Any = Field(description="What it made (the owner only): a reference to a row that outlives the job")
    error: dict[str, Any] | None = Field(description="stage, message and can_resume, once it failed")
    cancel_requested: bool
    resumed_from: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_seconds: float | None
    seq: int = Field(description="The last event's number: the stream's Last-Event-ID and this answer's ETag")


class JobOut(JobStateOut):
    status_url: str
    stream_url: str = Field(description="Server-Sent Events of this job; carries a token for an EventSource")


class JobPageOut(BaseModel):
    items: list[JobOut]
    next_before_id: int | None


def job_state(snap: JobSnapshot, *, owner_view: bool) -> JobStateOut:
    return JobStateOut(
        id=snap.id, kind=snap.task, status=snap.user_status, attempt=snap.attempt, max_attempts=snap.max_attempts,
        stage=_stage(snap.stage) if snap.stage else None, stages=[_stage(s) for s in snap.stages],
        progress=ProgressOut(fraction=snap.fraction, message=snap.message, current=snap.current, total=snap.total),
        result=snap.result if owner_view else None, error=snap.error, cancel_requested=snap.cancel_requested,
        resumed_from=snap.resumed_from, created_at=snap.created_at, started_at=snap.started_at,
        finished_at=snap.finished_at, elapsed_seconds=snap.elapsed_seconds(datetime.now(UTC)), seq=snap.last_seq,
    )


def job_out(request: Request, snap: JobSnapshot, *, owner_view: bool) -> JobOut:
    token = request.app.state.stream_tokens.sign(snap.id, snap.owner)
    return JobOut(**dict(job_state(snap, owner_view=owner_view)), status_url=f"/api/jobs/{snap.id}",
                  stream_url=f"/api/jobs/{snap.id}/events?token={token}")


def _stage(stage: job_views.StageView) -> StageOut:
    return StageOut(number=stage.number, key=stage.key, display=stage.display)


def visible_job(conn: Any, watcher: Watcher, job_id: int) -> JobSnapshot | JSONResponse:
    """The job if this caller may see it, else the 404 it gets (expired/deleted for its owner)."""
    snap = job_views.snapshot(conn, job_id)
    if snap is not None and (watcher.is_admin or snap.owner == watcher.owner):
        return snap
    gone = job_views.tombstone(conn, job_id) if snap is None else None
    if gone is not None and gone.owner == watcher.owner:
        words = {"expired": "its status has expired", "deleted": "it was deleted"}[gone.reason]
        return problem_response(404, "Gone" if gone.reason == "deleted" else "Expired",
                                f"job {job_id} is no longer available: {words}", kind=gone.reason)
    return problem_response(404, "Not found", f"job {job_id} does not exist", kind="not-found")


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, watcher: Watcher, conn: Conn, request: Request, response: Response) -> Any:
    """The job as its watcher sees it. `ETag` is its last event's number; send it back in
    `If-None-Match` and an unchanged job answers 304."""
    found = visible_job(conn, watcher, job_id)
    if isinstance(found, JSONResponse):
        return found
    etag = f'"{found.last_seq}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "no-store"
    return job_out(request, found, owner_view=not watcher.is_admin)


@router.get("", response_model=JobPageOut)
def list_jobs(
    watcher: Watcher, conn: Conn, request: Request,
    kind: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[a-z][a-z0-9_.]*$",
                               description="The job kind (its task name)")],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> JobPageOut:
    """The caller's own jobs of one kind, newest first (admins: see /api/admin/jobs)."""
    page = job_views.jobs_of_owner(conn, watcher.owner or "", kind, limit=limit + 1, before_id=before_id)
    items = [job_out(request, s, owner_view=True) for s in page[:limit]]
    return JobPageOut(items=items, next_before_id=items[-1].id if len(page) > limit else None)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=CONFLICT_RESPONSES)
def cancel_job(job_id: JobId, watcher: Watcher, conn: Conn, key: IdempotencyKey, request: Request,
               response: Response) -> Any:
    """Stops the job: one that has not started is cancelled now (200); a running one stops at
    its next unit (202, `cancel_requested: true`). 409 if it already ended or its kind cannot be
    cancelled (an admin asking to cancel a recalculation). Cancelling twice is harmless."""
    if watcher.is_admin and job_views.snapshot(conn, job_id) is None:
        with conn.transaction():
            outcome = watched.cancel(conn, job_id)  # an unwatched job: refused, or missing
        if outcome is CancelOutcome.NOT_CANCELLABLE:
            return problem_response(409, "Conflict", f"job {job_id}'s kind cannot be cancelled",
                                    kind="not-cancellable")
    found = visible_job(conn, watcher, job_id)
    if isinstance(found, JSONResponse):
        return found
    with conn.transaction():
        outcome = watched.cancel(conn, job_id)
    if outcome is CancelOutcome.NOT_CANCELLABLE:
        return problem_response(409, "Conflict", f"a {found.task} job cannot be cancelled", kind="not-cancellable")
    if outcome is CancelOutcome.FINISHED and found.user_status != UserStatus.CANCELLED:
        return problem_response(409, "Conflict", f"job {job_id} already ended ({found.user_status})",
                                kind="invalid-transition")
    now = job_views.snapshot(conn, job_id)
    assert now is not None
    response.status_code = 202 if outcome is CancelOutcome.REQUESTED else 200
    return job_out(request, now, owner_view=not watcher.is_admin)


@router.post("/{job_id}/resume", status_code=202, response_model=JobOut, responses=CONFLICT_RESPONSES)
def resume_job(job_id: JobId, watcher: Watcher, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """A new job that carries on from where a failed or cancelled one stopped (its finished
    units are not done again). It takes the kind's lock (409 with `active_job_id` while another
    job holds it) but not its cooldown."""
    found = visible_job(conn, watcher, job_id)
    if isinstance(found, JSONResponse):
        return found

    def change() -> JobOut:
        try:
            resumed = watched.resume(conn, job_id, correlation_id=correlation_id(watcher.actor, key),
                                     trigger_reason="resume", actor_type=watcher.actor.type,
                                     actor_id=watcher.actor.id)
        except ResumeRefused as refused:
            if refused.reason == "active" and refused.active_job_id is not None:
                raise AnswerInstead(active_job_problem(refused.active_job_id)) from refused
            raise AnswerInstead(problem_response(
                409, "Conflict", f"job {job_id} is {found.user_status}; only a failed or cancelled job can be "
                "resumed", kind="invalid-transition")) from refused
        snap = job_views.snapshot(conn, resumed)
        assert snap is not None
        return job_out(request, snap, owner_view=not watcher.is_admin)

    return answer_once(conn, keyed(request, watcher.actor, key), change)


def active_job_problem(active_job_id: int) -> JSONResponse:
    """A submission or resume refused because the kind's lock is held: the job that holds it."""
    return problem_response(409, "Conflict", f"job {active_job_id} is already running for this; watch it or cancel "
                            "it", kind="active-job", extra={"active_job_id": active_job_id},
                            headers={"Location": f"/api/jobs/{active_job_id}"})


@router.delete("/{job_id}", status_code=204, response_class=Response, responses=CONFLICT_RESPONSES)
def delete_job(job_id: JobId, watcher: Watcher, conn: Conn, key: IdempotencyKey) -> Response:
    """Forgets a finished job (its owner only); afterwards it answers 404 `deleted`."""
    found = visible_job(conn, watcher, job_id)
    if isinstance(found, JSONResponse):
        return found
    if watcher.is_admin and found.owner != watcher.owner:
        return problem_response(404, "Not found", f"job {job_id} does not exist", kind="not-found")
    with conn.transaction():
        if not watched.forget(conn, job_id):
            return problem_response(409, "Conflict", f"job {job_id} has not ended; cancel it first",
                                    kind="invalid-transition")
    return Response(status_code=204, headers={"Idempotency-Key": key})

