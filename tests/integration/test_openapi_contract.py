"""The API keeps the promises of its own OpenAPI document.

Schemathesis generates requests for every operation from the document the app serves and checks
each answer: never a 5xx, a status code the operation documents, that code's content type, and a
body matching that code's schema. Every request carries a real client's bearer token and the
admin key, so the checks reach past authentication into validation, the services and the
database. The client is the first one in a fresh database and has documents, so the small ids
generators favour (1, 2...) name things that exist and deep paths (updates, deletes, transitions)
run, not only 404s.

The rest of the module reads the document itself: who may call what (the security scheme of each
route), and that every error a route documents is a problem document.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from api.app import create_app
from api.problems import PROBLEM_MEDIA_TYPE
from services.file_store import FileStore
from services.uploads import IncomingFile, inspect_file, store_and_add_documents
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.api import ADMIN_HEADERS, api_settings, new_tenant
from tests.harness.pdf import make_pdf

#: Examples per operation and generation mode; with ~25 operations this keeps the module near a minute.
EXAMPLES_PER_OPERATION = 8
NO_DATABASE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.fixture
def credentials(database_url: str, tmp_path: Path) -> dict[str, str]:
    """The headers every generated request carries: a client's token and the admin key. The
    client's properties hold real stored documents (a PDF the extractor can read, a text file)."""
    tenant = new_tenant(database_url, n_properties=2)
    store = FileStore(tmp_path / "documents")
    client = Actor(ActorType.CLIENT, str(tenant.client_id))
    with psycopg.connect(database_url) as conn:
        for property_id in tenant.property_ids:
            files = [
                (IncomingFile("cp12.pdf", make_pdf(["Landlord Gas Safety Record", f"Property {property_id}",
                                                    "Next inspection due: 01/01/2030"]), "application/pdf"),
                 "gas_safety", date(2030, 1, 1)),
                (IncomingFile("eicr.txt", f"Electrical Installation Condition Report {property_id}".encode(),
                              "text/plain"), "eicr", None),
            ]
            store_and_add_documents(
                conn, store, property_id=property_id, source="client", actor=client,
                trigger=TriggerReason.CLIENT_BULK_UPLOAD, correlation_id=f"contract-{uuid.uuid4()}",
                files=[(inspect_file(incoming), code, expires) for incoming, code, expires in files],
            )
    return {**tenant.headers, **ADMIN_HEADERS}


