"""A hundred mutations committed in one transaction (research T24): one NOTIFY wakes the relay
for all of them (Postgres folds identical notifications), every request joins its property's
single waiting job (G3), and each property is recalculated once, on the final data (G2).
"""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from services.documents import add_documents, delete_document, reject_document, verify_document
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import ADMIN, cid, new_document, provision
from tests.harness.invariants import assert_invariants
from tests.harness.observe import assert_fresh_score, connect, history_count
from tests.harness.system import System

pytestmark = pytest.mark.broker

MUTATIONS = 100
FAR = date(2031, 6, 30)
CLIENT = Actor(ActorType.CLIENT, "client-batch")


def mutate(conn: psycopg.Connection, property_id: int, step: int, documents: list[int]) -> None:
    """The step-th mutation of a property: uploads, a verify, a reject and a delete in turn, so
    the final score depends on every kind of change the batch made. No commit: the caller's
    transaction holds them all."""
    match step % 5:
        case 0 | 1:
            added = add_documents(
                conn, property_id=property_id, documents=[new_document(("gas_safety", "eicr")[step % 5], FAR)],
                source="client", actor=CLIENT, trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=cid(),
            )
            documents.extend(added.document_ids)
        case 2:
            verify_document(conn, document_id=documents[-1], actor=ADMIN, correlation_id=cid())
        case 3:
            reject_document(conn, document_id=documents[-2], reason="unreadable scan", actor=ADMIN,
                            correlation_id=cid())
        case _:
            delete_document(conn, document_id=documents.pop(0), actor=CLIENT,
                            trigger=TriggerReason.CLIENT_DELETE, correlation_id=cid())


@pytest.mark.parametrize("spread", [1, 10], ids=["on one property", "across ten properties"])
def test_a_hundred_mutations_in_one_transaction_cost_one_job_and_one_recalculation_per_property(
    system_on_one_broker: System, database_url: str, spread: int
) -> None:
    system = system_on_one_broker
    with connect(database_url) as db:
        property_ids = provision(db, n_properties=spread)
        system.start_worker()
        system.start_relay()
        system.wait_idle(timeout=60)
        [last_job] = db.execute("SELECT max(id) FROM outbox_job").fetchone()

        with psycopg.connect(database_url) as batch:
            with batch.transaction():
                documents: dict[int, list[int]] = {p: [] for p in property_ids}
                for step in range(MUTATIONS):
                    property_id = property_ids[step % spread]
                    mutate(batch, property_id, step // spread, documents[property_id])
                uncommitted = db.execute("SELECT count(*) FROM outbox_job WHERE id > %s", [last_job]).fetchone()
                assert uncommitted == (0,), "the batch's jobs are visible before it commits"
        system.wait_idle(timeout=60)

        jobs = db.execute(
            """SELECT j.coalescing_key, j.status::text, j.attempts, count(r.id)
                 FROM outbox_job j JOIN outbox_request r ON r.job_id = j.id
                WHERE j.id > %s GROUP BY j.id ORDER BY j.coalescing_key""",
            [last_job],
        ).fetchall()
        assert sorted(jobs) == sorted(
            (f"property:{p}", "done", 1, MUTATIONS // spread) for p in property_ids
        ), "each property's requests joined one job, run once"
        for property_id in property_ids:
            assert history_count(db, property_id) == 2, "provisioning, then one run for the whole batch"
            assert assert_fresh_score(db, property_id) > 0
        assert_invariants(db)
