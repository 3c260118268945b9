"""Hostile and malformed input to the admin API: each answer is a 4xx problem document naming
the field, the rule and (for a closed set) the valid values; nothing changes, nothing is
enqueued, no file is stored; never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from outbox import JobStatus
from services.scoring import REQUIREMENTS
from tests.harness.api import ADMIN_HEADERS, TenantClient, api_settings, new_tenant, running_api
from tests.harness.data import new_document, upload

TABLES = ("clients", "properties", "documents", "client_tokens", "outbox_request", "outbox_job", "audit_log")
BIGINT_MAX = 2**63 - 1
#: A small per-file limit, so the oversize upload below stays small.
MAX_FILE_BYTES = 64 * 1024


# Every test here must leave the database and the store as they were (each checks it), so the
# module shares one database, one app and one tenant.


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile") / "documents"


@pytest.fixture(scope="module")
def api(module_database_url: str, store_dir: Path) -> Iterator[TestClient]:
    with running_api(api_settings(module_database_url, store_dir, max_file_bytes=MAX_FILE_BYTES)) as client:
        yield client


@pytest.fixture(scope="module")
def tenant(module_database_url: str) -> TenantClient:
    return new_tenant(module_database_url)


@pytest.fixture(scope="module")
def db(module_database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(module_database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="module")
def document_id(module_database_url: str, tenant: TenantClient) -> int:
    with psycopg.connect(module_database_url) as conn:
        upload(conn, tenant.property_ids[0], new_document("gas_safety"))
        return conn.execute("SELECT max(id) FROM documents").fetchone()[0]


class Unchanged:
    """What the database and the file store hold, to show a refused request changed neither."""

    def __init__(self, db: psycopg.Connection, store: Path) -> None:
        self.db, self.store = db, store
        self.before = self._state()

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {t: self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        state["documents"] = self.db.execute(
            "SELECT array_agg((id, status, rejection_reason, deleted_at) ORDER BY id)::text FROM documents"
        ).fetchone()[0]
        state["generations"] = self.db.execute(
            "SELECT array_agg((id, generation) ORDER BY id)::text FROM properties"
        ).fetchone()[0]
        state["files"] = sorted(str(p) for p in self.store.rglob("*") if p.is_file()) if self.store.exists() else []
        return state

    def check(self) -> None:
        assert self._state() == self.before


@pytest.fixture
def unchanged(db: psycopg.Connection, store_dir: Path, tenant: TenantClient, document_id: int) -> Unchanged:
    """Taken once the tenant and its document exist: the test's own request must change nothing."""
    return Unchanged(db, store_dir)


def assert_problem(response: Any, status: int, field: str, rule: str, valid_values: list[str] | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    matching = [e for e in body["errors"] if e["field"] == field and e["rule"] == rule]
    assert matching, f"no error on {field!r} with rule {rule!r} in {body['errors']}"
    if valid_values is not None:
        assert matching[0]["valid_values"] == valid_values


# -- provisioning bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"name": "Acme", "colour": "red"}, "colour", "extra_forbidden"),
        ({"name": "Acme", "properties": [{"name": "A", "gas": True}]}, "properties.0.gas", "extra_forbidden"),
        ({"name": ""}, "name", "string_too_short"),
        ({"name": "   \t "}, "name", "string_too_short"),
        ({"name": "x" * 201}, "name", "string_too_long"),
        ({"name": "Acme", "properties": [{"name": "  "}]}, "properties.0.name", "string_too_short"),
        ({"name": "Acme\x00Ltd"}, "name", "printable_text"),
        ({"name": "Acme", "properties": [{"name": "A", "has_gas_supply": "yes"}]},
         "properties.0.has_gas_supply", "bool_type"),
        ({"properties": []}, "name", "missing"),
        ({"name": "Acme", "properties": {"name": "A"}}, "properties", "list_type"),
        ({"name": 42}, "name", "string_type"),
        ({"name": "Acme", "properties": [{"name": f"P{i}"} for i in range(1001)]}, "properties", "too_long"),
        ({"name": "Acme\u202eLtd"}, "name", "printable_text"),
        ({"name": "Acme\u2066Ltd"}, "name", "printable_text"),
        ({"name": "Acme\u2028Ltd"}, "name", "printable_text"),
        ({"name": "Acme", "properties": [{"name": "Flat\x1b[31m 1"}]}, "properties.0.name", "printable_text"),
    ],
    ids=["unknown-field", "unknown-nested-field", "empty-name", "whitespace-name", "long-name",
         "whitespace-property-name", "nul-in-name", "string-boolean", "missing-name", "object-not-list",
         "number-name", "1001-properties", "bidi-override-in-name", "bidi-isolate-in-name",
         "line-separator-in-name", "escape-in-property-name"],
)
def test_a_bad_provisioning_body_is_a_422_naming_the_field_and_rule_and_creates_nothing(
    api: TestClient, unchanged: Unchanged, body: dict[str, Any], field: str, rule: str
) -> None:
    response = api.post("/api/admin/clients", headers=ADMIN_HEADERS, json=body)

    assert_problem(response, 422, field, rule)
    unchanged.check()


