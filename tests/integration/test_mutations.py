"""The domain mutations against real PostgreSQL (G1, G4, R-A5).

Every trigger site must change its data, audit it, ask for exactly one recalculation and mark
the property pending, all in one transaction; a replayed correlation id and every refused input
must leave the database exactly as it was. "One transaction" is checked on the rows themselves:
every row a mutation writes carries the same xmin (the id of the transaction that wrote it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox.backoff import RetryPolicy
from services.documents import (
    MAX_DOCUMENTS_PER_REQUEST,
    NewDocument,
    add_documents,
    apply_ai_suggestion,
    delete_document,
    reject_document,
    verify_document,
)
from services.errors import (
    ClientNotFound,
    DocumentNotFound,
    DuplicateRequest,
    InvalidInput,
    InvalidTransition,
    PropertyNotFound,
    ServiceError,
)
from services.properties import NewProperty, create_property, provision_client
from services.recalc_requests import request_manual_recalculation
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from services.scoring import DocumentStatus
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import ADMIN, cid, new_document, provision, upload

TODAY = date(2026, 3, 2)
CLIENT = Actor(ActorType.CLIENT, "client-1")
AI = Actor.system("extractor")
POLICY = RecalculationPolicy(
    lease_seconds=30,
    retry=RetryPolicy(base_seconds=10, max_seconds=600),
    infra_retry=RetryPolicy(base_seconds=1, max_seconds=30),
    busy_retry_seconds=0.25,
    lock_timeout_ms=2000,
)
NO_SUCH_ID = 987654321


@dataclass(frozen=True)
class World:
    """A scored property, not pending, with no waiting job, and one document in each state a
    mutation cares about."""

    property_id: int
    client_id: int
    pending_document: int
    verified_document: int
    deleted_document: int


@pytest.fixture
def db(module_database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(module_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def world(db: psycopg.Connection, module_database_url: str) -> World:
    return build_world(db, module_database_url)


@pytest.fixture(scope="module")
def untouched_world(module_database_url: str) -> World:
    """One world for the tests that must change nothing: each checks that it did not."""
    with psycopg.connect(module_database_url, autocommit=True) as db:
        return build_world(db, module_database_url)


def build_world(db: psycopg.Connection, module_database_url: str) -> World:
    [property_id] = provision(db)
    upload(db, property_id, new_document("gas_safety"), new_document("eicr"), new_document("epc"))
    pending, verified, deleted = [
        r["id"] for r in rows(db, "SELECT id FROM documents WHERE property_id = %s ORDER BY id", property_id)]
    verify_document(db, document_id=verified, actor=ADMIN, correlation_id=cid())
    delete_document(db, document_id=deleted, actor=ADMIN, trigger=TriggerReason.ADMIN_DELETE, correlation_id=cid())
    [job] = rows(db, "SELECT id FROM outbox_job WHERE status = 'pending' AND coalescing_key = %s",
                 f"property:{property_id}")
    recalculator = Recalculator(connection=lambda: psycopg.connect(module_database_url), policy=POLICY,
                                today=lambda: TODAY)
    assert isinstance(recalculator.run(job["id"]), Applied)
    client_id = prop(db, property_id)["client_id"]
    assert prop(db, property_id)["compliance_score_pending"] is False
    return World(property_id, client_id, pending, verified, deleted)


def rows(db: psycopg.Connection, sql: str, *params: Any) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def prop(db: psycopg.Connection, property_id: int) -> dict[str, Any]:
    [row] = rows(db, "SELECT * FROM properties WHERE id = %s", property_id)
    return row


def document(db: psycopg.Connection, document_id: int) -> dict[str, Any]:
    [row] = rows(db, "SELECT * FROM documents WHERE id = %s", document_id)
    return row


def everything(db: psycopg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row a mutation could write, to show that a refused one wrote none."""
    tables = ("clients", "properties", "documents", "audit_log", "outbox_job", "outbox_request",
              "property_compliance_score_history")
    return {t: rows(db, f"SELECT * FROM {t} ORDER BY id") for t in tables}


def xmin(db: psycopg.Connection, table: str, row_id: int) -> str:
    [row] = rows(db, f"SELECT xmin::text AS x FROM {table} WHERE id = %s", row_id)
    return row["x"]


