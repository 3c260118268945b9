"""The admin API on the real app and a real PostgreSQL: every admin trigger commits its change
with exactly one outbox request and the pending flag; auth; idempotency; tokens; requeue; the
status and history reads show what the database holds."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from api.app import create_app
from api.security import Client
from outbox import lifecycle
from services.documents import NewDocument
from services.scoring import DocumentStatus
from tests.harness.api import ADMIN_HEADERS, ADMIN_KEY, TenantClient, api_settings, new_tenant, running_api
from tests.harness.data import new_document, upload
from tests.harness.jobs import dead_job

FAR = date(2031, 6, 30)
#: How the outbox records the test admin key as an actor: the first 12 hex digits of its SHA-256.
ADMIN_ACTOR_ID = "key:" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:12]
GAS_TEXT = b"Landlord gas safety record\nNext inspection due 2031-06-30\n"


# -- reading the database --------------------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection: every read sees what the API committed."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as connection:
        yield connection


def requests_of(db: psycopg.Connection, property_id: int) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT job_id, correlation_id, trigger_reason, actor_type, actor_id FROM outbox_request "
        "WHERE coalescing_key = %s ORDER BY id",
        [f"property:{property_id}"],
    ).fetchall()


def pending(db: psycopg.Connection, property_id: int) -> bool:
    row = db.execute("SELECT compliance_score_pending AS p FROM properties WHERE id = %s", [property_id]).fetchone()
    return row["p"]


def document(db: psycopg.Connection, document_id: int) -> dict[str, Any]:
    return db.execute(
        "SELECT id, property_id, status::text AS status, rejection_reason, deleted_at, source::text AS source "
        "FROM documents WHERE id = %s",
        [document_id],
    ).fetchone()


def add_document(database_url: str, property_id: int, status: DocumentStatus = DocumentStatus.PENDING_VERIFICATION,
                 requirement: str = "gas_safety") -> int:
    """A document added through the services (a client upload), so the API under test only
    changes it."""
    made: NewDocument = new_document(requirement, FAR, status)
    with psycopg.connect(database_url) as conn:
        upload(conn, property_id, made)
        return conn.execute("SELECT max(id) FROM documents WHERE property_id = %s", [property_id]).fetchone()[0]


def count(db: psycopg.Connection, table: str) -> int:
    return db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def assert_one_admin_request(db: psycopg.Connection, property_id: int, before: int, trigger: str) -> dict[str, Any]:
    """Exactly one new outbox request for the property, with this trigger and an admin key actor."""
    rows = requests_of(db, property_id)
    assert len(rows) == before + 1, rows
    new = rows[-1]
    assert new["trigger_reason"] == trigger
    assert (new["actor_type"], new["actor_id"]) == ("admin", ADMIN_ACTOR_ID), new
    assert pending(db, property_id) is True
    return new


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


# -- each admin trigger ------------------------------------------------------------------------


def test_admin_upload_stores_the_file_adds_a_pending_document_and_enqueues_one_admin_upload_request(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, tmp_path: Path
) -> None:
    [property_id] = tenant.property_ids
    before = len(requests_of(db, property_id))

    response = api.post(
        f"/api/admin/properties/{property_id}/documents", headers=ADMIN_HEADERS,
        files={"file": ("gas.txt", GAS_TEXT, "text/plain")},
        data={"requirement_code": "gas_safety", "expires_at": "2031-06-30"},
    )

    assert response.status_code == 201, response.text
    body = response.json()
    [doc] = body["documents"]
    assert (doc["requirement_code"], doc["status"], doc["source"], doc["expires_at"]) == (
        "gas_safety", "pending_verification", "admin", "2031-06-30"
    )
    stored = document(db, doc["id"])
    assert (stored["property_id"], stored["status"], stored["source"]) == (property_id, "pending_verification", "admin")
    assert (tmp_path / "documents" / doc["sha256"][:2] / doc["sha256"][2:4] / doc["sha256"]).read_bytes() == GAS_TEXT
    request = assert_one_admin_request(db, property_id, before, "admin_upload")
    assert body["recalculation"] == {"job_id": request["job_id"], "property_id": property_id}


def test_an_admin_may_upload_a_document_already_verified(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    [property_id] = tenant.property_ids
    response = api.post(
        f"/api/admin/properties/{property_id}/documents", headers=ADMIN_HEADERS,
        files={"file": ("eicr.txt", b"Electrical installation condition report\n", "text/plain")},
        data={"requirement_code": "eicr", "status": "verified"},
    )

    assert response.status_code == 201, response.text
    [doc] = response.json()["documents"]
    assert doc["status"] == "verified" and document(db, doc["id"])["status"] == "verified"


def test_admin_delete_soft_deletes_the_document_and_enqueues_one_admin_delete_request(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document_id = add_document(database_url, property_id)
    before = len(requests_of(db, property_id))

    response = api.delete(f"/api/admin/documents/{document_id}", headers=ADMIN_HEADERS)

    assert response.status_code == 200, response.text
    assert document(db, document_id)["deleted_at"] is not None
    request = assert_one_admin_request(db, property_id, before, "admin_delete")
    assert response.json() == {"document_id": document_id, "property_id": property_id,
                               "recalculation": {"job_id": request["job_id"], "property_id": property_id}}


def test_admin_verify_marks_the_document_verified_and_enqueues_one_verify_request(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document_id = add_document(database_url, property_id)
    before = len(requests_of(db, property_id))

    response = api.post(f"/api/admin/documents/{document_id}/verify", headers=ADMIN_HEADERS)

    assert response.status_code == 200, response.text
    assert document(db, document_id)["status"] == "verified"
    assert response.json()["document"]["status"] == "verified"
    request = assert_one_admin_request(db, property_id, before, "verify")
    assert response.json()["recalculation"]["job_id"] == request["job_id"]


def test_admin_reject_records_the_reason_and_enqueues_one_reject_request(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document_id = add_document(database_url, property_id)
    before = len(requests_of(db, property_id))

    response = api.post(f"/api/admin/documents/{document_id}/reject", headers=ADMIN_HEADERS,
                        json={"reason": "  the certificate is for another address  "})

    assert response.status_code == 200, response.text
    stored = document(db, document_id)
    assert (stored["status"], stored["rejection_reason"]) == ("rejected", "the certificate is for another address")
    assert response.json()["document"]["rejection_reason"] == "the certificate is for another address"
    assert_one_admin_request(db, property_id, before, "reject")


def test_manual_recalculation_is_accepted_with_202_and_enqueues_one_manual_recalculation_request(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    [property_id] = tenant.property_ids
    before = len(requests_of(db, property_id))

    response = api.post(f"/api/admin/properties/{property_id}/recalculate", headers=ADMIN_HEADERS)

    assert response.status_code == 202, response.text
    request = assert_one_admin_request(db, property_id, before, "manual_recalculation")
    assert response.json() == {"job_id": request["job_id"], "property_id": property_id}


def test_provisioning_creates_the_client_its_properties_one_provisioning_request_each_and_a_token_shown_once(
    api: TestClient, db: psycopg.Connection
) -> None:
    response = api.post("/api/admin/clients", headers=ADMIN_HEADERS, json={
        "name": "  Acme Lettings ", "properties": [{"name": "1 High St"}, {"name": "Flat 2", "has_gas_supply": False}],
    })

    assert response.status_code == 201, response.text
    body = response.json()
    client = db.execute("SELECT id, name FROM clients WHERE id = %s", [body["client_id"]]).fetchone()
    assert client["name"] == "Acme Lettings"
    props = db.execute("SELECT id, name, has_gas_supply FROM properties WHERE client_id = %s ORDER BY id",
                       [body["client_id"]]).fetchall()
    assert [(p["name"], p["has_gas_supply"]) for p in props] == [("1 High St", True), ("Flat 2", False)]
    assert [p["property_id"] for p in body["properties"]] == [p["id"] for p in props]
    for made in body["properties"]:
        [request] = requests_of(db, made["property_id"])
        assert (request["trigger_reason"], request["actor_type"], request["job_id"]) == (
            "provisioning", "admin", made["job_id"]
        )
        assert pending(db, made["property_id"]) is True
    assert body["token"]["token"].startswith("rqc_")
    digest = db.execute("SELECT token_sha256 FROM client_tokens WHERE id = %s", [body["token"]["token_id"]]).fetchone()
    assert body["token"]["token"].encode() not in bytes(digest["token_sha256"])


def test_provisioning_and_its_token_commit_together_so_a_failed_token_leaves_no_client(
    api: TestClient, db: psycopg.Connection
) -> None:
    """The token's insert fails inside the provisioning's transaction (a trigger makes it), and
    the client and properties it would have belonged to are gone with it."""
    db.execute("""CREATE FUNCTION refuse_tokens() RETURNS trigger LANGUAGE plpgsql AS
                  $$ BEGIN RAISE EXCEPTION 'tokens refused for this test'; END $$""")
    db.execute("CREATE TRIGGER refuse_tokens BEFORE INSERT ON client_tokens "
               "FOR EACH ROW EXECUTE FUNCTION refuse_tokens()")
    clients, outbox = count(db, "clients"), count(db, "outbox_request")

    response = api.post("/api/admin/clients", headers=ADMIN_HEADERS,
                        json={"name": "Doomed", "properties": [{"name": "x"}]})

    assert response.status_code == 500
    assert (count(db, "clients"), count(db, "outbox_request")) == (clients, outbox)


# -- auth --------------------------------------------------------------------------------------

ADMIN_CALLS: list[tuple[str, str]] = [
    ("POST", "/api/admin/clients"),
    ("POST", "/api/admin/clients/1/tokens"),
    ("GET", "/api/admin/clients/1/tokens"),
    ("DELETE", "/api/admin/clients/1/tokens/1"),
    ("POST", "/api/admin/properties/1/documents"),
    ("DELETE", "/api/admin/documents/1"),
    ("POST", "/api/admin/documents/1/verify"),
    ("POST", "/api/admin/documents/1/reject"),
    ("POST", "/api/admin/properties/1/recalculate"),
    ("GET", "/api/admin/properties/1/compliance-score-history"),
    ("GET", "/api/admin/properties/1/compliance-recalc-status"),
    ("GET", "/api/admin/queue"),
    ("GET", "/api/admin/jobs"),
    ("GET", "/api/admin/jobs/1"),
    ("POST", "/api/admin/jobs/1/requeue"),
]


def test_every_admin_endpoint_refuses_a_missing_a_wrong_and_a_client_credential_with_401(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    before = (count(db, "outbox_request"), count(db, "clients"), count(db, "documents"), count(db, "client_tokens"))
    for method, path in ADMIN_CALLS:
        for headers in ({}, {"X-API-Key": "wrong-key-" + "y" * 24}, tenant.headers,
                        {"X-API-Key": tenant.token}):
            response = api.request(method, path, headers=headers, json={"name": "x", "reason": "x"})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"] == "ApiKey"
    after = (count(db, "outbox_request"), count(db, "clients"), count(db, "documents"), count(db, "client_tokens"))
    assert after == before


def test_admin_endpoints_answer_503_when_no_admin_key_is_configured(
    database_url: str, tmp_path: Path, tenant: TenantClient, db: psycopg.Connection
) -> None:
    settings = api_settings(database_url, tmp_path / "documents").model_copy(update={"admin_api_keys": ()})
    with running_api(settings) as unkeyed:
        for method, path in ADMIN_CALLS:
            response = unkeyed.request(method, path, headers=ADMIN_HEADERS, json={"name": "x"})
            assert response.status_code == 503, (method, path, response.text)
            assert "RECALQ_ADMIN_API_KEYS" in response.json()["detail"]
    assert pending(db, tenant.property_ids[0]) is True  # untouched since provisioning
    assert len(requests_of(db, tenant.property_ids[0])) == 1


# -- tokens ------------------------------------------------------------------------------------


@pytest.fixture
def client_probe(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The real app plus one route guarded by the real client authentication, to tell whether
    a bearer token opens client endpoints, whatever those endpoints are."""
    app = create_app(api_settings(database_url, tmp_path / "documents"))

    @app.get("/probe/whoami")
    def whoami(caller: Client) -> dict[str, int]:
        return {"client_id": caller.client_id}

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_an_issued_token_authenticates_its_client_and_stops_working_as_soon_as_it_is_revoked(
    api: TestClient, client_probe: TestClient, tenant: TenantClient
) -> None:
    issued = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS,
                      json={"label": "rotation 2026"})
    assert issued.status_code == 201, issued.text
    token = issued.json()
    bearer = {"Authorization": f"Bearer {token['token']}"}
    assert client_probe.get("/probe/whoami", headers=bearer).json() == {"client_id": tenant.client_id}

    revoked = api.delete(f"/api/admin/clients/{tenant.client_id}/tokens/{token['token_id']}", headers=ADMIN_HEADERS)

    assert revoked.status_code == 204 and revoked.content == b""
    assert client_probe.get("/probe/whoami", headers=bearer).status_code == 401
    assert client_probe.get("/probe/whoami", headers=tenant.headers).json() == {"client_id": tenant.client_id}


