"""A client's evaluation pages: start one, watch its stages live, read what it found.

`/evaluations` starts an evaluation of one of the client's properties or of an address, through
the API's own `submit_evaluation` (so the same lock, idempotency and audit): the browser is sent
to the job's page, `/evaluations/jobs/{id}`, or to the running job's page when one is already
active for that property or address. The job's id is in the URL, so a reload resumes watching the
same job. The page is drawn from the job's state now (every stage done, current or waiting);
while it is not finished its script follows the job's own event stream (`/api/jobs/{id}/events`,
authenticated by the session's cookie) and marks the stages as they run, then swaps in the
server-drawn outcome (`/evaluations/jobs/{id}/part`) on the final event. A failed or cancelled
one offers Resume (a new job that carries on where it stopped). A finished evaluation's snapshot
outlives its job: `/evaluations/{id}`.

Another client's job or evaluation answers "Not found", exactly as an unknown id does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError

from api.dependencies import Conn
from api.routes import evaluations as evaluations_api
from api.routes import jobs as jobs_api
from api.routes.evaluations import EvaluationIn
from api.security import ClientCaller, WatcherCaller
from api.web.callers import PageClient, Session
from api.web.client_pages import Csrf, FormKey, form_key
from api.web.rendering import PageRoute, answer_body, answer_problem_page, render, service_problem_parts
from api.web.session import check_csrf
from outbox import job_views
from outbox.job_views import JobSnapshot
from outbox.user_status import LIVE, UserStatus
from services import evaluations, property_views
from services.errors import NotFound, ServiceError

router = APIRouter(route_class=PageRoute, include_in_schema=False)

_MAX_ID = 2**63 - 1
JobId = Annotated[int, Path(ge=1, le=_MAX_ID)]
EvaluationId = Annotated[int, Path(ge=1, le=_MAX_ID)]
RECENT = 20
#: Each stage's display text, by key (a snapshot's answers are keyed by stage).
STAGE_NAMES = {s.key: s.display for s in evaluations.STAGES}

#: Fixed notices a redirect may name (never text from the request).
NOTICES = {
    "started": "Evaluation started.",
    "running": "An evaluation of this is already running: you are watching it.",
    "resumed": "Resumed: it carries on from where it stopped; the stages already answered are not asked again.",
    "cancel_requested": "Cancel requested: it stops after the stage it is on.",
    "cancelled": "Cancelled.",
}

#: What the page says of each plain status.
STATUS_WORDS = {
    UserStatus.QUEUED: "Queued: waiting for a worker",
    UserStatus.RUNNING: "Running",
    UserStatus.DONE: "Done",
    UserStatus.FAILED: "Failed",
    UserStatus.CANCELLED: "Cancelled",
}
#: A running job asked to stop (it stops after the stage it is on); evaluation.js says the same.
CANCELLING = "Cancelling"


@dataclass(frozen=True, slots=True)
class StageRow:
    number: int
    key: str
    display: str
    state: str  # done | current | failed | stopped | waiting

    @property
    def state_text(self) -> str:
        return {"done": "Done", "current": "In progress", "failed": "Failed", "stopped": "Stopped",
                "waiting": "Waiting"}[self.state]


def _watcher(caller: ClientCaller) -> WatcherCaller:
    return WatcherCaller(caller.actor, is_admin=False)


def _own_job(request: Request, conn: Any, caller: ClientCaller, job_id: int) -> JobSnapshot | Response:
    """The caller's evaluation job, or the page the API's answer for it becomes (unknown,
    another's, expired or deleted)."""
    found = jobs_api.visible_job(conn, _watcher(caller), job_id)
    if isinstance(found, JSONResponse):
        return answer_problem_page(request, found, back="/evaluations")
    if found.task != evaluations.EVALUATE_TASK:
        raise NotFound(f"evaluation job {job_id} does not exist")
    return found


def _to_job_page(answer: Any, notice: str) -> RedirectResponse | None:
    """Where a submission's or a resume's answer sends the browser: the job it made (or, for a
    replay of the form's key, made before), or the job already running under the lock; None for
    a problem, which the caller shows."""
    if not isinstance(answer, JSONResponse):
        return RedirectResponse(f"/evaluations/jobs/{answer.id}?notice={notice}", status_code=303)
    found = answer_body(answer)
    if answer.status_code < 300:
        return RedirectResponse(f"/evaluations/jobs/{found['id']}?notice={notice}", status_code=303)
    if found.get("active_job_id"):
        return RedirectResponse(f"/evaluations/jobs/{int(found['active_job_id'])}?notice=running", status_code=303)
    return None


def stage_rows(snap: JobSnapshot) -> list[StageRow]:
    """Every stage, marked from the job's state now."""
    status = snap.user_status
    at = snap.stage.number if snap.stage is not None else None
    rows = []
    for stage in snap.stages:
        if status == UserStatus.DONE:
            state = "done"
        elif at is None or stage.number > at:
            state = "waiting"
        elif stage.number < at:
            state = "done"
        elif status == UserStatus.FAILED:
            state = "failed"
        elif status == UserStatus.CANCELLED:
            state = "stopped"
        else:
            state = "current"
        rows.append(StageRow(stage.number, stage.key, stage.display, state))
    return rows


def _job_context(request: Request, conn: Any, caller: ClientCaller, snap: JobSnapshot) -> dict[str, Any]:
    rows = stage_rows(snap)
    status = snap.user_status
    snapshot = None
    if status == UserStatus.DONE and isinstance(snap.result, dict) and snap.result.get("evaluation_id"):
        try:
            snapshot = evaluations.snapshot_of_client(conn, caller.client_id, int(snap.result["evaluation_id"]))
        except NotFound:
            snapshot = None
    failed_stage = None
    if snap.error and snap.error.get("stage"):
        failed_stage = next((r for r in rows if r.key == snap.error["stage"]), None)
    live = status in LIVE
    return {
        "job": snap, "stages": rows, "status": status,
        "status_words": CANCELLING if live and snap.cancel_requested else STATUS_WORDS[status],
        "done_count": sum(1 for r in rows if r.state == "done"), "current": next(
            (r for r in rows if r.state in ("current", "failed", "stopped")), None),
        "snapshot": snapshot, "failed_stage": failed_stage, "live": live,
        "stream_url": f"/api/jobs/{snap.id}/events" if live else None,
        "can_resume": status in (UserStatus.FAILED, UserStatus.CANCELLED),
        "can_cancel": live and not snap.cancel_requested,
        "form_key": form_key, "stage_names": STAGE_NAMES,
    }


def _start_page(request: Request, caller: ClientCaller, conn: Any, *, status: int = 200,
                problem: dict[str, Any] | None = None, address: str = "") -> Response:
    properties = property_views.properties_of_client(conn, caller.client_id,
                                                     limit=property_views.MAX_PAGE_SIZE).items
    recent = evaluations.snapshots_of_client(conn, caller.client_id, limit=RECENT)
    return render(request, "evaluations.html", {
        "properties": properties, "recent": recent, "problem": problem, "address": address,
        "form_key": form_key, "notice": NOTICES.get(request.query_params.get("notice", "")),
    }, status=status)


@router.get("/evaluations", response_class=HTMLResponse)
def evaluations_page(request: Request, caller: PageClient, conn: Conn) -> Response:
    return _start_page(request, caller, conn)


@router.post("/evaluations", response_class=HTMLResponse)
def start(
    request: Request, caller: PageClient, session: Session, conn: Conn, key: FormKey,
    property_id: Annotated[int | None, Form(ge=1, le=_MAX_ID)] = None,
    address: Annotated[str | None, Form(max_length=1000)] = None,
    csrf: Csrf = "",
) -> Response:
    check_csrf(session, csrf)
    try:
        body = EvaluationIn(property_id=property_id, address=address if property_id is None else None)
    except ValidationError as exc:
        detail = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in exc.errors())
        return _start_page(request, caller, conn, status=422, address=address or "",
                           problem={"title": "Invalid input", "detail": detail, "status": 422})
    try:
        answer = evaluations_api.submit_evaluation(body, caller, conn, key, request)
    except ServiceError as exc:
        status, problem = service_problem_parts(exc)
        return _start_page(request, caller, conn, status=status, problem=problem, address=address or "")
    to_job = _to_job_page(answer, "started")
    if to_job is not None:
        return to_job
    return _start_page(request, caller, conn, status=answer.status_code, problem=answer_body(answer),
                       address=address or "")


