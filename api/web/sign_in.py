"""Signing in and out of the web pages.

A client signs in with its API token, an admin with an admin key, in one field (a client token
starts with `rqc_`). The secret travels only in the form's body, never in a URL, and is not
kept: the session remembers which token or key it was (its id or fingerprint), so that
revoking the one ends the other. `next` may only point back into this site.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api.security import AdminKeys
from api.web.rendering import PageRoute, local_path, render
from api.web.session import CSRF_FIELD, WebSession, check_csrf, read_session, write_session
from services import client_tokens
from services.client_tokens import TOKEN_PREFIX

router = APIRouter(route_class=PageRoute, include_in_schema=False)

Next = Annotated[str, Form(max_length=500)]


def home_of(session: WebSession | None) -> str:
    if session is not None and session.is_admin:
        return "/admin/queue"
    if session is not None and session.is_client:
        return "/portfolio"
    return "/sign-in"


@router.get("/")
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(home_of(read_session(request)), status_code=303)


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_form(request: Request, next: Annotated[str | None, Query(max_length=500)] = None,
                 signed_out: bool = False) -> Response:
    return render(request, "sign_in.html", {"next": local_path(next) or "", "signed_out": signed_out})


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(request: Request, secret: Annotated[str, Form(max_length=500)],
            csrf: Annotated[str, Form(alias=CSRF_FIELD, max_length=200)] = "", next: Next = "") -> Response:
    session = read_session(request)
    check_csrf(session, csrf)
    assert session is not None
    secret = secret.strip()
    signed_in: WebSession | None = None
    if secret.startswith(TOKEN_PREFIX):
        with request.app.state.runtime.connection() as conn:
            found = client_tokens.authenticate_token(conn, secret)
        if found is not None:
            token_id, client_id = found
            signed_in = session.signed_in_as_client(client_id, token_id)
    else:
        keys: AdminKeys = request.app.state.admin_keys
        fingerprint = keys.match(secret) if secret and keys.configured else None
        if fingerprint is not None:
            signed_in = session.signed_in_as_admin(fingerprint)
    if signed_in is None:
        return render(request, "sign_in.html", {
            "next": local_path(next) or "",
            "error": "That token or key is not valid: it may be mistyped or revoked.",
        }, status=401, session=session)
    response = RedirectResponse(local_path(next) or home_of(signed_in), status_code=303)
    write_session(request, response, signed_in)
    return response


@router.post("/sign-out")
def sign_out(request: Request, csrf: Annotated[str, Form(alias=CSRF_FIELD, max_length=200)] = "") -> Response:
    check_csrf(read_session(request), csrf)
    response = RedirectResponse("/sign-in?signed_out=true", status_code=303)
    write_session(request, response, WebSession.anonymous())
    return response
