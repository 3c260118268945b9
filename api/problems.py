"""Errors as RFC 9457 problem documents, one shape for every 4xx and 5xx.

A caller must be able to fix a bad request from the body alone, so every validation error
names the field, the rule it broke and, where the set is closed, the valid values. Bad input is
never a 500: pydantic's, Starlette's and our services' errors are all mapped here.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import (
    DuplicateRequest,
    InvalidInput,
    InvalidTransition,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedContent,
)

log = logging.getLogger("recalq.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_QUOTED = re.compile(r"'([^']*)'")


class FieldProblem(BaseModel):
    field: str = Field(description="Where the bad value is: a body field (`requirement_code`, "
                       "`properties.0.name`), or `query.x`, `header.X`, `path.x`")
    rule: str = Field(description="The rule it broke, e.g. `missing`, `one_of`, `extra_forbidden`, `max_size`")
    message: str
    valid_values: list[str] | None = Field(default=None, description="The accepted values, for a closed set")


class Problem(BaseModel):
    type: str = Field(description="A URN naming the kind of problem", examples=["urn:recalq:problem:invalid-input"])
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] = Field(default_factory=list)


def _describe(status: int, title: str) -> dict[str, Any]:
    # The schema is attached to application/problem+json by `problem_openapi` below.
    return {"model": Problem, "description": title}


#: The problems any endpoint may answer with, for the OpenAPI document.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _describe(400, "Malformed request (unparseable JSON or multipart)"),
    401: _describe(401, "Missing or invalid credentials"),
    404: _describe(404, "Not found, or not yours"),
    422: _describe(422, "A value breaks a rule; `errors` names the field, the rule and the valid values"),
    429: _describe(429, "This caller has its share of requests in progress, or is over its rate; retry after "
                   "the seconds in Retry-After"),
    503: _describe(503, "The API is at capacity (Retry-After says when to retry), the database is unavailable, "
                   "or the admin API has no keys configured"),
}
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    408: _describe(408, "The request body stopped arriving (idle or total timeout); nothing was read or changed"),
    413: _describe(413, "A file, archive or the request is over its size limit"),
    415: _describe(415, "A file's content is not an accepted type (PDF or UTF-8 text)"),
}
CONFLICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: _describe(409, "The entity's state does not allow this change"),
}


class MalformedHeader(StarletteHTTPException):
    """A header the request may send is malformed: 400, naming the header and the rule."""

    def __init__(self, header: str, rule: str, detail: str) -> None:
        super().__init__(400, detail)
        self.problems = [FieldProblem(field=f"header.{header}", rule=rule, message=detail)]


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    kind: str,
    errors: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """`extra`: members of the problem beyond the standard ones (RFC 9457 extensions), such as
    the `active_job_id` a refused submission names."""
    body = Problem(type=f"urn:recalq:problem:{kind}", title=title, status=status, detail=detail, errors=errors or [])
    return JSONResponse({**body.model_dump(mode="json"), **(extra or {})}, status_code=status,
                        media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def _validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = []
    malformed = False
    for err in exc.errors():
        kind = err.get("type", "invalid")
        if kind == "json_invalid":
            malformed = True
        ctx = err.get("ctx") or {}
        expected = ctx.get("expected")
        valid = _QUOTED.findall(expected) if isinstance(expected, str) else None
        # A JSON syntax error's loc ends with a character offset, not a field.
        field = "body" if kind == "json_invalid" else _field_of(tuple(err.get("loc", ())))
        errors.append(FieldProblem(field=field, rule=kind,
                                   message=str(err.get("msg", "invalid value")), valid_values=valid or None))
    if malformed:
        return problem_response(400, "Malformed JSON", "the request body is not valid JSON", kind="malformed-json",
                                errors=errors)
    fields = ", ".join(sorted({e.field for e in errors}))
    return problem_response(422, "Invalid input", f"invalid value for: {fields}", kind="invalid-input", errors=errors)


def service_problem(exc: ServiceError) -> JSONResponse:
    """The problem document of a service error (the web pages show the same words)."""
    if isinstance(exc, NotFound):
        return problem_response(404, "Not found", str(exc), kind="not-found")
    if isinstance(exc, InvalidInput):
        field_errors = []
        if exc.field is not None:
            field_errors.append(FieldProblem(field=exc.field, rule=exc.rule or "invalid", message=str(exc),
                                             valid_values=list(exc.valid_values) if exc.valid_values else None))
        if isinstance(exc, PayloadTooLarge):
            return problem_response(413, "Payload too large", str(exc), kind="payload-too-large", errors=field_errors)
        if isinstance(exc, UnsupportedContent):
            return problem_response(415, "Unsupported content", str(exc), kind="unsupported-content",
                                    errors=field_errors)
        return problem_response(422, "Invalid input", str(exc), kind="invalid-input", errors=field_errors)
    if isinstance(exc, InvalidTransition):
        return problem_response(409, "Conflict", str(exc), kind="invalid-transition")
    if isinstance(exc, DuplicateRequest):
        # Routes answer replays themselves; one that escapes still must not look like a failure
        # the caller should retry.
        return problem_response(409, "Already accepted", str(exc), kind="duplicate-request")
    log.exception("unmapped service error", exc_info=exc)
    return problem_response(500, "Internal error", "the request failed; it has been logged", kind="internal")


def problem_openapi(app: FastAPI) -> None:
    """Makes the OpenAPI document say what the app does: every 4xx/5xx answer is a Problem in
    application/problem+json, including the 422 FastAPI documents by itself as
    `HTTPValidationError`, which this app never sends."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        problem_ref = {"$ref": "#/components/schemas/Problem"}
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                for code, response in operation.get("responses", {}).items():
                    if code[:1] in {"4", "5"}:
                        response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem_ref}}
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
        schemas.setdefault("FieldProblem", FieldProblem.model_json_schema())
        schemas.get("Problem", {}).pop("$defs", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _route_table(routes: list[Any]) -> list[tuple[re.Pattern[str], set[str]]]:
    """(path regex, methods) of every route, including those of included routers (FastAPI
    wraps them; `original_router` is where their routes live)."""
    table: list[tuple[re.Pattern[str], set[str]]] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            table.extend(_route_table(inner.routes))
        elif getattr(route, "methods", None) and getattr(route, "path_regex", None) is not None:
            table.append((route.path_regex, set(route.methods)))
    return table


def _allowed_methods(request: Request) -> str:
    """All methods any route serves at this path. Starlette's own 405 names only those of the
    first route that matched, and one path here often has several routes. Each route's own regex
    decides (a `{document_id:int}` does not match `bulk`)."""
    table = getattr(request.app.state, "route_table", None)
    if table is None:
        table = request.app.state.route_table = _route_table(request.app.routes)
    methods: set[str] = set()
    for pattern, route_methods in table:
        if pattern.match(request.url.path):
            methods |= route_methods
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    """Registers the handlers that turn every error into a problem document."""
    problem_openapi(app)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_problem(exc)

    @app.exception_handler(ServiceError)
    async def _on_service(_: Request, exc: ServiceError) -> JSONResponse:
        return service_problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed",
                  413: "Payload too large", 429: "Too many requests", 503: "Service unavailable"}
        title = titles.get(exc.status_code, "Error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return problem_response(exc.status_code, title, str(exc.detail), kind=title.lower().replace(" ", "-"),
                                headers=headers or None, errors=getattr(exc, "problems", None))

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return database_unavailable(request, exc)


def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A 503 that says what is known. No connection was ever had (a pool timeout): nothing was
    done. Lost mid-change: the change may have committed, so the answer carries the change's
    key, under which a retry is applied at most once (and is told what the first one did)."""
    headers = {"Retry-After": "5"}
    key = getattr(request.state, "change_key", None)
    if isinstance(exc, PoolTimeout) or key is None:
        detail = "the database is unavailable; nothing was changed; retry shortly"
    else:
        headers["Idempotency-Key"] = key
        detail = ("the database became unavailable while this change was being made, so whether it was "
                  f"applied is unknown; retry with the header Idempotency-Key: {key} (also sent in this "
                  "answer's headers): the change is applied at most once, and a retry of one that was "
                  "applied answers with its first result")
    return problem_response(503, "Service unavailable", detail, kind="database-unavailable", headers=headers)
