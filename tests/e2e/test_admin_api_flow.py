"""An admin verifies a document over the API and watches the score go from "updating" to the
formula's number: real API, relay and Celery worker, real PostgreSQL, both brokers."""

from __future__ import annotations

import signal
from datetime import date

import psycopg
from fastapi.testclient import TestClient

from tests.harness.api import ADMIN_HEADERS, TenantClient
from tests.harness.data import new_document, upload
from tests.harness.invariants import assert_invariants, expected_score
from tests.harness.observe import connect
from tests.harness.system import System


def test_a_verify_over_the_api_shows_updating_then_the_worker_lands_one_snapshot_with_the_formulas_score(
    system: System, api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    [property_id] = tenant.property_ids
    with psycopg.connect(database_url) as conn:
        upload(conn, property_id, new_document("gas_safety", date(2031, 6, 30)))
        [document_id] = conn.execute("SELECT id FROM documents WHERE property_id = %s", [property_id]).fetchone()
    system.start_worker()
    relay = system.start_relay()
    system.wait_idle()
    status_path = f"/api/admin/properties/{property_id}/compliance-recalc-status"
    history_path = f"/api/admin/properties/{property_id}/compliance-score-history"
    first = api.get(status_path, headers=ADMIN_HEADERS).json()
    assert (first["pending"], first["status"]) == (False, "up_to_date")
    [before] = api.get(history_path, headers=ADMIN_HEADERS).json()["snapshots"]
    system.kill(relay, signal.SIGTERM)  # hold the verify's job in the outbox to look at it

    verified = api.post(f"/api/admin/documents/{document_id}/verify", headers=ADMIN_HEADERS)

    assert verified.status_code == 200, verified.text
    job_id = verified.json()["recalculation"]["job_id"]
    waiting = api.get(status_path, headers=ADMIN_HEADERS).json()
    assert (waiting["pending"], waiting["status"], waiting["score"]) == (True, "updating", before["score"])
    assert waiting["jobs"][0]["job_id"] == job_id and waiting["jobs"][0]["status"] == "pending"
    assert [r["trigger_reason"] for r in waiting["jobs"][0]["requests"]] == ["verify"]
    assert waiting["jobs"][0]["requests"][0]["actor_type"] == "admin"

    system.start_relay()
    system.wait_idle()

    done = api.get(status_path, headers=ADMIN_HEADERS).json()
    assert (done["pending"], done["status"]) == (False, "up_to_date")
    latest = done["jobs"][0]
    assert (latest["job_id"], latest["status"], latest["attempts"], latest["last_error"]) == (job_id, "done", 1, None)
    assert latest["finished_at"] is not None
    assert done["last_calculated_at"] > first["last_calculated_at"]
    history = api.get(history_path, headers=ADMIN_HEADERS).json()
    newest = history["snapshots"][0]
    assert [s["job_id"] for s in history["snapshots"]] == [job_id, before["job_id"]]
    with connect(database_url) as conn:
        want, breakdown = expected_score(conn, property_id, date.fromisoformat(newest["as_of"]))
        assert (newest["score"], newest["breakdown"]) == (want, breakdown)
        assert (history["current"]["score"], done["score"]) == (want, want)
        assert want > before["score"]  # a verified, far-off gas certificate counts more than a pending one
        assert_invariants(conn)
