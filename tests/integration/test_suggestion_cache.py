"""A document's suggestion costs its extraction once, and that extraction holds no database
connection: one tenant reading large files cannot take the API's connections from another."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from services import ai_suggestions
from tests.harness.api import TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving

GAS = b"Landlord gas safety record\nExpiry date: 01/02/2027\n"


def _upload(http: httpx.Client | TestClient, tenant: TenantClient, content: bytes = GAS) -> int:
    response = http.post(f"/api/properties/{tenant.property_ids[0]}/documents", headers=tenant.headers,
                         files={"file": ("gas.txt", content)}, data={"requirement_code": "gas_safety"})
    assert response.status_code == 201, response.text
    return int(response.json()["documents"][0]["id"])


def test_a_documents_suggestion_is_extracted_once_and_answered_from_the_cache_after(
    api: TestClient, tenant: TenantClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    document_id = _upload(api, tenant)
    extractions: list[str] = []
    compute = ai_suggestions._compute
    monkeypatch.setattr(ai_suggestions, "_compute", lambda store, sha: extractions.append(sha) or compute(store, sha))
    path = f"/api/properties/{tenant.property_ids[0]}/documents/{document_id}/ai-suggestion"

    answers = [api.get(path, headers=tenant.headers) for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["requirement_code"] == "gas_safety"
    assert answers[1].json() == answers[0].json() == answers[2].json()
    assert len(extractions) == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM document_suggestion").fetchone()[0] == 1


def test_an_apply_uses_the_cached_suggestion_and_changes_the_document(
    api: TestClient, tenant: TenantClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    document_id = _upload(api, tenant)
    base = f"/api/properties/{tenant.property_ids[0]}/documents/{document_id}"
    shown = api.get(f"{base}/ai-suggestion", headers=tenant.headers).json()
    monkeypatch.setattr(ai_suggestions, "_compute", lambda store, sha: pytest.fail("extracted again"))

    applied = api.post(f"{base}/ai-apply", headers=tenant.headers)

    assert applied.status_code == 200, applied.text
    assert applied.json()["suggestion"] == shown
    assert applied.json()["document"]["expires_at"] == "2027-02-01"


def test_while_a_first_suggestion_is_being_extracted_another_tenant_gets_the_only_database_connection(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    greedy, other = new_tenant(database_url), new_tenant(database_url)
    extracting, release = threading.Event(), threading.Event()
    compute = ai_suggestions._compute

    def slow(store: object, sha: str) -> object:
        extracting.set()
        assert release.wait(30), "the test never released the extraction"
        return compute(store, sha)  # type: ignore[arg-type]

    monkeypatch.setattr(ai_suggestions, "_compute", slow)
    # One database connection in the whole API process, four requests at once.
    settings = api_settings(database_url, tmp_path / "documents", api_db_pool_size=1, api_max_in_flight=4,
                            db_pool_timeout_seconds=3)
    with serving(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        document_id = _upload(http, greedy)
        answer: list[httpx.Response] = []
        reader = threading.Thread(target=lambda: answer.append(http.get(
            f"/api/properties/{greedy.property_ids[0]}/documents/{document_id}/ai-suggestion",
            headers=greedy.headers)))
        reader.start()
        assert extracting.wait(30), "the suggestion never started extracting"

        meanwhile = http.get(f"/api/properties/{other.property_ids[0]}", headers=other.headers)

        release.set()
        reader.join(30)

    assert meanwhile.status_code == 200, meanwhile.text
    assert answer[0].status_code == 200 and answer[0].json()["requirement_code"] == "gas_safety"