def test_the_token_list_shows_labels_and_revocations_but_never_a_secret(
    api: TestClient, tenant: TenantClient
) -> None:
    issued = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS, json={"label": "ci"})
    api.delete(f"/api/admin/clients/{tenant.client_id}/tokens/{issued.json()['token_id']}", headers=ADMIN_HEADERS)

    listed = api.get(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS)

    assert listed.status_code == 200
    tokens = listed.json()
    assert [(t["label"], t["revoked_at"] is not None) for t in tokens] == [("tests", False), ("ci", True)]
    assert all(set(t) == {"token_id", "label", "created_at", "revoked_at"} for t in tokens)
    assert tenant.token not in listed.text and issued.json()["token"] not in listed.text


def test_token_endpoints_answer_404_for_an_unknown_client_or_token(api: TestClient, tenant: TenantClient) -> None:
    assert api.post("/api/admin/clients/999999/tokens", headers=ADMIN_HEADERS, json={}).status_code == 404
    assert api.get("/api/admin/clients/999999/tokens", headers=ADMIN_HEADERS).status_code == 404
    assert api.delete(f"/api/admin/clients/{tenant.client_id}/tokens/999999", headers=ADMIN_HEADERS).status_code == 404


# -- idempotency -------------------------------------------------------------------------------