def assert_recorded_in_one_transaction(
    db: psycopg.Connection,
    *,
    property_id: int,
    correlation_id: str,
    trigger: TriggerReason,
    actor: Actor,
    action: str,
    job_id: int,
    data: tuple[tuple[str, int], ...] = (),
) -> dict[str, Any]:
    """The mutation's audit row, after checking its request, its job, pending and atomicity."""
    key = f"property:{property_id}"
    [request] = rows(db, "SELECT * FROM outbox_request WHERE correlation_id = %s AND coalescing_key = %s",
                     correlation_id, key)
    assert (request["job_id"], request["trigger_reason"], request["actor_type"], request["actor_id"]) == (
        job_id, str(trigger), str(actor.type), actor.id)
    [job] = rows(db, "SELECT * FROM outbox_job WHERE id = %s", job_id)
    assert (job["status"], job["attempts"], job["coalescing_key"], job["payload"]) == (
        "pending", 0, key, {"property_id": property_id})
    assert len(rows(db, "SELECT 1 FROM outbox_request WHERE job_id = %s", job_id)) == 1, "exactly one request"
    [entry] = rows(db, "SELECT * FROM audit_log WHERE action = %s AND correlation_id = %s AND property_id = %s",
                   action, correlation_id, property_id)
    p = prop(db, property_id)
    assert (entry["actor_type"], entry["actor_id"], entry["client_id"]) == (str(actor.type), actor.id, p["client_id"])
    assert p["compliance_score_pending"] is True

    written = {("properties", property_id), ("outbox_job", job_id), ("outbox_request", request["id"]),
               ("audit_log", entry["id"]), *data}
    transactions = {xmin(db, table, row_id) for table, row_id in written}
    assert len(transactions) == 1, f"written by more than one transaction: {sorted(written)}"
    return entry


# -- each mutation --------------------------------------------------------------------------------

def test_create_property_inserts_it_audits_it_and_queues_its_first_score_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    created = create_property(db, client_id=world.client_id, new=NewProperty("  Flat 2 ", has_gas_supply=False),
                              actor=ADMIN, correlation_id=correlation_id)

    p = prop(db, created.property_id)
    assert (p["client_id"], p["name"], p["has_gas_supply"], p["compliance_score"]) == (
        world.client_id, "Flat 2", False, None)
    assert_recorded_in_one_transaction(
        db, property_id=created.property_id, correlation_id=correlation_id, trigger=TriggerReason.PROPERTY_CREATE,
        actor=ADMIN, action="PROPERTY_CREATED", job_id=created.job_id)


def test_provision_client_creates_the_client_and_queues_each_property_in_one_transaction(
    db: psycopg.Connection,
) -> None:
    correlation_id = cid()
    provisioned = provision_client(db, name=" Acme Lettings ", properties=[NewProperty("A"), NewProperty("B", False)],
                                   actor=ADMIN, correlation_id=correlation_id)

    [client] = rows(db, "SELECT * FROM clients WHERE id = %s", provisioned.client_id)
    assert client["name"] == "Acme Lettings"
    assert len({c.job_id for c in provisioned.properties}) == 2, "each property has a job of its own"
    for created, (name, gas) in zip(provisioned.properties, [("A", True), ("B", False)], strict=True):
        p = prop(db, created.property_id)
        assert (p["client_id"], p["name"], p["has_gas_supply"]) == (provisioned.client_id, name, gas)
        assert_recorded_in_one_transaction(
            db, property_id=created.property_id, correlation_id=correlation_id, trigger=TriggerReason.PROVISIONING,
            actor=ADMIN, action="PROPERTY_CREATED", job_id=created.job_id, data=(("clients", client["id"]),))
    [entry] = rows(db, "SELECT * FROM audit_log WHERE action = 'CLIENT_PROVISIONED' AND correlation_id = %s",
                   correlation_id)
    assert (entry["client_id"], entry["correlation_id"], entry["details"]) == (
        provisioned.client_id, correlation_id, {"property_ids": [c.property_id for c in provisioned.properties]})
    assert xmin(db, "audit_log", entry["id"]) == xmin(db, "clients", client["id"])


