"""Rendering the pages, and what a page answers when something goes wrong.

Pages are server-rendered Jinja2 templates. A page's route uses `PageRoute`, so an error in it
becomes a page a person can read, not the API's JSON: a missing or ended session redirects to
sign-in (and back afterwards), a form without its CSRF token is refused with 403, and a service
error shows the same title and detail the API's problem document would carry, with its status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from psycopg_pool import PoolTimeout
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.problems import service_problem
from api.web.session import CSRF_FIELD, CsrfRefused, WebSession, read_session, write_session
from services.errors import ServiceError
from services.scoring import REQUIREMENT_NAMES

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


class SignInRequired(Exception):
    """No session, or one that ended (token revoked, key removed, expired): sign in first."""


class NotForYou(Exception):
    """Signed in, but as the other kind of user (a client on an admin page, or the reverse)."""


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["when"] = when
    templates.env.filters["label"] = label
    templates.env.filters["requirement"] = lambda code: REQUIREMENT_NAMES.get(str(code), label(code))
    return templates


def when(value: datetime | date | None) -> Markup:
    """A time in the viewer's own zone: the page's script rewrites the element's text from its
    machine-readable datetime; without scripts the UTC time stays readable."""
    if value is None:
        return Markup("—")
    if isinstance(value, datetime):
        iso = value.isoformat()
        return Markup('<time datetime="{}" data-local>{}</time>').format(iso, value.strftime("%Y-%m-%d %H:%M UTC"))
    return Markup('<time datetime="{}">{}</time>').format(value.isoformat(), value.isoformat())


def label(value: object) -> str:
    """`pending_verification` → `Pending verification`."""
    text = str(value).replace("_", " ")
    return text[:1].upper() + text[1:]


def render(request: Request, template: str, context: dict[str, Any] | None = None, *, status: int = 200,
           session: WebSession | None = None) -> HTMLResponse:
    """A page, with the session's CSRF token for its forms. A visitor with no session yet gets
    an anonymous one (it carries the sign-in form's CSRF token)."""
    session = session or read_session(request)
    fresh = session is None
    if session is None:
        session = WebSession.anonymous()
    templates: Jinja2Templates = request.app.state.templates
    response = templates.TemplateResponse(request, template, {
        "session": session, "csrf_field": CSRF_FIELD, "csrf_token": session.csrf, **(context or {}),
    }, status_code=status, headers={"Cache-Control": "no-store"})
    if fresh:
        write_session(request, response, session)
    return response


def problem_page(request: Request, status: int, title: str, detail: str, *,
                 errors: list[dict[str, Any]] | None = None, back: str | None = None) -> HTMLResponse:
    return render(request, "problem.html", {"status": status, "title": title, "detail": detail,
                                            "errors": errors or [], "back": back}, status=status)


def answer_body(answer: JSONResponse) -> dict[str, Any]:
    """What an API route function answered with a JSONResponse (a replay, or a problem)."""
    return json.loads(bytes(answer.body))


def service_problem_parts(exc: ServiceError) -> tuple[int, dict[str, Any]]:
    """The API's problem document for a service error, as (status, body)."""
    answer = service_problem(exc)
    return answer.status_code, answer_body(answer)


def answer_problem_page(request: Request, answer: JSONResponse, *, back: str | None = None) -> HTMLResponse:
    """An API route's problem answer, as the page a person reads."""
    body = answer_body(answer)
    return problem_page(request, answer.status_code, body.get("title", "Error"), body.get("detail", ""),
                        errors=body.get("errors"), back=back)


def local_path(target: str | None) -> str | None:
    """Only a path of this site: no scheme, no host, no `//host`, no backslash tricks."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    return target


def back_link(request: Request) -> str | None:
    """Where "Go back" leads: the referring page, if it is one of this site's."""
    referer = request.headers.get("referer")
    if not referer:
        return None
    parts = urlsplit(referer)
    if parts.netloc and parts.netloc != request.url.netloc:
        return None
    return local_path(parts.path + (f"?{parts.query}" if parts.query else ""))


def sign_in_redirect(request: Request) -> Response:
    """To sign in, and back afterwards: to this page, or for a form's POST to the page it was on
    (a POST-only path cannot be gone back to). A live fragment's request (htmx) is told to send
    the whole page there, instead of swapping the sign-in form into a table row."""
    if request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    else:
        target = back_link(request) or "/"
    url = f"/sign-in?next={quote(target, safe='')}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


class PageRoute(APIRoute):
    """A route whose errors are pages (see the module's docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handle(request)
            except SignInRequired:
                return sign_in_redirect(request)
            except NotForYou:
                return problem_page(request, 403, "Not for this account",
                                    "This page is for the other kind of account: sign out and sign in with the "
                                    "right one.", back="/")
            except CsrfRefused as exc:
                return problem_page(request, 403, "Form refused", str(exc), back=back_link(request))
            except ServiceError as exc:
                status, body = service_problem_parts(exc)
                return problem_page(request, status, body["title"], body["detail"], errors=body.get("errors"),
                                    back=back_link(request))
            except (RequestValidationError, ValidationError) as exc:
                errors = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query")),
                           "message": e.get("msg", "")} for e in exc.errors()]
                fields = sorted({e["field"] for e in errors if e["field"]})
                return problem_page(request, 422, "Invalid input",
                                    f"check these fields and send the form again: {', '.join(fields) or 'the form'}",
                                    errors=errors, back=back_link(request))
            except StarletteHTTPException as exc:
                return problem_page(request, exc.status_code, "Error", str(exc.detail), back="/")
            except (PoolTimeout, psycopg.OperationalError) as exc:
                log.warning("database unavailable for a page: %s", exc)
                return problem_page(request, 503, "Try again shortly",
                                    "The database is unavailable right now. If you had sent a form, whether it was "
                                    "applied is unknown: look at the page again before you send it again (sending "
                                    "the same form twice makes one change).", back=back_link(request))

        return page