#: What a mutation may change, counted before and after a replay.
COUNTED = ("clients", "properties", "documents", "client_tokens", "outbox_request", "outbox_job", "audit_log")


def _snapshot(db: psycopg.Connection) -> dict[str, Any]:
    counts = {table: count(db, table) for table in COUNTED}
    counts["documents_state"] = db.execute(
        "SELECT array_agg((id, status, deleted_at IS NULL) ORDER BY id)::text AS s FROM documents"
    ).fetchone()["s"]
    counts["jobs_state"] = db.execute(
        "SELECT array_agg((id, status, attempts) ORDER BY id)::text AS s FROM outbox_job"
    ).fetchone()["s"]
    counts["tokens_state"] = db.execute(
        "SELECT array_agg((id, revoked_at) ORDER BY id)::text AS s FROM client_tokens"
    ).fetchone()["s"]
    return counts


Mutation = Callable[[TestClient, dict[str, str]], httpx2.Response]


def _mutations(tenant: TenantClient, document_id: int, dead_job_id: int) -> dict[str, Mutation]:
    property_id = tenant.property_ids[0]
    return {
        "provision": lambda c, h: c.post("/api/admin/clients", headers=h, json={"name": "Replay Ltd",
                                                                               "properties": [{"name": "A"}]}),
        "issue token": lambda c, h: c.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=h, json={}),
        "upload": lambda c, h: c.post(
            f"/api/admin/properties/{property_id}/documents", headers=h,
            files={"file": ("epc.txt", b"Energy performance certificate\n", "text/plain")},
            data={"requirement_code": "epc"},
        ),
        "verify": lambda c, h: c.post(f"/api/admin/documents/{document_id}/verify", headers=h),
        "reject": lambda c, h: c.post(f"/api/admin/documents/{document_id}/reject", headers=h, json={"reason": "no"}),
        "delete": lambda c, h: c.delete(f"/api/admin/documents/{document_id}", headers=h),
        "recalculate": lambda c, h: c.post(f"/api/admin/properties/{property_id}/recalculate", headers=h),
        "requeue": lambda c, h: c.post(f"/api/admin/jobs/{dead_job_id}/requeue", headers=h),
    }