def test_an_unpaired_surrogate_in_a_name_is_a_422_not_a_database_error(
    api: TestClient, unchanged: Unchanged
) -> None:
    response = api.post("/api/admin/clients", headers={**ADMIN_HEADERS, "Content-Type": "application/json"},
                        content=b'{"name": "Acme \\ud800"}')

    assert_problem(response, 422, "name", "string_unicode")
    unchanged.check()


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/api/admin/clients", b'{"name": "Acme",'),
        ("/api/admin/clients", b"name=Acme"),
        ("/api/admin/clients/1/tokens", b"{'label': 'single quotes'}"),
        ("/api/admin/documents/{document_id}/reject", b'{"reason": "no"'),
    ],
    ids=["truncated", "form-encoded", "single-quoted", "reject-truncated"],
)
def test_malformed_json_is_a_400_and_changes_nothing(
    api: TestClient, unchanged: Unchanged, document_id: int, path: str, content: bytes
) -> None:
    response = api.post(path.format(document_id=document_id),
                        headers={**ADMIN_HEADERS, "Content-Type": "application/json"}, content=content)

    assert response.status_code == 400, response.text
    assert response.json()["type"] == "urn:recalq:problem:malformed-json"
    assert response.json()["errors"][0]["rule"] == "json_invalid"
    unchanged.check()


def test_a_token_label_over_100_characters_is_a_422_and_issues_nothing(
    api: TestClient, unchanged: Unchanged, tenant: TenantClient
) -> None:
    response = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS,
                        json={"label": "x" * 101})

    assert_problem(response, 422, "label", "string_too_long")
    unchanged.check()


# -- documents ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({}, "reason", "missing"),
        ({"reason": "   "}, "reason", "string_too_short"),
        ({"reason": "x" * 501}, "reason", "string_too_long"),
        ({"reason": "bad", "status": "rejected"}, "status", "extra_forbidden"),
        ({"reason": "expired \u202e2202"}, "reason", "printable_text"),
    ],
    ids=["no-reason", "blank-reason", "long-reason", "unknown-field", "bidi-override-in-reason"],
)
def test_a_reject_without_a_usable_reason_is_a_422_and_leaves_the_document_as_it_was(
    api: TestClient, unchanged: Unchanged, document_id: int, body: dict[str, Any], field: str, rule: str
) -> None:
    response = api.post(f"/api/admin/documents/{document_id}/reject", headers=ADMIN_HEADERS, json=body)

    assert_problem(response, 422, field, rule)
    unchanged.check()


def test_a_reject_with_no_body_at_all_is_a_422_naming_the_body(
    api: TestClient, unchanged: Unchanged, document_id: int
) -> None:
    response = api.post(f"/api/admin/documents/{document_id}/reject", headers=ADMIN_HEADERS)

    assert_problem(response, 422, "body", "missing")
    unchanged.check()


