"""An admin's pages, read from PostgreSQL (the source of truth, not Flower's memory): the queue by
state with its counts, a job with every attempt and its error, requeue of a dead job, cancel of
a job whose kind allows it, and the documents awaiting verification with verify and reject.

As on the client's pages, each form calls the admin API's own route function, under the form's
idempotency key, so a page does exactly what the API does and a double submit is one change.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from api.dependencies import Conn
from api.routes import admin as admin_api
from api.routes import admin_jobs as admin_jobs_api
from api.routes import jobs as jobs_api
from api.security import WatcherCaller
from api.web.callers import PageAdmin, Session
from api.web.client_pages import Csrf, FormKey, form_key
from api.web.rendering import PageRoute, answer_body, answer_problem_page, render
from api.web.session import check_csrf
from outbox import JobStatus
from outbox.history import attempts_of_job
from services import admin_views
from services.errors import NotFound

router = APIRouter(prefix="/admin", route_class=PageRoute, include_in_schema=False)

JobId = Annotated[int, Path(ge=1, le=2**63 - 1)]
DocumentId = Annotated[int, Path(ge=1, le=2**63 - 1)]
ACTIVE = {JobStatus.PENDING, JobStatus.PUBLISHED, JobStatus.RUNNING, JobStatus.RETRYING}
NOTICES = {
    "requeued": "Requeued: the job has fresh attempts and is on its way to a worker.",
    "cancelled": "Cancelled.",
    "cancel_requested": "Cancel requested: the job stops at its next unit.",
    "verified": "Document verified. The property's score is being recalculated.",
    "rejected": "Document rejected. The property's score is being recalculated.",
}


@router.get("/queue", response_class=HTMLResponse)
def queue(request: Request, _: PageAdmin, conn: Conn,
          status: Annotated[JobStatus | None, Query()] = None,
          before_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None) -> Response:
    states = admin_views.queue_state(conn)
    counts: dict[str, int] = {}
    for state in states:
        counts[state.status] = counts.get(state.status, 0) + (state.jobs or 0)
    page = admin_views.jobs(conn, status=status, limit=50, before_id=before_id)
    return render(request, "admin_queue.html", {
        "states": states, "counts": counts, "statuses": list(JobStatus), "status": status, "page": page,
    })


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: JobId, _: PageAdmin, conn: Conn) -> Response:
    with conn.transaction():
        found = admin_views.job(conn, job_id)
        if found is None:
            raise NotFound(f"job {job_id} does not exist")
        attempts = attempts_of_job(conn, job_id)
        cancellable = found.task in admin_views.cancellable_tasks(conn)
    return render(request, "admin_job.html", {
        "job": found, "attempts": attempts, "form_key": form_key,
        "can_requeue": found.status == JobStatus.DEAD,
        "can_cancel": cancellable and found.status in ACTIVE,
        "notice": NOTICES.get(request.query_params.get("notice", "")),
    })


@router.post("/jobs/{job_id}/requeue")
def requeue(request: Request, job_id: JobId, admin: PageAdmin, session: Session, conn: Conn,
            key: FormKey, csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    answer = admin_jobs_api.requeue(job_id, admin, conn, key, request)
    runs_as = answer_body(answer)["job_id"] if isinstance(answer, JSONResponse) else answer.job_id
    return RedirectResponse(f"/admin/jobs/{runs_as}?notice=requeued", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: JobId, admin: PageAdmin, session: Session, conn: Conn,
           key: FormKey, csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    outcome = Response()
    answer = jobs_api.cancel_job(job_id, WatcherCaller(admin.actor, is_admin=True), conn, key, request, outcome)
    if isinstance(answer, JSONResponse) and answer.status_code >= 400:
        return answer_problem_page(request, answer, back=f"/admin/jobs/{job_id}")
    notice = "cancel_requested" if outcome.status_code == 202 else "cancelled"
    return RedirectResponse(f"/admin/jobs/{job_id}?notice={notice}", status_code=303)


@router.get("/documents", response_class=HTMLResponse)
def documents(request: Request, _: PageAdmin, conn: Conn) -> Response:
    return render(request, "admin_documents.html", {
        "documents": admin_views.documents_awaiting_verification(conn, limit=100), "form_key": form_key,
        "notice": NOTICES.get(request.query_params.get("notice", "")),
    })


@router.post("/documents/{document_id}/verify")
def verify(request: Request, document_id: DocumentId, admin: PageAdmin, session: Session, conn: Conn,
           key: FormKey, csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    admin_api.verify(document_id, admin, conn, key, request)
    return RedirectResponse("/admin/documents?notice=verified", status_code=303)


@router.post("/documents/{document_id}/reject")
def reject(request: Request, document_id: DocumentId, admin: PageAdmin, session: Session, conn: Conn,
           key: FormKey, reason: Annotated[str, Form(min_length=1, max_length=500)], csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    admin_api.reject(document_id, admin_api.RejectIn(reason=reason), admin, conn, key, request)
    return RedirectResponse("/admin/documents?notice=rejected", status_code=303)