@router.get("/evaluations/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: JobId, caller: PageClient, conn: Conn) -> Response:
    snap = _own_job(request, conn, caller, job_id)
    if isinstance(snap, Response):
        return snap
    return render(request, "evaluation.html", {
        **_job_context(request, conn, caller, snap), "fragment": False,
        "notice": NOTICES.get(request.query_params.get("notice", "")),
    })


@router.get("/evaluations/jobs/{job_id}/part", response_class=HTMLResponse)
def job_part(request: Request, job_id: JobId, caller: PageClient, conn: Conn) -> Response:
    """The job's panel (stages, progress, status, outcome), for the page's script to swap in at the end."""
    snap = _own_job(request, conn, caller, job_id)
    if isinstance(snap, Response):
        return snap
    return render(request, "evaluation.html", {**_job_context(request, conn, caller, snap), "fragment": True})


@router.post("/evaluations/jobs/{job_id}/resume")
def resume(request: Request, job_id: JobId, caller: PageClient, session: Session, conn: Conn, key: FormKey,
           csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    snap = _own_job(request, conn, caller, job_id)
    if isinstance(snap, Response):
        return snap
    answer = jobs_api.resume_job(job_id, _watcher(caller), conn, key, request)
    return _to_job_page(answer, "resumed") or answer_problem_page(request, answer, back=f"/evaluations/jobs/{job_id}")


@router.post("/evaluations/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: JobId, caller: PageClient, session: Session, conn: Conn, key: FormKey,
           csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    snap = _own_job(request, conn, caller, job_id)
    if isinstance(snap, Response):
        return snap
    outcome = Response()
    answer = jobs_api.cancel_job(job_id, _watcher(caller), conn, key, request, outcome)
    if isinstance(answer, JSONResponse) and answer.status_code >= 400:
        return answer_problem_page(request, answer, back=f"/evaluations/jobs/{job_id}")
    notice = "cancel_requested" if outcome.status_code == 202 else "cancelled"
    return RedirectResponse(f"/evaluations/jobs/{job_id}?notice={notice}", status_code=303)


@router.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
def evaluation_page(request: Request, evaluation_id: EvaluationId, caller: PageClient, conn: Conn) -> Response:
    """What a finished evaluation found; it stays after its job's status has expired."""
    found = evaluations.snapshot_of_client(conn, caller.client_id, evaluation_id)
    snap = job_views.snapshot(conn, found.job_id)
    if snap is not None and snap.owner == _watcher(caller).owner:
        return RedirectResponse(f"/evaluations/jobs/{snap.id}", status_code=303)
    return render(request, "evaluation.html", {
        "job": None, "snapshot": found, "fragment": False, "stage_names": STAGE_NAMES,
    })
