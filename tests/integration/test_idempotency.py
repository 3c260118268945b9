"""Every change route, retried under its key: the first answer comes back whatever happened since,
the same key with any other request is refused, and a request sent without a key gets one.

The routes are listed once (ROUTES); each test runs over all of them, so a new change route
that is not listed fails test_every_change_route_is_listed_here.
"""

from __future__ import annotations

import io
import threading
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.harness.api import ADMIN_HEADERS, TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.jobs import dead_job

EICR = b"Electrical Installation Condition Report\nNext inspection due: 1 March 2031\n"


@dataclass
class World:
    """What the routes act on: a client with a property and a document, and a dead job."""

    tenant: TenantClient
    property_id: int
    other_property_id: int
    document_id: int
    dead_job_id: int
    spare_token_id: int  # a token the revoke route may revoke (the first keeps the tenant in)

    @property
    def client(self) -> dict[str, str]:
        return self.tenant.headers


Send = Callable[[TestClient, World, dict[str, str], bool], httpx.Response]


@dataclass(frozen=True)
class Route:
    name: str
    send: Send  # (api, world, headers, other): `other` sends the same route with another value
    #: A later change by someone else to what this one changed, made before the retry.
    later: Callable[[TestClient, World], Any]
    has_values: bool = True


def _zip(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("eicr/report.txt", content)
    return buffer.getvalue()


def _delete_document(api: TestClient, w: World) -> None:
    assert api.delete(f"/api/admin/documents/{w.document_id}", headers=ADMIN_HEADERS).status_code == 200


def _upload_to_property(api: TestClient, w: World) -> None:
    response = api.post(f"/api/properties/{w.property_id}/documents", headers=w.client,
                        files={"file": ("later.txt", b"a later upload\n")}, data={"requirement_code": "epc"})
    assert response.status_code == 201, response.text


ROUTES = [
    Route("create property", lambda api, w, h, other: api.post(
        "/api/properties", headers=w.client | h, json={"name": "Flat 9", "has_gas_supply": not other}),
        _upload_to_property),
    Route("client upload", lambda api, w, h, other: api.post(
        f"/api/properties/{w.property_id}/documents", headers=w.client | h,
        files={"file": ("eicr.txt", EICR)}, data={"requirement_code": "epc" if other else "eicr"}),
        _upload_to_property),
    Route("client bulk upload", lambda api, w, h, other: api.post(
        f"/api/properties/{w.property_id}/documents/bulk", headers=w.client | h,
        files=[("files", ("a.txt", EICR)), ("files", ("b.txt", b"b\n"))],
        data={"requirement_codes": ["eicr", "epc"], "expires_at": ["2031-01-01" if other else "", ""]}),
        _upload_to_property),
    Route("client zip upload", lambda api, w, h, other: api.post(
        f"/api/properties/{w.property_id}/documents/zip", headers=w.client | h,
        files={"archive": ("a.zip", _zip(EICR + (b"other\n" if other else b"")))}),
        _upload_to_property),
    Route("client delete", lambda api, w, h, other: api.delete(
        f"/api/properties/{w.other_property_id if other else w.property_id}/documents/{w.document_id}",
        headers=w.client | h), _upload_to_property),
    Route("client ai apply", lambda api, w, h, other: api.post(
        f"/api/properties/{w.other_property_id if other else w.property_id}/documents/{w.document_id}/ai-apply",
        headers=w.client | h), _delete_document),
    Route("provision", lambda api, w, h, other: api.post(
        "/api/admin/clients", headers=ADMIN_HEADERS | h,
        json={"name": "Replay Ltd", "properties": [{"name": "B" if other else "A"}]}), _upload_to_property),
    Route("issue token", lambda api, w, h, other: api.post(
        f"/api/admin/clients/{w.tenant.client_id}/tokens", headers=ADMIN_HEADERS | h,
        json={"label": "other" if other else "ci"}), _upload_to_property),
    Route("admin upload", lambda api, w, h, other: api.post(
        f"/api/admin/properties/{w.property_id}/documents", headers=ADMIN_HEADERS | h,
        files={"file": ("epc.txt", b"Energy performance certificate\n")},
        data={"requirement_code": "epc", "status": "verified" if other else "pending_verification"}),
        _upload_to_property),
    Route("admin verify", lambda api, w, h, other: api.post(
        f"/api/admin/documents/{w.document_id}/verify", headers=ADMIN_HEADERS | h), _delete_document,
        has_values=False),
    Route("admin reject", lambda api, w, h, other: api.post(
        f"/api/admin/documents/{w.document_id}/reject", headers=ADMIN_HEADERS | h,
        json={"reason": "blurred" if other else "unreadable"}), _delete_document),
    Route("admin delete", lambda api, w, h, other: api.delete(
        f"/api/admin/documents/{w.document_id}", headers=ADMIN_HEADERS | h), _upload_to_property,
        has_values=False),
    Route("admin recalculate", lambda api, w, h, other: api.post(
        f"/api/admin/properties/{w.other_property_id if other else w.property_id}/recalculate",
        headers=ADMIN_HEADERS | h), _upload_to_property),
    Route("admin requeue", lambda api, w, h, other: api.post(
        f"/api/admin/jobs/{w.dead_job_id}/requeue", headers=ADMIN_HEADERS | h), _upload_to_property,
        has_values=False),
    Route("revoke token", lambda api, w, h, other: api.delete(
        f"/api/admin/clients/{w.tenant.client_id}/tokens/{w.spare_token_id}", headers=ADMIN_HEADERS | h),
        _upload_to_property, has_values=False),
]

@pytest.fixture
def world(api: TestClient, database_url: str) -> World:
    tenant = new_tenant(database_url, n_properties=2)
    first, second = tenant.property_ids
    uploaded = api.post(f"/api/properties/{first}/documents", headers=tenant.headers,
                        files={"file": ("report.txt", EICR)}, data={"requirement_code": "eicr"})
    assert uploaded.status_code == 201, uploaded.text
    _, job_id = dead_job(database_url)
    spare = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS, json={})
    return World(tenant, first, second, uploaded.json()["documents"][0]["id"], job_id, spare.json()["token_id"])


