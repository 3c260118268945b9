"""Client endpoints on the real app, a real database and a real file store.

Every trigger commits its change, enqueues exactly one recalculation request with its reason
and actor, and turns the property to "updating"; another client's ids answer the 404 a missing
id answers and change nothing; a request sent twice with one Idempotency-Key has one effect.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from outbox import lifecycle
from outbox.backoff import RetryPolicy
from services.file_store import FileStore
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from tests.harness.api import TenantClient, api_settings, new_tenant, running_api
from tests.harness.archives import zip_of
from tests.harness.pdf import make_pdf

GAS_PDF = make_pdf(["Landlord Gas Safety Record", "Expiry date: 12 March 2027"])
EICR_TEXT = b"Electrical Installation Condition Report\nNext inspection due: 1 June 2031\n"
PLAIN_TEXT = b"Shopping list: eggs, milk\n"
POLICY = RecalculationPolicy(
    lease_seconds=30,
    retry=RetryPolicy(base_seconds=10, max_seconds=600),
    infra_retry=RetryPolicy(base_seconds=1, max_seconds=30),
    busy_retry_seconds=0.25,
    lock_timeout_ms=2000,
)


@pytest.fixture
def database_url(module_database_url: str) -> str:
    """One database for the module: each test works on tenants of its own and compares
    counts and rows before and after, so the tests cannot see each other's effects."""
    return module_database_url


# -- reading the database -----------------------------------------------------------------