#: What the same mutation answers when sent a third time under a fresh key.
AGAIN_WITH_A_NEW_KEY = {"provision": 201, "issue token": 201, "upload": 201, "verify": 409, "reject": 409,
                        "delete": 404, "recalculate": 202, "requeue": 409}


@pytest.mark.parametrize("mutation", ["provision", "issue token", "upload", "verify", "reject", "delete",
                                      "recalculate", "requeue"])
def test_a_mutation_sent_twice_with_one_idempotency_key_has_the_effect_of_one(
    mutation: str, api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    document_id = add_document(database_url, tenant.property_ids[0])
    _, dead_job_id = dead_job(database_url)
    send = _mutations(tenant, document_id, dead_job_id)[mutation]
    headers = {**ADMIN_HEADERS, **key()}

    first = send(api, headers)
    assert first.status_code in (200, 201, 202), first.text
    assert "Idempotent-Replayed" not in first.headers
    after_first = _snapshot(db)

    second = send(api, headers)

    assert second.status_code == 200, second.text
    assert second.headers["Idempotent-Replayed"] == "true"
    assert _snapshot(db) == after_first
    first_body, second_body = first.json(), second.json()
    if mutation in ("provision", "issue token"):
        secret = first_body["token"]["token"] if mutation == "provision" else first_body["token"]
        assert secret.startswith("rqc_") and secret not in second.text
        assert second_body["token"] is None and "shown" in second_body["note"]
        if mutation == "provision":
            assert (second_body["client_id"], second_body["properties"]) == (
                first_body["client_id"], first_body["properties"]
            )
        else:
            assert second_body["token_id"] == first_body["token_id"]
    elif mutation == "requeue":
        assert second_body["job_id"] == first_body["job_id"]
    else:
        assert second_body == first_body

    # A new key is a new request: it changes data again, or meets the state the first one left.
    third = send(api, {**ADMIN_HEADERS, **key()})
    assert "Idempotent-Replayed" not in third.headers
    assert third.status_code == AGAIN_WITH_A_NEW_KEY[mutation], third.text


def test_a_replayed_token_revocation_answers_200_with_the_revoked_token_and_changes_nothing(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    issued = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS, json={}).json()
    headers = {**ADMIN_HEADERS, **key()}
    path = f"/api/admin/clients/{tenant.client_id}/tokens/{issued['token_id']}"

    first = api.delete(path, headers=headers)
    after_first = _snapshot(db)
    second = api.delete(path, headers=headers)

    assert first.status_code == 204
    assert second.status_code == 200 and second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["token_id"] == issued["token_id"] and second.json()["revoked_at"] is not None
    assert _snapshot(db) == after_first
    assert api.delete(path, headers={**ADMIN_HEADERS, **key()}).status_code == 404


# -- state conflicts and requeue ----------------------------------------------------------------


def test_verifying_a_verified_document_or_rejecting_a_rejected_one_is_a_409_that_enqueues_nothing(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    verified = add_document(database_url, property_id, DocumentStatus.VERIFIED, "eicr")
    rejected = add_document(database_url, property_id)
    assert api.post(f"/api/admin/documents/{rejected}/reject", headers=ADMIN_HEADERS,
                    json={"reason": "wrong address"}).status_code == 200
    before = len(requests_of(db, property_id))

    again_verified = api.post(f"/api/admin/documents/{verified}/verify", headers=ADMIN_HEADERS)
    again_rejected = api.post(f"/api/admin/documents/{rejected}/reject", headers=ADMIN_HEADERS,
                              json={"reason": "still wrong"})

    assert again_verified.status_code == 409 and "already verified" in again_verified.json()["detail"]
    assert again_rejected.status_code == 409 and "already rejected" in again_rejected.json()["detail"]
    assert len(requests_of(db, property_id)) == before
    assert document(db, rejected)["rejection_reason"] == "wrong address"


def test_a_dead_job_requeued_through_the_api_is_pending_again_with_fresh_attempts(
    api: TestClient, db: psycopg.Connection, database_url: str
) -> None:
    property_id, job_id = dead_job(database_url)
    dead = api.get("/api/admin/jobs", headers=ADMIN_HEADERS, params={"status": "dead"}).json()["jobs"]
    assert [j["job_id"] for j in dead] == [job_id] and dead[0]["last_error"] == "boom: bad data"
    status = api.get(f"/api/admin/properties/{property_id}/compliance-recalc-status", headers=ADMIN_HEADERS).json()
    assert (status["pending"], status["status"]) == (True, "failed")

    response = api.post(f"/api/admin/jobs/{job_id}/requeue", headers=ADMIN_HEADERS)

    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job_id, "status": "pending"}
    row = db.execute("SELECT status::text AS s, attempts, requeue_count FROM outbox_job WHERE id = %s",
                     [job_id]).fetchone()
    assert (row["s"], row["attempts"], row["requeue_count"]) == ("pending", 0, 1)
    audit = db.execute("SELECT actor_type, actor_id FROM audit_log WHERE action = 'JOB_REQUEUED' AND job_id = %s",
                       [job_id]).fetchall()
    assert len(audit) == 1 and audit[0]["actor_type"] == "admin"
    status = api.get(f"/api/admin/properties/{property_id}/compliance-recalc-status", headers=ADMIN_HEADERS).json()
    assert (status["pending"], status["status"], status["jobs"][0]["status"]) == (True, "updating", "pending")


def test_a_job_read_by_id_lists_every_attempt_of_every_run_with_its_error_worker_and_task_id(
    api: TestClient, db: psycopg.Connection, database_url: str
) -> None:
    _, job_id = dead_job(database_url)
    first_task_id = db.execute("SELECT celery_task_id::text AS t FROM outbox_job WHERE id = %s",
                               [job_id]).fetchone()["t"]
    assert api.post(f"/api/admin/jobs/{job_id}/requeue", headers=ADMIN_HEADERS).status_code == 200
    with psycopg.connect(database_url, autocommit=True) as worker:
        started = lifecycle.start(worker, job_id, redelivered=False, lease_seconds=60, worker="w9@host")
        lifecycle.fail(worker, job_id, started.attempt, error="second run failed too", retryable=False,
                       retry_in_seconds=0)

    response = api.get(f"/api/admin/jobs/{job_id}", headers=ADMIN_HEADERS)

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["job_id"], body["status"], body["requeue_count"], body["last_error"]) == (
        job_id, "dead", 1, "second run failed too")
    history = [(a["run"], a["attempt"], a["outcome"], a["error"], a["worker"]) for a in body["attempts_history"]]
    assert history == [(0, 1, "failed", "boom: bad data", None), (1, 1, "failed", "second run failed too", "w9@host")]
    assert body["attempts_history"][0]["celery_task_id"] == first_task_id
    assert body["attempts_history"][1]["celery_task_id"] == body["celery_task_id"] != first_task_id
    assert api.get("/api/admin/jobs/999999", headers=ADMIN_HEADERS).status_code == 404