def written(database_url: str) -> dict[str, Any]:
    """Every row a change could write."""
    tables = ("clients", "properties", "documents", "client_tokens", "audit_log", "outbox_job", "outbox_request",
              "idempotent_answer")
    with psycopg.connect(database_url) as conn:
        return {t: conn.execute(f"SELECT count(*), max(ctid::text) FROM {t}").fetchone() for t in tables}


def _strip_secrets(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: _strip_secrets(v) for k, v in body.items() if k not in ("token", "note")}
    return body


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_a_retry_under_its_key_is_answered_with_the_first_answer_whatever_happened_since(
    route: Route, api: TestClient, world: World, database_url: str
) -> None:
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    first = route.send(api, world, key, False)
    assert first.status_code in (200, 201, 202, 204), first.text
    assert first.headers["Idempotency-Key"] == key["Idempotency-Key"]
    route.later(api, world)
    before_retry = written(database_url)

    retry = route.send(api, world, key, False)

    assert retry.status_code == 200, retry.text
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.headers["Idempotency-Key"] == key["Idempotency-Key"]
    if first.status_code != 204:
        assert _strip_secrets(retry.json()) == _strip_secrets(first.json())
    assert written(database_url) == before_retry


@pytest.mark.parametrize("route", [r for r in ROUTES if r.has_values], ids=lambda r: r.name)
def test_the_same_key_with_any_other_value_is_refused_and_writes_nothing(
    route: Route, api: TestClient, world: World, database_url: str
) -> None:
    key = {"Idempotency-Key": f"reuse-{uuid.uuid4()}"}
    first = route.send(api, world, key, False)
    assert first.status_code in (200, 201, 202, 204), first.text
    before = written(database_url)

    other = route.send(api, world, key, True)

    assert other.status_code == 422, other.text
    assert [(e["field"], e["rule"]) for e in other.json()["errors"]] == [
        ("header.Idempotency-Key", "reused_for_another_request")]
    assert written(database_url) == before


def test_a_key_is_the_callers_across_routes_so_reusing_it_on_another_route_is_refused(
    api: TestClient, world: World, database_url: str
) -> None:
    key = {"Idempotency-Key": "one-key-two-routes"}
    assert ROUTES[0].send(api, world, key, False).status_code == 201
    before = written(database_url)

    elsewhere = api.delete(f"/api/properties/{world.property_id}/documents/{world.document_id}",
                           headers=world.client | key)

    assert elsewhere.status_code == 422, elsewhere.text
    assert written(database_url) == before


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_a_change_sent_without_a_key_is_answered_with_a_server_made_key_that_replays_it(
    route: Route, api: TestClient, world: World, database_url: str
) -> None:
    first = route.send(api, world, {}, False)
    assert first.status_code in (200, 201, 202, 204), first.text
    made = first.headers["Idempotency-Key"]
    assert made.startswith("srv_")
    before_retry = written(database_url)

    retry = route.send(api, world, {"Idempotency-Key": made}, False)

    assert retry.status_code == 200 and retry.headers["Idempotent-Replayed"] == "true", retry.text
    assert written(database_url) == before_retry


def test_concurrent_requests_under_one_key_make_one_property_and_all_get_its_answer(
    database_url: str, tmp_path: Path
) -> None:
    tenant = new_tenant(database_url)
    answers: list[httpx.Response] = []
    start = threading.Barrier(8)

    # One caller may use every slot here: its share is not what is under test.
    with serving(api_settings(database_url, tmp_path / "documents", api_caller_share=1.0)) as base:
        def create() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                start.wait()
                answers.append(http.post("/api/properties", json={"name": "Raced"},
                                         headers=tenant.headers | {"Idempotency-Key": "raced-key"}))

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    assert sorted(a.status_code for a in answers) == [200] * 7 + [201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM properties WHERE name = 'Raced'").fetchone()[0] == 1


def test_every_change_route_is_listed_here(api: TestClient) -> None:
    # The watched-job routes (cancel, resume, delete of any kind's job) are exercised with a
    # watched toy kind in test_jobs_api.py; every kind's own submission route with its kind
    # (POST /api/evaluations in test_evaluations.py).
    changes = {(method, path) for path, operations in api.get("/openapi.json").json()["paths"].items()
               for method, operation in operations.items() if method in ("post", "delete", "put", "patch")
               and not path.startswith(("/api/jobs", "/api/evaluations"))}
    assert len(changes) == len(ROUTES), sorted(changes)