@pytest.mark.parametrize(
    ("data", "files", "status", "field", "rule", "valid_values"),
    [
        ({"requirement_code": "boiler"}, None, 422, "requirement_code", "literal_error", list(REQUIREMENTS)),
        ({}, None, 422, "requirement_code", "missing", None),
        ({"requirement_code": "eicr", "expires_at": "2026-02-30"}, None, 422, "expires_at",
         "date_from_datetime_parsing", None),
        ({"requirement_code": "eicr", "expires_at": "0"}, None, 422, "expires_at", "date_format", None),
        ({"requirement_code": "eicr", "expires_at": "31/12/2030"}, None, 422, "expires_at", "date_format", None),
        ({"requirement_code": "eicr", "status": "rejected"}, None, 422, "status", "literal_error",
         ["pending_verification", "verified"]),
        ({"requirement_code": "eicr"}, {"other": ("a.txt", b"text\n", "text/plain")}, 422, "file", "missing", None),
        ({"requirement_code": "eicr"}, {"file": ("cert.pdf", b"not a pdf at all\n", "application/pdf")}, 415,
         "file", "declared_type_matches_content", None),
        ({"requirement_code": "eicr"}, {"file": ("cert.bin", b"\x00\x01\x02\xff", "application/octet-stream")},
         415, "file", "content_type", ["application/pdf", "text/plain"]),
        ({"requirement_code": "eicr"}, {"file": ("empty.txt", b"", "text/plain")}, 422, "file", "not_empty", None),
        ({"requirement_code": "eicr"}, {"file": ("../../etc/\x1bpasswd", b"text\n", "text/plain")}, 422,
         "file_name", "no_control_characters", None),
    ],
    ids=["unknown-requirement", "no-requirement", "impossible-date", "unix-time-date", "day-first-date",
         "rejected-status", "no-file",
         "text-claiming-pdf", "binary", "empty-file", "control-character-name"],
)
def test_a_bad_admin_upload_is_refused_with_its_field_and_rule_and_stores_nothing(
    api: TestClient, unchanged: Unchanged, tenant: TenantClient,
    data: dict[str, str], files: dict[str, Any] | None, status: int, field: str, rule: str,
    valid_values: list[str] | None,
) -> None:
    response = api.post(
        f"/api/admin/properties/{tenant.property_ids[0]}/documents", headers=ADMIN_HEADERS, data=data,
        files=files if files is not None else {"file": ("cert.txt", b"Certificate\n", "text/plain")},
    )

    assert_problem(response, status, field, rule, valid_values)
    unchanged.check()


def test_an_upload_to_a_property_that_does_not_exist_is_a_404_and_leaves_no_file(
    api: TestClient, unchanged: Unchanged
) -> None:
    response = api.post("/api/admin/properties/999999/documents", headers=ADMIN_HEADERS,
                        data={"requirement_code": "eicr"},
                        files={"file": ("orphan.txt", b"A file with no property\n", "text/plain")})

    assert response.status_code == 404, response.text
    unchanged.check()


def test_an_admin_upload_over_the_file_limit_is_a_413_and_stores_nothing(
    api: TestClient, unchanged: Unchanged, tenant: TenantClient
) -> None:
    response = api.post(f"/api/admin/properties/{tenant.property_ids[0]}/documents", headers=ADMIN_HEADERS,
                        data={"requirement_code": "epc"},
                        files={"file": ("big.txt", b"x" * (MAX_FILE_BYTES + 1), "text/plain")})

    assert_problem(response, 413, "file", "max_size")
    unchanged.check()


@pytest.mark.parametrize("action", ["verify", "reject", "delete"])
def test_changing_a_document_that_does_not_exist_is_a_404_and_changes_nothing(
    api: TestClient, unchanged: Unchanged, action: str
) -> None:
    if action == "delete":
        response = api.delete("/api/admin/documents/999999", headers=ADMIN_HEADERS)
    else:
        response = api.post(f"/api/admin/documents/999999/{action}", headers=ADMIN_HEADERS, json={"reason": "x"})

    assert response.status_code == 404, response.text
    assert response.json()["type"] == "urn:recalq:problem:not-found"
    unchanged.check()