def rows(database_url: str, query: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def last_request_id(database_url: str) -> int:
    return rows(database_url, "SELECT coalesce(max(id), 0) AS n FROM outbox_request")[0]["n"]


def requests_after(database_url: str, request_id: int) -> list[dict[str, Any]]:
    return rows(database_url, "SELECT job_id, coalescing_key, trigger_reason, actor_type, actor_id "
                              "FROM outbox_request WHERE id > %s ORDER BY id", request_id)


def property_row(database_url: str, property_id: int) -> dict[str, Any]:
    [row] = rows(database_url, "SELECT * FROM properties WHERE id = %s", property_id)
    return row


def document_row(database_url: str, document_id: int) -> dict[str, Any]:
    [row] = rows(database_url, "SELECT * FROM documents WHERE id = %s", document_id)
    return row


def stored_files(store_dir: Path) -> set[str]:
    return {sha256 for sha256, _ in FileStore(store_dir).stored()}


def everything(database_url: str, store_dir: Path) -> dict[str, Any]:
    """Every row and file a client request could write, to show that a refused one wrote none."""
    tables = ("clients", "properties", "documents", "audit_log", "outbox_job", "outbox_request")
    state: dict[str, Any] = {t: rows(database_url, f"SELECT * FROM {t} ORDER BY id") for t in tables}
    state["files"] = stored_files(store_dir)
    return state


def settle(database_url: str, property_id: int) -> None:
    """Runs the property's waiting recalculation in-process (the real service), so a test starts
    from an up-to-date property and "pending" after a mutation means the mutation set it."""
    recalculator = Recalculator(connection=lambda: psycopg.connect(database_url), policy=POLICY,
                                today=lambda: datetime.now(UTC).date())
    for job in rows(database_url, "SELECT id FROM outbox_job WHERE coalescing_key = %s AND status = 'pending' "
                                  "ORDER BY id", f"property:{property_id}"):
        assert isinstance(recalculator.run(job["id"]), Applied)
    assert property_row(database_url, property_id)["compliance_score_pending"] is False


def assert_one_request(database_url: str, before: int, property_id: int, trigger: str, tenant: TenantClient,
                       job_id: int) -> None:
    assert requests_after(database_url, before) == [{
        "job_id": job_id, "coalescing_key": f"property:{property_id}", "trigger_reason": trigger,
        "actor_type": "client", "actor_id": str(tenant.client_id),
    }]


def assert_updating(api: TestClient, tenant: TenantClient, database_url: str, property_id: int) -> None:
    assert property_row(database_url, property_id)["compliance_score_pending"] is True
    shown = api.get(f"/api/properties/{property_id}", headers=tenant.headers).json()
    assert (shown["compliance_score_pending"], shown["status"]) == (True, "updating")


def assert_problem_names(response: httpx.Response, status: int, field: str, rule: str) -> None:
    assert response.status_code == status, response.text
    assert "Idempotent-Replayed" not in response.headers
    assert [(e["field"], e["rule"]) for e in response.json()["errors"]] == [(field, rule)]


# -- requests ------------------------------------------------------------------------------

def upload(api: TestClient, tenant: TenantClient, property_id: int, content: bytes = GAS_PDF,
           name: str = "gas.pdf", code: str = "gas_safety", expires_at: str | None = "2030-01-31",
           key: str | None = None) -> httpx.Response:
    data = {"requirement_code": code} | ({"expires_at": expires_at} if expires_at is not None else {})
    return api.post(f"/api/properties/{property_id}/documents", files={"file": (name, content)}, data=data,
                    headers=tenant.headers | ({"Idempotency-Key": key} if key else {}))


def uploaded_document(api: TestClient, tenant: TenantClient, property_id: int, **kw: Any) -> dict[str, Any]:
    response = upload(api, tenant, property_id, **kw)
    assert response.status_code == 201, response.text
    return response.json()["documents"][0]


# -- each trigger --------------------------------------------------------------------------

def test_creating_a_property_commits_it_enqueues_one_property_create_request_and_reads_updating(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    before = last_request_id(database_url)

    response = api.post("/api/properties", json={"name": "  Flat 2  ", "has_gas_supply": False},
                        headers=tenant.headers)

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["has_gas_supply"], body["client_id"]) == ("Flat 2", False, tenant.client_id)
    assert (body["compliance_score"], body["compliance_score_pending"], body["status"]) == (None, True, "updating")
    assert body["recalculation"]["property_id"] == body["id"]
    row = property_row(database_url, body["id"])
    assert (row["client_id"], row["name"], row["has_gas_supply"]) == (tenant.client_id, "Flat 2", False)
    assert_one_request(database_url, before, body["id"], "property_create", tenant, body["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, body["id"])


def test_uploading_a_document_stores_its_file_enqueues_one_client_upload_and_turns_the_property_to_updating(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    settle(database_url, property_id)
    assert api.get(f"/api/properties/{property_id}", headers=tenant.headers).json()["status"] == "up_to_date"
    before = last_request_id(database_url)

    response = upload(api, tenant, property_id, expires_at="2030-01-31")

    assert response.status_code == 201, response.text
    [document] = response.json()["documents"]
    sha256 = hashlib.sha256(GAS_PDF).hexdigest()
    assert document | {"id": None, "created_at": None, "updated_at": None} == {
        "id": None, "property_id": property_id, "requirement_code": "gas_safety", "status": "pending_verification",
        "expires_at": "2030-01-31", "file_name": "gas.pdf", "size_bytes": len(GAS_PDF), "sha256": sha256,
        "source": "client", "rejection_reason": None, "created_at": None, "updated_at": None,
    }
    row = document_row(database_url, document["id"])
    assert (row["property_id"], row["sha256"], row["expires_at"]) == (property_id, sha256, date(2030, 1, 31))
    assert FileStore(tmp_path / "documents").read(sha256) == GAS_PDF
    assert_one_request(database_url, before, property_id, "client_upload", tenant,
                       response.json()["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, property_id)
    listed = api.get(f"/api/properties/{property_id}/documents", headers=tenant.headers).json()
    assert [d["id"] for d in listed] == [document["id"]]


def test_a_bulk_upload_adds_every_file_with_its_own_requirement_and_expiry_and_enqueues_one_client_bulk_upload(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    settle(database_url, property_id)
    before = last_request_id(database_url)

    response = api.post(
        f"/api/properties/{property_id}/documents/bulk",
        files=[("files", ("gas.pdf", GAS_PDF, "application/pdf")), ("files", ("eicr.txt", EICR_TEXT, "text/plain"))],
        data={"requirement_codes": ["gas_safety", "eicr"], "expires_at": ["2030-01-31", ""]},
        headers=tenant.headers,
    )

    assert response.status_code == 201, response.text
    documents = response.json()["documents"]
    assert [(d["requirement_code"], d["expires_at"], d["file_name"]) for d in documents] == [
        ("gas_safety", "2030-01-31", "gas.pdf"), ("eicr", None, "eicr.txt")]
    assert [document_row(database_url, d["id"])["deleted_at"] for d in documents] == [None, None]
    assert stored_files(tmp_path / "documents") == {hashlib.sha256(c).hexdigest() for c in (GAS_PDF, EICR_TEXT)}
    assert_one_request(database_url, before, property_id, "client_bulk_upload", tenant,
                       response.json()["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, property_id)


def test_a_zip_upload_adds_each_entry_under_the_requirement_its_path_names_and_enqueues_one_client_zip_upload(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    settle(database_url, property_id)
    before = last_request_id(database_url)
    archive = zip_of([("gas_safety/cert.pdf", GAS_PDF), ("reports/eicr_2026.txt", EICR_TEXT)])

    response = api.post(f"/api/properties/{property_id}/documents/zip",
                        files={"archive": ("certs.zip", archive, "application/zip")}, headers=tenant.headers)

    assert response.status_code == 201, response.text
    documents = response.json()["documents"]
    assert [(d["requirement_code"], d["file_name"]) for d in documents] == [
        ("gas_safety", "cert.pdf"), ("eicr", "eicr_2026.txt")]
    assert stored_files(tmp_path / "documents") == {hashlib.sha256(c).hexdigest() for c in (GAS_PDF, EICR_TEXT)}
    assert_one_request(database_url, before, property_id, "client_zip_upload", tenant,
                       response.json()["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, property_id)


def test_deleting_a_document_soft_deletes_it_enqueues_one_client_delete_and_turns_the_property_to_updating(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document = uploaded_document(api, tenant, property_id)
    settle(database_url, property_id)
    before = last_request_id(database_url)

    response = api.delete(f"/api/properties/{property_id}/documents/{document['id']}", headers=tenant.headers)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["document_id"] == document["id"]
    assert body["recalculation"]["property_id"] == property_id
    assert document_row(database_url, document["id"])["deleted_at"] is not None
    assert api.get(f"/api/properties/{property_id}/documents", headers=tenant.headers).json() == []
    assert_one_request(database_url, before, property_id, "client_delete", tenant, body["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, property_id)


def test_the_ai_suggestion_shows_what_the_extractor_found_with_its_evidence_and_changes_nothing(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    document = uploaded_document(api, tenant, property_id, code="eicr", expires_at=None)
    before = everything(database_url, tmp_path / "documents")

    response = api.get(f"/api/properties/{property_id}/documents/{document['id']}/ai-suggestion",
                       headers=tenant.headers)

    assert response.status_code == 200, response.text
    assert response.json() == {
        "requirement_code": "gas_safety", "expires_at": "2027-03-12",
        "evidence": [
            {"field": "requirement_code", "text_snippet": "Landlord Gas Safety Record", "page": 1, "derivation": None},
            {"field": "expires_at", "text_snippet": "Expiry date: 12 March 2027", "page": 1, "derivation": None},
        ],
        "notes": [], "extractor_version": "keywords-3",
    }
    assert everything(database_url, tmp_path / "documents") == before


def test_ai_apply_sets_the_suggested_requirement_and_expiry_and_enqueues_one_ai_apply(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document = uploaded_document(api, tenant, property_id, code="eicr", expires_at=None)
    settle(database_url, property_id)
    before = last_request_id(database_url)

    response = api.post(f"/api/properties/{property_id}/documents/{document['id']}/ai-apply", headers=tenant.headers)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["suggestion"]["requirement_code"], body["suggestion"]["expires_at"]) == ("gas_safety", "2027-03-12")
    assert (body["document"]["id"], body["document"]["requirement_code"], body["document"]["expires_at"],
            body["document"]["source"]) == (document["id"], "gas_safety", "2027-03-12", "ai")
    row = document_row(database_url, document["id"])
    assert (row["requirement_code"], row["expires_at"], row["source"]) == ("gas_safety", date(2027, 3, 12), "ai")
    assert_one_request(database_url, before, property_id, "ai_apply", tenant, body["recalculation"]["job_id"])
    assert_updating(api, tenant, database_url, property_id)


def test_ai_apply_of_a_document_in_which_nothing_is_found_is_refused_as_nothing_to_apply_and_changes_nothing(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    document = uploaded_document(api, tenant, property_id, content=PLAIN_TEXT, name="list.txt", code="epc")
    before = everything(database_url, tmp_path / "documents")

    response = api.post(f"/api/properties/{property_id}/documents/{document['id']}/ai-apply", headers=tenant.headers)

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert (error["field"], error["rule"]) == ("document", "nothing_to_apply")
    assert everything(database_url, tmp_path / "documents") == before


# -- reads ---------------------------------------------------------------------------------

def test_properties_are_listed_a_page_at_a_time_and_only_the_callers(
    api: TestClient, database_url: str, other_tenant: TenantClient
) -> None:
    owner = new_tenant(database_url, n_properties=3)

    first = api.get("/api/properties", params={"limit": 2}, headers=owner.headers)
    assert first.status_code == 200, first.text
    assert [p["id"] for p in first.json()["items"]] == owner.property_ids[:2]
    assert first.json()["next_after_id"] == owner.property_ids[1]
    second = api.get("/api/properties", params={"limit": 2, "after_id": first.json()["next_after_id"]},
                     headers=owner.headers).json()
    assert ([p["id"] for p in second["items"]], second["next_after_id"]) == (owner.property_ids[2:], None)
    assert {p["client_id"] for p in first.json()["items"] + second["items"]} == {owner.client_id}
    theirs = api.get("/api/properties", headers=other_tenant.headers).json()
    assert [p["id"] for p in theirs["items"]] == other_tenant.property_ids


def test_a_property_reads_its_score_and_breakdown_once_recalculated(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    uploaded_document(api, tenant, property_id, expires_at="2099-01-01")
    settle(database_url, property_id)

    shown = api.get(f"/api/properties/{property_id}", headers=tenant.headers).json()

    row = property_row(database_url, property_id)
    assert (shown["compliance_score"], shown["compliance_score_pending"], shown["status"]) == (
        row["compliance_score"], False, "up_to_date")
    assert shown["compliance_breakdown"]["requirements"][0] | {"document_id": None} == {
        "requirement": "gas_safety", "state": "pending_verification", "credit": 0.5, "weight": 25,
        "document_id": None, "expires_at": "2099-01-01"}


def test_a_property_whose_latest_recalculation_is_dead_reads_failed(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    [job] = rows(database_url, "SELECT id FROM outbox_job WHERE coalescing_key = %s", f"property:{property_id}")
    with psycopg.connect(database_url, autocommit=True) as conn:
        started = lifecycle.start(conn, job["id"], redelivered=False, lease_seconds=30)
        assert started.attempt is not None
        assert lifecycle.fail(conn, job["id"], started.attempt, error="boom", retryable=False,
                              retry_in_seconds=0) is lifecycle.FailOutcome.DEAD

    shown = api.get(f"/api/properties/{property_id}", headers=tenant.headers).json()
    listed = api.get("/api/properties", headers=tenant.headers).json()["items"]

    assert (shown["compliance_score_pending"], shown["status"]) == (True, "failed")
    assert [p["status"] for p in listed] == ["failed"]


# -- idempotency ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    name: str
    #: Sends the request; gets the app, the tenant, the property and a document made beforehand.
    send: Callable[[TestClient, TenantClient, int, int, dict[str, str]], httpx.Response]
    first_status: int


MUTATIONS = [
    Mutation("create property", lambda api, t, pid, did, h: api.post(
        "/api/properties", json={"name": "Flat 9"}, headers=h), 201),
    Mutation("upload", lambda api, t, pid, did, h: api.post(
        f"/api/properties/{pid}/documents", files={"file": ("eicr.txt", EICR_TEXT)},
        data={"requirement_code": "eicr"}, headers=h), 201),
    Mutation("bulk upload", lambda api, t, pid, did, h: api.post(
        f"/api/properties/{pid}/documents/bulk", files=[("files", ("a.txt", EICR_TEXT)), ("files", ("b.txt", b"b\n"))],
        data={"requirement_codes": ["eicr", "epc"]}, headers=h), 201),
    Mutation("zip upload", lambda api, t, pid, did, h: api.post(
        f"/api/properties/{pid}/documents/zip",
        files={"archive": ("a.zip", zip_of([("eicr/a.txt", EICR_TEXT), ("epc/b.txt", b"b\n")]))}, headers=h), 201),
    Mutation("delete", lambda api, t, pid, did, h: api.delete(
        f"/api/properties/{pid}/documents/{did}", headers=h), 200),
    Mutation("ai apply", lambda api, t, pid, did, h: api.post(
        f"/api/properties/{pid}/documents/{did}/ai-apply", headers=h), 200),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_a_mutation_sent_twice_with_one_idempotency_key_has_the_effect_of_one_and_the_second_is_a_replay(
    mutation: Mutation, api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    document = uploaded_document(api, tenant, property_id, code="eicr", expires_at=None)
    headers = tenant.headers | {"Idempotency-Key": f"retry-{mutation.name.replace(' ', '-')}"}
    before_requests = last_request_id(database_url)

    first = mutation.send(api, tenant, property_id, document["id"], headers)
    after_first = everything(database_url, tmp_path / "documents")
    second = mutation.send(api, tenant, property_id, document["id"], headers)

    assert first.status_code == mutation.first_status, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert second.status_code == 200, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert everything(database_url, tmp_path / "documents") == after_first
    assert len(requests_after(database_url, before_requests)) == 1


def test_a_property_created_again_under_its_key_with_other_values_is_refused_as_a_reused_key(
    api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    key = {"Idempotency-Key": "new-flat"}
    first = api.post("/api/properties", json={"name": "Flat 1"}, headers=tenant.headers | key)
    assert first.status_code == 201, first.text
    before = everything(database_url, tmp_path / "documents")

    response = api.post("/api/properties", json={"name": "Flat 2"}, headers=tenant.headers | key)

    assert_problem_names(response, 422, "header.Idempotency-Key", "reused_for_another_request")
    assert everything(database_url, tmp_path / "documents") == before


@pytest.mark.parametrize("reuse", [
    lambda api, t, pid, did, h: api.delete(f"/api/properties/{pid}/documents/{did}", headers=h),
    lambda api, t, pid, did, h: api.post(f"/api/properties/{pid}/documents/{did}/ai-apply", headers=h),
    # Bytes no other test stores: the module shares one database, whose rows decide which files stay.
    lambda api, t, pid, did, h: api.post(f"/api/properties/{pid}/documents",
                                         files={"file": ("b.txt", b"only here: reused key\n")},
                                         data={"requirement_code": "epc"}, headers=h),
], ids=["delete", "ai apply", "upload"])
def test_an_idempotency_key_spent_on_another_request_is_refused_and_not_answered_as_a_replay(
    reuse: Callable[..., httpx.Response], api: TestClient, tenant: TenantClient, database_url: str, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    key = {"Idempotency-Key": "spent-on-an-upload"}
    first = upload(api, tenant, property_id, content=EICR_TEXT, name="e.txt", code="eicr", key=key["Idempotency-Key"])
    assert first.status_code == 201, first.text
    before = everything(database_url, tmp_path / "documents")

    response = reuse(api, tenant, property_id, first.json()["documents"][0]["id"], tenant.headers | key)

    assert_problem_names(response, 422, "header.Idempotency-Key", "reused_for_another_request")
    assert everything(database_url, tmp_path / "documents") == before


def test_the_same_idempotency_key_from_two_clients_makes_two_properties(
    api: TestClient, tenant: TenantClient, other_tenant: TenantClient, database_url: str
) -> None:
    key = {"Idempotency-Key": "shared-key-1"}

    mine = api.post("/api/properties", json={"name": "Mine"}, headers=tenant.headers | key)
    theirs = api.post("/api/properties", json={"name": "Theirs"}, headers=other_tenant.headers | key)

    assert (mine.status_code, theirs.status_code) == (201, 201), (mine.text, theirs.text)
    assert "Idempotent-Replayed" not in theirs.headers
    assert (property_row(database_url, mine.json()["id"])["client_id"],
            property_row(database_url, theirs.json()["id"])["client_id"]) == (tenant.client_id, other_tenant.client_id)


# -- another client's ids, and no credentials ------------------------------------------------

@dataclass(frozen=True)
class World:
    """One database for the tests that must change nothing: each checks that it did not."""

    api: TestClient
    database_url: str
    store_dir: Path
    owner: TenantClient
    intruder: TenantClient
    document_id: int

    @property
    def property_id(self) -> int:
        return self.owner.property_ids[0]


@pytest.fixture(scope="module")
def world(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store_dir = tmp_path_factory.mktemp("client-api") / "documents"
    with running_api(api_settings(module_database_url, store_dir)) as api:
        owner = new_tenant(module_database_url)
        intruder = new_tenant(module_database_url)
        document = uploaded_document(api, owner, owner.property_ids[0], code="eicr", expires_at=None)
        yield World(api, module_database_url, store_dir, owner, intruder, document["id"])


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    body: Callable[[], dict[str, Any]] = dict

    def send(self, api: TestClient, headers: dict[str, str], property_id: int, document_id: int) -> httpx.Response:
        url = self.path.format(pid=property_id, did=document_id)
        return api.request(self.method, url, headers=headers | {"Idempotency-Key": "probe"}, **self.body())


PROPERTY_ENDPOINTS = [
    Endpoint("read property", "GET", "/api/properties/{pid}"),
    Endpoint("list documents", "GET", "/api/properties/{pid}/documents"),
    Endpoint("upload", "POST", "/api/properties/{pid}/documents",
             lambda: {"files": {"file": ("e.txt", EICR_TEXT)}, "data": {"requirement_code": "eicr"}}),
    Endpoint("bulk upload", "POST", "/api/properties/{pid}/documents/bulk",
             lambda: {"files": [("files", ("e.txt", EICR_TEXT))], "data": {"requirement_codes": ["eicr"]}}),
    Endpoint("zip upload", "POST", "/api/properties/{pid}/documents/zip",
             lambda: {"files": {"archive": ("a.zip", zip_of([("eicr/e.txt", EICR_TEXT)]))}}),
]
DOCUMENT_ENDPOINTS = [
    Endpoint("delete document", "DELETE", "/api/properties/{pid}/documents/{did}"),
    Endpoint("ai suggestion", "GET", "/api/properties/{pid}/documents/{did}/ai-suggestion"),
    Endpoint("ai apply", "POST", "/api/properties/{pid}/documents/{did}/ai-apply"),
]
ALL_ENDPOINTS = [
    Endpoint("create property", "POST", "/api/properties", lambda: {"json": {"name": "Flat 1"}}),
    Endpoint("list properties", "GET", "/api/properties"),
    *PROPERTY_ENDPOINTS,
    *DOCUMENT_ENDPOINTS,
]


def assert_not_found_like_a_missing_id(response: httpx.Response, missing: httpx.Response, world: World) -> None:
    """Same status, same body (ids aside) as for an id that does not exist: nothing tells the
    caller the id exists, and nothing of the owner's leaks."""
    assert response.status_code == 404, response.text
    assert missing.status_code == 404, missing.text
    without_ids = re.compile(r"\d+")
    assert without_ids.sub("N", response.text) == without_ids.sub("N", missing.text)
    assert set(response.json()) == {"type", "title", "status", "detail", "errors"}


@pytest.mark.parametrize("endpoint", PROPERTY_ENDPOINTS + DOCUMENT_ENDPOINTS, ids=lambda e: e.name)
def test_another_clients_property_answers_404_like_a_missing_one_and_nothing_changes(
    endpoint: Endpoint, world: World
) -> None:
    before = everything(world.database_url, world.store_dir)

    response = endpoint.send(world.api, world.intruder.headers, world.property_id, world.document_id)
    missing = endpoint.send(world.api, world.intruder.headers, 9_000_000_000, world.document_id)

    assert_not_found_like_a_missing_id(response, missing, world)
    assert everything(world.database_url, world.store_dir) == before


@pytest.mark.parametrize("endpoint", DOCUMENT_ENDPOINTS, ids=lambda e: e.name)
def test_another_clients_document_under_ones_own_property_answers_404_and_nothing_changes(
    endpoint: Endpoint, world: World
) -> None:
    before = everything(world.database_url, world.store_dir)
    [own_property] = world.intruder.property_ids

    response = endpoint.send(world.api, world.intruder.headers, own_property, world.document_id)
    missing = endpoint.send(world.api, world.intruder.headers, own_property, 9_000_000_000)

    assert_not_found_like_a_missing_id(response, missing, world)
    assert everything(world.database_url, world.store_dir) == before


def test_a_client_can_neither_list_another_clients_properties_nor_create_one_for_it(world: World) -> None:
    before = everything(world.database_url, world.store_dir)

    listed = world.api.get("/api/properties", headers=world.intruder.headers)
    planted = world.api.post("/api/properties", json={"name": "Planted", "client_id": world.owner.client_id},
                             headers=world.intruder.headers)

    assert [p["id"] for p in listed.json()["items"]] == world.intruder.property_ids
    assert planted.status_code == 422, planted.text
    assert [(e["field"], e["rule"]) for e in planted.json()["errors"]] == [("client_id", "extra_forbidden")]
    assert everything(world.database_url, world.store_dir) == before


@pytest.mark.parametrize("credentials", [None, "Bearer rqc_not-a-real-token", "Basic dXNlcjpwYXNz"],
                         ids=["no token", "unknown token", "another scheme"])
@pytest.mark.parametrize("endpoint", ALL_ENDPOINTS, ids=lambda e: e.name)
def test_a_request_without_a_valid_client_token_answers_401_with_www_authenticate_and_nothing_changes(
    endpoint: Endpoint, credentials: str | None, world: World
) -> None:
    before = everything(world.database_url, world.store_dir)
    headers = {"Authorization": credentials} if credentials else {}

    response = endpoint.send(world.api, headers, world.property_id, world.document_id)

    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["status"] == 401
    assert str(world.owner.client_id) not in response.json()["detail"]
    assert everything(world.database_url, world.store_dir) == before
