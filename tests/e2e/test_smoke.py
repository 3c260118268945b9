"""The whole pipeline once: mutation -> outbox -> relay -> Celery worker -> score."""

from datetime import date

import psycopg

from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.system import System


def test_an_upload_becomes_a_fresh_score_through_relay_and_worker(system: System, database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        [property_id] = provision(conn)
        upload(conn, property_id, new_document("gas_safety", date(2030, 1, 1), DocumentStatus.VERIFIED))
        pending = conn.execute(
            "SELECT compliance_score_pending FROM properties WHERE id = %s", [property_id]
        ).fetchone()[0]
        conn.commit()
    assert pending is True
    system.start_worker()
    system.start_relay()
    system.wait_idle(timeout=60)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT compliance_score, compliance_score_pending FROM properties WHERE id = %s", [property_id]
        ).fetchone()
        assert row == (25, False)
        assert_invariants(conn)