def test_requeue_of_a_job_that_is_not_dead_is_a_409_naming_its_status_and_of_an_unknown_job_a_404(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    [job] = db.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s",
                       [f"property:{tenant.property_ids[0]}"]).fetchall()

    not_dead = api.post(f"/api/admin/jobs/{job['id']}/requeue", headers=ADMIN_HEADERS)
    unknown = api.post("/api/admin/jobs/999999/requeue", headers=ADMIN_HEADERS)

    assert not_dead.status_code == 409
    assert "is pending" in not_dead.json()["detail"] and "only a dead job" in not_dead.json()["detail"]
    assert unknown.status_code == 404
    row = db.execute("SELECT status::text AS s FROM outbox_job WHERE id = %s", [job["id"]]).fetchone()
    assert row["s"] == "pending"
    assert count(db, "audit_log") == db.execute(
        "SELECT count(*) AS n FROM audit_log WHERE action <> 'JOB_REQUEUED'").fetchone()["n"]


# -- reads: status, history, queue, jobs ---------------------------------------------------------


def test_recalc_status_right_after_a_verify_shows_pending_updating_and_the_job_with_its_trigger_and_actor(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    document_id = add_document(database_url, property_id)
    headers = {**ADMIN_HEADERS, "Idempotency-Key": "verify-gas-1"}
    verify = api.post(f"/api/admin/documents/{document_id}/verify", headers=headers).json()

    response = api.get(f"/api/admin/properties/{property_id}/compliance-recalc-status", headers=ADMIN_HEADERS)

    assert response.status_code == 200
    body = response.json()
    assert (body["property_id"], body["pending"], body["status"]) == (property_id, True, "updating")
    assert (body["score"], body["last_calculated_at"]) == (None, None)
    [job] = body["jobs"]  # provisioning, the upload and the verify all joined one waiting job
    assert job["job_id"] == verify["recalculation"]["job_id"]
    assert (job["status"], job["attempts"], job["max_attempts"], job["last_error"]) == ("pending", 0, 5, None)
    assert [r["trigger_reason"] for r in job["requests"]] == ["provisioning", "client_upload", "verify"]
    assert job["requests_total"] == 3
    last = job["requests"][-1]
    assert (last["actor_type"], last["actor_id"]) == ("admin", ADMIN_ACTOR_ID)
    assert last["correlation_id"].endswith(":verify-gas-1")


def test_score_history_shows_the_stored_score_and_the_snapshots_newest_first(
    api: TestClient, db: psycopg.Connection, tenant: TenantClient
) -> None:
    """Snapshots are written by the worker; here they are written as it would, to read them back
    (tests/e2e/test_admin_api_flow.py shows a real worker's)."""
    [property_id] = tenant.property_ids
    empty = api.get(f"/api/admin/properties/{property_id}/compliance-score-history", headers=ADMIN_HEADERS).json()
    assert empty["snapshots"] == []
    assert empty["current"] == {"score": None, "breakdown": None, "version": None, "calculated_at": None,
                                "pending": True, "status": "updating"}
    breakdown = {"version": 1, "as_of": "2026-11-23", "requirements": []}
    for job_id, score in ((101, 40), (102, 65), (103, 90)):
        db.execute(
            "INSERT INTO property_compliance_score_history (property_id, job_id, score, breakdown, version, as_of, "
            "inputs_fingerprint, generation) VALUES (%s, %s, %s, %s, 1, '2026-11-23', 'f', 1)",
            [property_id, job_id, score, Jsonb(breakdown)],
        )

    response = api.get(f"/api/admin/properties/{property_id}/compliance-score-history", headers=ADMIN_HEADERS,
                       params={"limit": 2})

    assert response.status_code == 200
    assert [(s["job_id"], s["score"]) for s in response.json()["snapshots"]] == [(103, 90), (102, 65)]
    assert response.json()["snapshots"][0]["breakdown"] == breakdown


def test_status_and_history_of_an_unknown_property_are_404(api: TestClient) -> None:
    for path in ("compliance-recalc-status", "compliance-score-history"):
        response = api.get(f"/api/admin/properties/999999/{path}", headers=ADMIN_HEADERS)
        assert response.status_code == 404 and response.json()["type"] == "urn:recalq:problem:not-found"


def test_the_queue_shows_the_view_rows_with_waiting_jobs_counted(
    api: TestClient, db: psycopg.Connection, database_url: str
) -> None:
    new_tenant(database_url, n_properties=3)
    dead_job(database_url)

    response = api.get("/api/admin/queue", headers=ADMIN_HEADERS)

    assert response.status_code == 200
    rows = {(r["task"], r["status"]): r for r in response.json()}
    view = db.execute("SELECT task, status::text AS status, jobs FROM outbox_queue_state").fetchall()
    assert {(v["task"], v["status"]) for v in view} == set(rows)
    compliance = "compliance.recalculate_property"
    assert rows[(compliance, "pending")]["jobs"] == 3 and rows[(compliance, "pending")]["relay_lag_s"] >= 0
    assert rows[(compliance, "dead")]["jobs"] == 1
    assert rows[(compliance, "done")]["jobs"] is None
    assert set(rows[(compliance, "pending")]) == {"task", "status", "jobs", "oldest_age_s", "relay_lag_s",
                                                   "finished_last_1m", "finished_last_5m", "per_second_5m"}


def test_the_job_list_filters_by_status_key_and_task_and_pages_newest_first(
    api: TestClient, database_url: str
) -> None:
    tenant = new_tenant(database_url, n_properties=3)
    _, dead_job_id = dead_job(database_url)
    first, second, third = tenant.property_ids

    page1 = api.get("/api/admin/jobs", headers=ADMIN_HEADERS, params={"status": "pending", "limit": 2}).json()
    page2 = api.get("/api/admin/jobs", headers=ADMIN_HEADERS,
                    params={"status": "pending", "limit": 2, "before_id": page1["next_before_id"]}).json()
    by_key = api.get("/api/admin/jobs", headers=ADMIN_HEADERS, params={"key": f"property:{second}"}).json()
    other_task = api.get("/api/admin/jobs", headers=ADMIN_HEADERS, params={"task": "billing.charge"}).json()

    assert [j["coalescing_key"] for j in page1["jobs"]] == [f"property:{third}", f"property:{second}"]
    assert [j["coalescing_key"] for j in page2["jobs"]] == [f"property:{first}"]
    assert page2["next_before_id"] is None
    assert [j["coalescing_key"] for j in by_key["jobs"]] == [f"property:{second}"]
    assert dead_job_id not in {j["job_id"] for j in page1["jobs"] + page2["jobs"]}
    assert other_task == {"jobs": [], "next_before_id": None}


def test_the_openapi_document_lists_every_admin_endpoint_with_the_admin_key(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    admin_paths = {(method.upper(), path) for path, ops in spec["paths"].items() if path.startswith("/api/admin")
                   for method in ops}
    expected = {(m, p.replace("/1/", "/{x}/").replace("/1", "/{x}")) for m, p in ADMIN_CALLS}
    normalised = {(m, "/".join("{x}" if s.startswith("{") else s for s in p.split("/"))) for m, p in admin_paths}
    assert normalised == expected
    for path, ops in spec["paths"].items():
        if path.startswith("/api/admin"):
            for op in ops.values():
                assert {"APIKeyHeader": []} in op["security"], path