@pytest.fixture
def api_schema(database_url: str, credentials: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """The real app on a fresh database, and the OpenAPI document it serves."""
    app = create_app(api_settings(database_url, tmp_path / "documents"))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.runtime.close()


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32 reads and renames the test node through `_nodeid`, which pytest 9.2 no
    longer has (it keeps `_id`); without the attribute every lazy-schema test fails at once."""
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@schema.parametrize()
def test_every_operation_answers_as_its_openapi_document_says(case, credentials: dict[str, str]) -> None:
    _fresh_idempotency_key(case)
    _obey_rules_openapi_cannot_state(case)
    # A generated "archive" is never a real ZIP and its schema (a string) cannot hold one, so a
    # schema-valid archive is rightly refused (415). Only for that operation is "schema-valid
    # data is accepted" not checked; every other check runs, and the ZIP rules have their own tests.
    excluded = [positive_data_acceptance] if case.path.endswith("/documents/zip") else []
    # The credentials are sent on every case, so a case made negative by dropping a required
    # auth header is positive again by the time it is sent: its acceptance proves nothing.
    if _negative_headers(case):
        excluded.append(negative_data_rejection)
    case.call_and_validate(headers=credentials, excluded_checks=excluded or None)


def _negative_headers(case: schemathesis.Case) -> bool:
    if case.meta is None:
        return False
    header = case.meta.components.get(ParameterLocation.HEADER)
    return header is not None and header.mode.is_negative


def _is_negative(case: schemathesis.Case) -> bool:
    """Whether any part of the case was generated to break the schema (a case's overall mode can
    be positive while one component, say a header, is negative)."""
    if case.meta is None:
        return False
    if case.meta.generation.mode is not GenerationMode.POSITIVE:
        return True
    return any(component.mode.is_negative for component in case.meta.components.values())


#: Content every upload accepts: UTF-8 text naming a requirement (a str: the schema's type).
ACCEPTABLE_FILE = "Energy Performance Certificate\n"


def _obey_rules_openapi_cannot_state(case: schemathesis.Case) -> None:
    """Upload rules live in the content, not the schema: a file's bytes must really be a PDF or
    UTF-8 text (sniffed, whatever it is called), and a bulk upload names one requirement code
    (and at most one expiry) per file. A schema-valid case that
    breaks them is rightly refused (415/422), which schemathesis would report as a valid request
    rejected. So a positive case gets acceptable content here; the refusals themselves are
    tested one by one in the hostile-input modules."""
    if _is_negative(case) or not isinstance(case.body, dict):
        return
    body = case.body
    if "file" in body:
        body["file"] = ACCEPTABLE_FILE
    if "files" in body:
        files = body["files"] if isinstance(body["files"], list) else [body["files"]]
        body["files"] = [ACCEPTABLE_FILE for _ in files]
        count = len(files)
        codes = body.get("requirement_codes")
        codes = codes if isinstance(codes, list) else [codes] if codes is not None else ["epc"]
        body["requirement_codes"] = (codes * count)[:count]
        expiries = body.get("expires_at")
        if isinstance(expiries, list) and expiries:
            body["expires_at"] = (expiries * count)[:count]


def _fresh_idempotency_key(case: schemathesis.Case) -> None:
    """Clients send a new Idempotency-Key with each new request (docs/api.md). Generated keys
    repeat ("0", "00"...) across different requests, which the API rightly refuses as a key
    reused for another request (422). A valid generated key becomes a fresh one; a case that
    tests an invalid key (negative mode) keeps it."""
    if not _is_negative(case) and case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = uuid.uuid4().hex


# -- the document itself -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The OpenAPI document, from an app that never serves: building it touches no database."""
    return create_app(api_settings(NO_DATABASE, Path("/nonexistent"))).openapi()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                yield path, method.upper(), operation


def _scheme_of(document: dict[str, Any], operation: dict[str, Any]) -> list[dict[str, Any]]:
    schemes = document.get("components", {}).get("securitySchemes", {})
    return [schemes[name] for requirement in operation.get("security", []) for name in requirement]


def every_route(routes: list[Any]) -> Iterator[Any]:
    """The app's routes, those of included routers too (FastAPI keeps an included router whole)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from every_route(inner.routes)
        else:
            yield route


def test_the_document_lists_every_route_the_app_serves() -> None:
    app = create_app(api_settings(NO_DATABASE, Path("/nonexistent")))
    # The web pages and the docs pages are not API operations (include_in_schema=False).
    served = {(re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method)  # {id:int} is {id} in OpenAPI
              for route in every_route(app.routes)
              if isinstance(route, APIRoute) and route.include_in_schema
              for method in route.methods - {"HEAD", "OPTIONS"}}
    assert ("/api/evaluations", "POST") in served and len(served) > 30, "the routers' routes were read"
    listed = {(path, method) for path, method, _ in _operations(app.openapi())}

    assert served - listed == set(), "routes missing from the OpenAPI document"
    assert {("/healthz", "GET"), ("/readyz", "GET")} <= listed


def test_client_routes_take_a_bearer_token_and_admin_routes_the_x_api_key_header(document) -> None:
    bearer = {"type": "http", "scheme": "bearer"}
    api_key = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    seen = {"client": 0, "admin": 0}
    for path, method, operation in _operations(document):
        schemes = [{k: v for k, v in s.items() if k in ("type", "scheme", "in", "name")}
                   for s in _scheme_of(document, operation)]
        if path.startswith("/api/admin/"):
            assert schemes == [api_key], f"{method} {path}"
            seen["admin"] += 1
        elif path.startswith("/api/jobs"):
            # A watched job is its owner's (bearer) and an admin's to look at (X-API-Key).
            assert schemes == [bearer, api_key], f"{method} {path}"
        elif path.startswith("/api/"):
            assert schemes == [bearer], f"{method} {path}"
            seen["client"] += 1
        else:
            assert schemes == [], f"{method} {path} is a probe and needs no credentials"
    assert seen["client"] > 0 and seen["admin"] > 0, seen


def test_every_error_a_route_documents_is_a_problem_document(document) -> None:
    problem_ref = "#/components/schemas/Problem"
    for path, method, operation in _operations(document):
        for code, response in operation["responses"].items():
            if not code.isdigit() or int(code) < 400:
                continue
            content = response.get("content", {})
            assert PROBLEM_MEDIA_TYPE in content, f"{method} {path} {code}: {sorted(content)}"
            assert content[PROBLEM_MEDIA_TYPE].get("schema", {}).get("$ref") == problem_ref, f"{method} {path} {code}"
        if path.startswith("/api/"):
            for code in ("401", "422"):
                assert code in operation["responses"], f"{method} {path} does not document {code}"


def test_docs_api_md_lists_exactly_the_operations_of_the_openapi_document(document) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    listed = {(method, path.split("?", 1)[0])
              for method, path in re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/api/\S+?)` \|", text, re.MULTILINE)}
    served = {(method, path) for path, method, _ in _operations(document) if path.startswith("/api/")}

    assert served - listed == set(), "operations docs/api.md does not list"
    assert listed - served == set(), "operations docs/api.md lists that the API does not have"