def test_a_single_upload_adds_the_document_and_queues_one_recalculation_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    new = new_document("legionella", TODAY + timedelta(days=90))
    added = add_documents(db, property_id=world.property_id, documents=[new], source="client", actor=CLIENT,
                          trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=correlation_id)

    [document_id] = added.document_ids
    d = document(db, document_id)
    assert (d["property_id"], d["requirement_code"], d["status"], d["expires_at"], d["file_name"], d["size_bytes"],
            d["sha256"], d["source"], d["deleted_at"]) == (
        world.property_id, "legionella", "pending_verification", new.expires_at, new.file_name, new.size_bytes,
        new.sha256, "client", None)
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.CLIENT_UPLOAD,
        actor=CLIENT, action="DOCUMENT_UPLOADED", job_id=added.job_id, data=(("documents", document_id),))
    assert entry["details"] == {"document_ids": [document_id], "trigger": "client_upload"}


def test_a_bulk_upload_adds_every_document_and_still_queues_one_recalculation(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    documents = [new_document(code) for code in ("smoke_co_alarms", "fire_risk_assessment", "legionella")]
    added = add_documents(db, property_id=world.property_id, documents=documents, source="admin", actor=ADMIN,
                          trigger=TriggerReason.CLIENT_BULK_UPLOAD, correlation_id=correlation_id)

    assert len(added.document_ids) == 3
    assert [document(db, i)["requirement_code"] for i in added.document_ids] == [
        "smoke_co_alarms", "fire_risk_assessment", "legionella"]
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.CLIENT_BULK_UPLOAD,
        actor=ADMIN, action="DOCUMENT_UPLOADED", job_id=added.job_id,
        data=tuple(("documents", i) for i in added.document_ids))
    assert entry["details"]["document_ids"] == list(added.document_ids)


def test_delete_document_soft_deletes_it_and_queues_one_recalculation_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    changed = delete_document(db, document_id=world.pending_document, actor=CLIENT,
                              trigger=TriggerReason.CLIENT_DELETE, correlation_id=correlation_id)

    assert document(db, world.pending_document)["deleted_at"] is not None
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.CLIENT_DELETE,
        actor=CLIENT, action="DOCUMENT_DELETED", job_id=changed.job_id,
        data=(("documents", world.pending_document),))
    assert entry["details"] == {"document_id": world.pending_document, "trigger": "client_delete"}


def test_verify_document_marks_it_verified_and_queues_one_recalculation_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    changed = verify_document(db, document_id=world.pending_document, actor=ADMIN, correlation_id=correlation_id)

    assert document(db, world.pending_document)["status"] == "verified"
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.VERIFY,
        actor=ADMIN, action="DOCUMENT_VERIFIED", job_id=changed.job_id,
        data=(("documents", world.pending_document),))
    assert entry["details"] == {"document_id": world.pending_document, "from": "pending_verification",
                                "to": "verified", "reason": None}


def test_reject_document_records_the_reason_and_queues_one_recalculation_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    changed = reject_document(db, document_id=world.verified_document, reason="  illegible scan ", actor=ADMIN,
                              correlation_id=correlation_id)

    d = document(db, world.verified_document)
    assert (d["status"], d["rejection_reason"]) == ("rejected", "illegible scan")
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.REJECT,
        actor=ADMIN, action="DOCUMENT_REJECTED", job_id=changed.job_id,
        data=(("documents", world.verified_document),))
    assert entry["details"] == {"document_id": world.verified_document, "from": "verified", "to": "rejected",
                                "reason": "illegible scan"}