# -- ids, filters, limits, headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("DELETE", "/api/admin/documents/{bad}", "path.document_id"),
        ("POST", "/api/admin/documents/{bad}/verify", "path.document_id"),
        ("POST", "/api/admin/properties/{bad}/recalculate", "path.property_id"),
        ("GET", "/api/admin/properties/{bad}/compliance-recalc-status", "path.property_id"),
        ("GET", "/api/admin/properties/{bad}/compliance-score-history", "path.property_id"),
        ("POST", "/api/admin/jobs/{bad}/requeue", "path.job_id"),
        ("POST", "/api/admin/clients/{bad}/tokens", "path.client_id"),
        ("DELETE", "/api/admin/clients/1/tokens/{bad}", "path.token_id"),
    ],
)
@pytest.mark.parametrize(
    ("bad", "rule"),
    [("abc", "int_parsing"), ("1.5", "int_parsing"), ("0", "greater_than_equal"), ("-3", "greater_than_equal"),
     (str(BIGINT_MAX + 1), "less_than_equal")],
)
def test_an_id_that_is_not_a_positive_bigint_is_a_422_naming_the_path_parameter(
    api: TestClient, unchanged: Unchanged, method: str, path: str, field: str, bad: str, rule: str
) -> None:
    response = api.request(method, path.format(bad=bad), headers=ADMIN_HEADERS, json={})

    assert_problem(response, 422, field, rule)
    unchanged.check()


def test_an_unknown_job_status_filter_is_a_422_listing_the_valid_statuses(api: TestClient) -> None:
    response = api.get("/api/admin/jobs", headers=ADMIN_HEADERS, params={"status": "exploded"})

    assert_problem(response, 422, "query.status", "enum", [str(s) for s in JobStatus])


@pytest.mark.parametrize(
    ("path", "params", "field", "rule"),
    [
        ("/api/admin/jobs", {"limit": "-1"}, "query.limit", "greater_than_equal"),
        ("/api/admin/jobs", {"limit": "0"}, "query.limit", "greater_than_equal"),
        ("/api/admin/jobs", {"limit": "201"}, "query.limit", "less_than_equal"),
        ("/api/admin/jobs", {"limit": "ten"}, "query.limit", "int_parsing"),
        ("/api/admin/jobs", {"before_id": "-5"}, "query.before_id", "greater_than_equal"),
        ("/api/admin/jobs", {"key": "k" * 201}, "query.key", "string_too_long"),
        ("/api/admin/jobs", {"task": "a\x00b"}, "query.task", "string_pattern_mismatch"),
        ("/api/admin/properties/1/compliance-score-history", {"limit": "-10"}, "query.limit", "greater_than_equal"),
    ],
    ids=["negative-limit", "zero-limit", "huge-limit", "word-limit", "negative-before", "long-key", "nul-task",
         "negative-history-limit"],
)
def test_a_bad_query_parameter_is_a_422_naming_it(
    api: TestClient, path: str, params: dict[str, str], field: str, rule: str
) -> None:
    assert_problem(api.get(path, headers=ADMIN_HEADERS, params=params), 422, field, rule)


def test_a_malformed_idempotency_key_is_a_400_and_changes_nothing(
    api: TestClient, unchanged: Unchanged, tenant: TenantClient
) -> None:
    response = api.post(f"/api/admin/properties/{tenant.property_ids[0]}/recalculate",
                        headers={**ADMIN_HEADERS, "Idempotency-Key": "has spaces in it"})

    # 400 from the header check, or 422 once the header's documented schema carries its pattern.
    assert response.status_code in (400, 422), response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in response.text
    unchanged.check()


def test_a_token_label_with_a_control_character_is_a_422_and_issues_nothing(
    api: TestClient, unchanged: Unchanged, tenant: TenantClient
) -> None:
    response = api.post(f"/api/admin/clients/{tenant.client_id}/tokens", headers=ADMIN_HEADERS,
                        json={"label": "ci\rrotated"})

    assert_problem(response, 422, "label", "printable_text")
    unchanged.check()
