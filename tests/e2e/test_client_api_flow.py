"""A client's upload through the HTTP API, end to end: the property reads "updating" until a
real relay and Celery worker (on each broker) have recomputed its score, then reads
"up_to_date" with the score the formula gives. What a client sees is what the system did."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests.harness.api import api_settings, new_tenant, running_api
from tests.harness.invariants import assert_invariants, expected_score
from tests.harness.pdf import make_pdf
from tests.harness.system import System, wait_until

GAS_PDF = make_pdf(["Landlord Gas Safety Record", "Expiry date: 12 March 2099"])
EICR_TEXT = b"Electrical Installation Condition Report\nNext inspection due: 1 June 2099\n"


def test_an_uploaded_document_reads_updating_until_the_worker_applies_the_formula_then_up_to_date(
    system: System, tmp_path: Path
) -> None:
    tenant = new_tenant(system.database_url)
    [property_id] = tenant.property_ids
    url = f"/api/properties/{property_id}"

    with running_api(api_settings(system.database_url, tmp_path / "documents")) as api:
        uploaded = api.post(f"{url}/documents", files={"file": ("gas.pdf", GAS_PDF, "application/pdf")},
                            data={"requirement_code": "gas_safety", "expires_at": "2099-03-12"},
                            headers=tenant.headers)
        assert uploaded.status_code == 201, uploaded.text
        before = api.get(url, headers=tenant.headers).json()
        assert (before["compliance_score_pending"], before["status"], before["compliance_score"]) == (
            True, "updating", None)

        system.start_worker()
        system.start_relay()
        system.wait_idle()

        after = api.get(url, headers=tenant.headers).json()
        with psycopg.connect(system.database_url) as conn:
            as_of = conn.execute("SELECT compliance_as_of FROM properties WHERE id = %s", [property_id]).fetchone()[0]
            score, breakdown = expected_score(conn, property_id, as_of)
        assert (after["compliance_score_pending"], after["status"]) == (False, "up_to_date")
        assert (after["compliance_score"], after["compliance_breakdown"]) == (score, breakdown)
        assert score == 13  # gas_safety pending verification: 25 x 0.5 of 100, rounded half up

        # With the system running, a second change settles to the formula the same way.
        second = api.post(f"{url}/documents/bulk",
                          files=[("files", ("eicr.txt", EICR_TEXT, "text/plain"))],
                          data={"requirement_codes": ["eicr"]}, headers=tenant.headers)
        assert second.status_code == 201, second.text
        job_id = second.json()["recalculation"]["job_id"]

        def settled() -> bool:
            shown = api.get(url, headers=tenant.headers).json()
            return shown["status"] == "up_to_date"

        wait_until(settled, 60, f"property {property_id} to settle after job {job_id}")
        final = api.get(url, headers=tenant.headers).json()
        system.wait_idle()
        with psycopg.connect(system.database_url) as conn:
            as_of = conn.execute("SELECT compliance_as_of FROM properties WHERE id = %s", [property_id]).fetchone()[0]
            assert final["compliance_score"] == expected_score(conn, property_id, as_of)[0] == 23
            assert_invariants(conn, [property_id])
