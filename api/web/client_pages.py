"""A client's pages: the portfolio and a property with its documents.

Each form posts to a page route that calls the client API's own route function with the
session's caller, so a page changes exactly what the API would (ownership checks, the outbox
row, the audit trail) and a double-submitted form is one change: every form carries a fresh
idempotency key, and a repeat under it replays the first answer. After a change the browser is
sent back to the page (POST, redirect, GET), which then shows "Updating…" until the score lands.
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.dependencies import Conn, Limits, Store
from api.routes import client as client_api
from api.web.callers import PageClient, Session
from api.web.rendering import PageRoute, render, service_problem_parts
from api.web.session import CSRF_FIELD, check_csrf
from services import property_views
from services.errors import ServiceError
from services.scoring import REQUIREMENTS

router = APIRouter(route_class=PageRoute, include_in_schema=False)

_MAX_ID = 2**63 - 1
PropertyId = Annotated[int, Path(ge=1, le=_MAX_ID)]
DocumentId = Annotated[int, Path(ge=1, le=_MAX_ID)]
Csrf = Annotated[str, Form(alias=CSRF_FIELD, max_length=200)]
FormKey = Annotated[str, Form(pattern=r"^[A-Za-z0-9_-]{8,64}$")]

#: Fixed notices a redirect may name (never text from the request).
NOTICES = {
    "uploaded": "Document uploaded. The score is being recalculated.",
    "deleted": "Document deleted. The score is being recalculated.",
    "applied": "Suggestion applied. The score is being recalculated.",
}


def form_key() -> str:
    return uuid.uuid4().hex


@router.get("/portfolio", response_class=HTMLResponse)
def portfolio(request: Request, caller: PageClient, conn: Conn) -> Response:
    page = property_views.properties_of_client(conn, caller.client_id, limit=property_views.MAX_PAGE_SIZE)
    updating = any(p.status == property_views.UPDATING for p in page.items)
    return render(request, "portfolio.html", {
        "properties": page.items, "more": page.next_after_id is not None,
        "live_url": "/portfolio/events" if updating else None,
    })


@router.get("/portfolio/rows/{property_id}", response_class=HTMLResponse)
def portfolio_row(request: Request, property_id: PropertyId, caller: PageClient, conn: Conn) -> Response:
    """One row of the portfolio, for the live update to swap in."""
    prop = property_views.owned_property(conn, caller.client_id, property_id)
    return render(request, "_property_row.html", {"p": prop})


@router.get("/properties/{property_id}/score", response_class=HTMLResponse)
def property_score(request: Request, property_id: PropertyId, caller: PageClient, conn: Conn) -> Response:
    """The property page's score and breakdown, for the live update to swap in."""
    prop = property_views.owned_property(conn, caller.client_id, property_id)
    return render(request, "_property_score.html", {"p": prop})


def _property_page(request: Request, caller: Any, conn: Any, property_id: int, *, status: int = 200,
                   problem: dict[str, Any] | None = None, suggestion: Any = None,
                   suggested_for: int | None = None) -> Response:
    prop = property_views.owned_property(conn, caller.client_id, property_id)
    documents = property_views.live_documents(conn, property_id)
    notice = NOTICES.get(request.query_params.get("notice", ""))
    return render(request, "property.html", {
        "p": prop, "documents": documents, "requirements": REQUIREMENTS, "notice": notice, "problem": problem,
        "suggestion": suggestion, "suggested_for": suggested_for, "form_key": form_key,
        "live_url": f"/properties/{prop.id}/events" if prop.status == property_views.UPDATING else None,
        "today": date.today(),
    }, status=status)


@router.get("/properties/{property_id}", response_class=HTMLResponse)
def property_page(request: Request, property_id: PropertyId, caller: PageClient, conn: Conn) -> Response:
    return _property_page(request, caller, conn, property_id)


@router.post("/properties/{property_id}/documents", response_class=HTMLResponse)
def upload(
    request: Request, property_id: PropertyId, caller: PageClient, session: Session, conn: Conn, store: Store,
    limits: Limits, key: FormKey,
    file: Annotated[UploadFile, File()],
    requirement_code: Annotated[client_api.RequirementCode, Form()],
    expires_at: Annotated[client_api.OptionalDate, Form()] = None,
    csrf: Csrf = "",
) -> Response:
    check_csrf(session, csrf)
    try:
        client_api.upload_client_document(property_id, file, requirement_code, caller, conn, store, limits, key,
                                          request, expires_at)
    except ServiceError as exc:
        # Shown on the property page beside the form, with the API's own words.
        status, body = service_problem_parts(exc)
        return _property_page(request, caller, conn, property_id, status=status, problem=body)
    return RedirectResponse(f"/properties/{property_id}?notice=uploaded", status_code=303)


@router.post("/properties/{property_id}/documents/{document_id}/delete")
def delete(request: Request, property_id: PropertyId, document_id: DocumentId, caller: PageClient,
           session: Session, conn: Conn, key: FormKey, csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    client_api.delete_client_document(property_id, document_id, caller, conn, key, request)
    return RedirectResponse(f"/properties/{property_id}?notice=deleted", status_code=303)


@router.get("/properties/{property_id}/documents/{document_id}/suggestion", response_class=HTMLResponse)
def suggestion(request: Request, property_id: PropertyId, document_id: DocumentId, caller: PageClient,
               store: Store) -> Response:
    # No pooled connection while the extractor reads the file (the API route takes its own,
    # briefly): only for drawing the page afterwards.
    found = client_api.suggest_for_client_document(property_id, document_id, caller, store, request)
    with request.app.state.runtime.connection() as conn:
        return _property_page(request, caller, conn, property_id, suggestion=found, suggested_for=document_id)


@router.post("/properties/{property_id}/documents/{document_id}/apply")
def apply(request: Request, property_id: PropertyId, document_id: DocumentId, caller: PageClient,
          session: Session, conn: Conn, store: Store, key: FormKey, csrf: Csrf = "") -> Response:
    check_csrf(session, csrf)
    client_api.apply_client_suggestion(property_id, document_id, caller, conn, store, key, request)
    return RedirectResponse(f"/properties/{property_id}?notice=applied", status_code=303)