def test_apply_ai_suggestion_rewrites_type_and_expiry_and_queues_one_recalculation_in_one_transaction(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    expires = TODAY + timedelta(days=365)
    changed = apply_ai_suggestion(db, document_id=world.pending_document, requirement_code="epc",
                                  expires_at=expires, actor=AI, correlation_id=correlation_id)

    d = document(db, world.pending_document)
    assert (d["requirement_code"], d["expires_at"], d["source"]) == ("epc", expires, "ai")
    entry = assert_recorded_in_one_transaction(
        db, property_id=world.property_id, correlation_id=correlation_id, trigger=TriggerReason.AI_APPLY,
        actor=AI, action="AI_SUGGESTION_APPLIED", job_id=changed.job_id,
        data=(("documents", world.pending_document),))
    assert entry["details"] == {
        "document_id": world.pending_document,
        "before": {"requirement_code": "gas_safety", "expires_at": None},
        "after": {"requirement_code": "epc", "expires_at": expires.isoformat()},
    }


def test_a_manual_recalculation_queues_one_request_and_marks_the_property_pending(
    db: psycopg.Connection, world: World
) -> None:
    correlation_id = cid()
    before = prop(db, world.property_id)

    job_id = request_manual_recalculation(db, world.property_id, actor=ADMIN, correlation_id=correlation_id)

    [request] = rows(db, "SELECT * FROM outbox_request WHERE correlation_id = %s", correlation_id)
    assert (request["job_id"], request["trigger_reason"], request["actor_type"], request["actor_id"]) == (
        job_id, "manual_recalculation", "admin", "admin-1")
    [job] = rows(db, "SELECT * FROM outbox_job WHERE id = %s", job_id)
    assert (job["status"], job["payload"]) == ("pending", {"property_id": world.property_id})
    after = prop(db, world.property_id)
    assert after["generation"] == before["generation"] + 1
    assert after["compliance_score_pending"] is True
    assert after["compliance_score"] == before["compliance_score"], "asking changes no data"
    assert xmin(db, "properties", world.property_id) == xmin(db, "outbox_job", job_id) == xmin(
        db, "outbox_request", request["id"])


def test_a_mutation_inside_a_transaction_its_caller_rolls_back_leaves_nothing_behind(
    db: psycopg.Connection, world: World
) -> None:
    before = everything(db)

    with db.transaction():
        add_documents(db, property_id=world.property_id, documents=[new_document("epc")], source="client",
                      actor=CLIENT, trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=cid())
        verify_document(db, document_id=world.pending_document, actor=ADMIN, correlation_id=cid())
        raise psycopg.Rollback()

    assert everything(db) == before


# -- replays (G4) ---------------------------------------------------------------------------------

Mutation = Callable[[psycopg.Connection, World, str], int]


def _create(db: psycopg.Connection, w: World, c: str) -> int:
    return create_property(db, client_id=w.client_id, new=NewProperty("Flat 9"), actor=ADMIN,
                           correlation_id=c).job_id


def _provision(db: psycopg.Connection, w: World, c: str) -> int:
    return provision_client(db, name="Replay Ltd", properties=[NewProperty("R1"), NewProperty("R2")], actor=ADMIN,
                            correlation_id=c).properties[0].job_id


def _upload(db: psycopg.Connection, w: World, c: str) -> int:
    return add_documents(db, property_id=w.property_id, documents=[new_document("epc")], source="client",
                         actor=CLIENT, trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=c).job_id


def _bulk_upload(db: psycopg.Connection, w: World, c: str) -> int:
    return add_documents(db, property_id=w.property_id, documents=[new_document("epc"), new_document("eicr")],
                         source="client", actor=CLIENT, trigger=TriggerReason.CLIENT_ZIP_UPLOAD,
                         correlation_id=c).job_id


def _delete(db: psycopg.Connection, w: World, c: str) -> int:
    return delete_document(db, document_id=w.pending_document, actor=CLIENT, trigger=TriggerReason.CLIENT_DELETE,
                           correlation_id=c).job_id


def _verify(db: psycopg.Connection, w: World, c: str) -> int:
    return verify_document(db, document_id=w.pending_document, actor=ADMIN, correlation_id=c).job_id


def _reject(db: psycopg.Connection, w: World, c: str) -> int:
    return reject_document(db, document_id=w.pending_document, reason="expired copy", actor=ADMIN,
                           correlation_id=c).job_id


def _apply_ai(db: psycopg.Connection, w: World, c: str) -> int:
    return apply_ai_suggestion(db, document_id=w.pending_document, requirement_code="eicr",
                               expires_at=TODAY + timedelta(days=30), actor=AI, correlation_id=c).job_id


def _manual(db: psycopg.Connection, w: World, c: str) -> int:
    return request_manual_recalculation(db, w.property_id, actor=ADMIN, correlation_id=c)


MUTATIONS: dict[str, Mutation] = {
    "create_property": _create,
    "provision_client": _provision,
    "upload": _upload,
    "bulk_upload": _bulk_upload,
    "delete_document": _delete,
    "verify_document": _verify,
    "reject_document": _reject,
    "apply_ai_suggestion": _apply_ai,
    "manual_recalculation": _manual,
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_replaying_a_correlation_id_raises_duplicate_request_and_changes_nothing(
    db: psycopg.Connection, world: World, mutate: Mutation
) -> None:
    correlation_id = cid()
    first_job = mutate(db, world, correlation_id)
    before = everything(db)

    with pytest.raises(DuplicateRequest) as replay:
        mutate(db, world, correlation_id)

    assert (replay.value.correlation_id, replay.value.job_id) == (correlation_id, first_job)
    assert everything(db) == before


@pytest.mark.parametrize(
    ("mutate", "requests", "audit_rows"),
    [(_create, 1, 1), (_provision, 2, 3), (_upload, 1, 1)],
    ids=["create_property", "provision_client", "upload"],
)
def test_two_concurrent_requests_with_one_correlation_id_are_accepted_once(
    db: psycopg.Connection, module_database_url: str, world: World, mutate: Mutation, requests: int, audit_rows: int
) -> None:
    correlation_id = cid()
    together = threading.Barrier(2, timeout=10)

    def send() -> int | DuplicateRequest:
        with psycopg.connect(module_database_url, autocommit=True) as own:
            together.wait()
            try:
                return mutate(own, world, correlation_id)
            except DuplicateRequest as replay:
                return replay

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [f.result(timeout=10) for f in [pool.submit(send) for _ in range(2)]]

    [accepted] = [r for r in results if isinstance(r, int)]
    [refused] = [r for r in results if isinstance(r, DuplicateRequest)]
    assert refused.job_id == accepted
    assert len(rows(db, "SELECT 1 FROM outbox_request WHERE correlation_id = %s", correlation_id)) == requests
    assert len(rows(db, "SELECT 1 FROM audit_log WHERE correlation_id = %s", correlation_id)) == audit_rows


# -- refused input --------------------------------------------------------------------------------

def _doc(**overrides: Any) -> NewDocument:
    fields = {"requirement_code": "epc", "file_name": "epc.pdf", "size_bytes": 10, "sha256": "a" * 64} | overrides
    return NewDocument(**fields)


def _add(w: World, documents: list[NewDocument], source: str = "client", property_id: int | None = None) -> Mutation:
    return lambda db, _w, c: add_documents(
        db, property_id=property_id or w.property_id, documents=documents, source=source, actor=CLIENT,
        trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=c).job_id


REFUSALS: dict[str, tuple[Callable[[World], Mutation], type[ServiceError], str]] = {
    "unknown requirement code": (lambda w: _add(w, [_doc(requirement_code="asbestos")]), InvalidInput,
                                 "requirement_code must be one of"),
    "bad sha256": (lambda w: _add(w, [_doc(sha256="A" * 64)]), InvalidInput, "sha256 must be 64 lowercase"),
    "one bad document in a bulk upload": (lambda w: _add(w, [_doc(), _doc(size_bytes=-1)]), InvalidInput,
                                          "size_bytes must be a non-negative integer"),
    "empty file name": (lambda w: _add(w, [_doc(file_name="")]), InvalidInput, "file_name must be 1 to 255"),
    "expiry that is not a date": (lambda w: _add(w, [_doc(expires_at="2027-01-01")]), InvalidInput,
                                  "expires_at must be a date"),
    "no documents": (lambda w: _add(w, []), InvalidInput, "at least one document"),
    "too many documents": (lambda w: _add(w, [_doc()] * (MAX_DOCUMENTS_PER_REQUEST + 1)), InvalidInput,
                           f"at most {MAX_DOCUMENTS_PER_REQUEST} documents"),
    "unknown source": (lambda w: _add(w, [_doc()], source="email"), InvalidInput, "source must be one of"),
    "empty rejection reason": (
        lambda w: lambda db, _w, c: reject_document(db, document_id=w.pending_document, reason="   ", actor=ADMIN,
                                                    correlation_id=c).job_id,
        InvalidInput, "a rejection needs a reason"),
    "ai suggestion with unknown requirement code": (
        lambda w: lambda db, _w, c: apply_ai_suggestion(db, document_id=w.pending_document, requirement_code="gas",
                                                        expires_at=None, actor=AI, correlation_id=c).job_id,
        InvalidInput, "requirement_code must be one of"),
    "empty property name": (
        lambda w: lambda db, _w, c: create_property(db, client_id=w.client_id, new=NewProperty("  "), actor=ADMIN,
                                                    correlation_id=c).job_id,
        InvalidInput, "property name must be 1 to 200"),
    "empty client name": (
        lambda w: lambda db, _w, c: provision_client(db, name="", properties=[NewProperty("P")], actor=ADMIN,
                                                     correlation_id=c).client_id,
        InvalidInput, "client name must be 1 to 200"),
    "verify a deleted document": (
        lambda w: lambda db, _w, c: verify_document(db, document_id=w.deleted_document, actor=ADMIN,
                                                    correlation_id=c).job_id,
        DocumentNotFound, "does not exist or was deleted"),
    "delete a deleted document": (
        lambda w: lambda db, _w, c: delete_document(db, document_id=w.deleted_document, actor=ADMIN,
                                                    trigger=TriggerReason.ADMIN_DELETE, correlation_id=c).job_id,
        DocumentNotFound, "does not exist or was deleted"),
    "verify an already verified document": (
        lambda w: lambda db, _w, c: verify_document(db, document_id=w.verified_document, actor=ADMIN,
                                                    correlation_id=c).job_id,
        InvalidTransition, "is already verified"),
    "upload to an unknown property": (lambda w: _add(w, [_doc()], property_id=NO_SUCH_ID), PropertyNotFound,
                                      f"property {NO_SUCH_ID} does not exist"),
    "verify an unknown document": (
        lambda w: lambda db, _w, c: verify_document(db, document_id=NO_SUCH_ID, actor=ADMIN,
                                                    correlation_id=c).job_id,
        DocumentNotFound, f"document {NO_SUCH_ID} does not exist"),
    "create a property for an unknown client": (
        lambda w: lambda db, _w, c: create_property(db, client_id=NO_SUCH_ID, new=NewProperty("P"), actor=ADMIN,
                                                    correlation_id=c).job_id,
        ClientNotFound, f"client {NO_SUCH_ID} does not exist"),
    "recalculate an unknown property": (
        lambda w: lambda db, _w, c: request_manual_recalculation(db, NO_SUCH_ID, actor=ADMIN, correlation_id=c),
        PropertyNotFound, f"property {NO_SUCH_ID} does not exist"),
}


@pytest.mark.parametrize(("build", "error", "rule"), REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_mutation_names_its_rule_and_leaves_no_row_and_no_job_behind(
    db: psycopg.Connection, untouched_world: World, build: Callable[[World], Mutation], error: type[ServiceError],
    rule: str,
) -> None:
    world = untouched_world
    before = everything(db)

    with pytest.raises(error, match=rule):
        build(world)(db, world, cid())

    assert everything(db) == before
    assert not rows(db, "SELECT 1 FROM outbox_job WHERE status = 'pending' AND coalescing_key = %s",
                    f"property:{world.property_id}")
    assert prop(db, world.property_id)["compliance_score_pending"] is False


def test_the_refusals_ran_against_documents_in_the_states_they_rely_on(
    db: psycopg.Connection, untouched_world: World
) -> None:
    """Guards the refusal tests against passing for the wrong reason (e.g. a document that was
    never verified making "already verified" unreachable). Runs after them, on their world."""
    world = untouched_world
    assert document(db, world.pending_document)["status"] == DocumentStatus.PENDING_VERIFICATION
    assert document(db, world.verified_document)["status"] == DocumentStatus.VERIFIED
    assert document(db, world.deleted_document)["deleted_at"] is not None
    assert prop(db, world.property_id)["compliance_score_pending"] is False
