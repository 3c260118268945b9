"""R-A9 end to end: triggers enqueue, workers score, failures retry then die audited, drift is
audited. Real relay and Celery worker subprocesses, real PostgreSQL, both brokers."""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import date, timedelta

import psycopg

from outbox import lifecycle
from services.documents import (
    DocumentChanged,
    DocumentSource,
    NewDocument,
    add_documents,
    apply_ai_suggestion,
    delete_document,
    reject_document,
    verify_document,
)
from services.properties import NewProperty, create_property, provision_client
from services.recalc_requests import request_manual_recalculation
from services.scoring import DocumentStatus
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import ADMIN, cid, new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.observe import (
    assert_fresh_score,
    audit_rows,
    connect,
    history_count,
    job,
    job_status,
    property_row,
    queue_rows,
)
from tests.harness.system import System, wait_until

CLIENT = Actor(ActorType.CLIENT, "client-7")
AI = Actor.system("ai-extractor")
FAR = date(2031, 6, 30)

#: Runs one trigger under a correlation id; answers the property it changed and the job it joined.
Trigger = Callable[[str], tuple[int, int]]


def test_an_upload_enqueues_one_request_sets_pending_and_the_worker_applies_the_formula_once(
    system: System, database_url: str
) -> None:
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        system.start_worker()
        relay = system.start_relay()
        system.wait_idle()
        assert_fresh_score(conn, property_id)
        system.kill(relay, signal.SIGTERM)  # hold the upload's job in the outbox to look at it

        correlation_id = cid()
        job_id = upload(
            conn, property_id,
            new_document("gas_safety", FAR, DocumentStatus.VERIFIED),
            new_document("eicr", FAR, DocumentStatus.PENDING_VERIFICATION),
            correlation_id=correlation_id,
        )
        [request] = queue_rows(conn, correlation_id)
        assert (request["property_id"], request["trigger_reason"], request["status"]) == (
            property_id, "client_upload", "pending"
        )
        requests_of_job = conn.execute(
            "SELECT count(*) FROM outbox_request WHERE job_id = %s", [job_id]
        ).fetchone()
        assert requests_of_job == (1,)
        assert property_row(conn, property_id)["compliance_score_pending"] is True

        system.start_relay()
        system.wait_idle()

        assert job_status(conn, job_id) == "done"
        assert assert_fresh_score(conn, property_id) == 35  # 25 verified gas + 0.5 x 20 eicr
        snapshots = conn.execute(
            "SELECT score, generation FROM property_compliance_score_history WHERE job_id = %s", [job_id]
        ).fetchall()
        assert snapshots == [(35, property_row(conn, property_id)["generation"])]
        [updated] = [
            a for a in audit_rows(conn, "COMPLIANCE_SCORE_UPDATED", property_id) if a["job_id"] == job_id
        ]
        assert updated["correlation_id"] == correlation_id
        assert updated["details"]["score"] == 35
        assert [r["correlation_id"] for r in updated["details"]["requests"]] == [correlation_id]
        assert updated["details"]["requests"][0]["trigger_reason"] == "client_upload"
        assert_invariants(conn)


def test_every_domain_trigger_enqueues_with_its_reason_and_actor_and_ends_with_a_correct_score(
    system: System, database_url: str
) -> None:
    system.start_worker()
    system.start_relay()
    with connect(database_url) as conn:
        state: dict[str, int] = {}

        def provisioning(correlation_id: str) -> tuple[int, int]:
            result = provision_client(conn, name="Acme Lettings", properties=[NewProperty("Flat 1")],
                                      actor=ADMIN, correlation_id=correlation_id)
            state["client"] = result.client_id
            state["property"] = result.properties[0].property_id
            return state["property"], result.properties[0].job_id

        def property_create(correlation_id: str) -> tuple[int, int]:
            created = create_property(conn, client_id=state["client"], new=NewProperty("Flat 2", has_gas_supply=False),
                                      actor=ADMIN, correlation_id=correlation_id)
            return created.property_id, created.job_id

        def uploading(trigger: TriggerReason, actor: Actor, source: str, *documents: NewDocument) -> Trigger:
            def run(correlation_id: str) -> tuple[int, int]:
                added = add_documents(conn, property_id=state["property"], documents=list(documents),
                                      source=source, actor=actor, trigger=trigger, correlation_id=correlation_id)
                state[trigger] = added.document_ids[0]
                return state["property"], added.job_id
            return run

        def changing(change: Callable[[str], DocumentChanged]) -> Trigger:
            def run(correlation_id: str) -> tuple[int, int]:
                changed = change(correlation_id)
                return changed.property_id, changed.job_id
            return run

        def manual(correlation_id: str) -> tuple[int, int]:
            return state["property"], request_manual_recalculation(
                conn, state["property"], actor=ADMIN, correlation_id=correlation_id
            )

        soon = date.today() + timedelta(days=10)
        triggers: list[tuple[str, Actor, Trigger]] = [
            ("provisioning", ADMIN, provisioning),
            ("property_create", ADMIN, property_create),
            ("client_upload", CLIENT, uploading(
                TriggerReason.CLIENT_UPLOAD, CLIENT, DocumentSource.CLIENT,
                new_document("gas_safety", FAR, DocumentStatus.VERIFIED))),
            ("client_bulk_upload", CLIENT, uploading(
                TriggerReason.CLIENT_BULK_UPLOAD, CLIENT, DocumentSource.CLIENT,
                new_document("eicr", FAR), new_document("epc", soon, DocumentStatus.VERIFIED),
                new_document("legionella", date(2001, 1, 1), DocumentStatus.VERIFIED))),
            ("client_zip_upload", CLIENT, uploading(
                TriggerReason.CLIENT_ZIP_UPLOAD, CLIENT, DocumentSource.CLIENT,
                new_document("smoke_co_alarms", FAR), new_document("fire_risk_assessment", None))),
            ("admin_upload", ADMIN, uploading(
                TriggerReason.ADMIN_UPLOAD, ADMIN, DocumentSource.ADMIN,
                new_document("fire_risk_assessment", FAR, DocumentStatus.VERIFIED))),
            ("verify", ADMIN, changing(lambda c: verify_document(
                conn, document_id=state[TriggerReason.CLIENT_BULK_UPLOAD], actor=ADMIN, correlation_id=c))),
            ("reject", ADMIN, changing(lambda c: reject_document(
                conn, document_id=state[TriggerReason.CLIENT_ZIP_UPLOAD], reason="illegible scan",
                actor=ADMIN, correlation_id=c))),
            ("ai_apply", AI, changing(lambda c: apply_ai_suggestion(
                conn, document_id=state[TriggerReason.CLIENT_UPLOAD], requirement_code="gas_safety",
                expires_at=soon, actor=AI, correlation_id=c))),
            ("client_delete", CLIENT, changing(lambda c: delete_document(
                conn, document_id=state[TriggerReason.ADMIN_UPLOAD], actor=CLIENT,
                trigger=TriggerReason.CLIENT_DELETE, correlation_id=c))),
            ("admin_delete", ADMIN, changing(lambda c: delete_document(
                conn, document_id=state[TriggerReason.CLIENT_UPLOAD], actor=ADMIN,
                trigger=TriggerReason.ADMIN_DELETE, correlation_id=c))),
            ("manual_recalculation", ADMIN, manual),
        ]

        scores = []
        for reason, actor, trigger in triggers:
            correlation_id = cid()
            property_id, job_id = trigger(correlation_id)
            [row] = queue_rows(conn, correlation_id)
            assert (row["property_id"], row["trigger_reason"], row["actor_type"], row["actor_id"]) == (
                property_id, reason, str(actor.type), actor.id
            ), f"trigger {reason}: queue row {row}"
            system.wait_idle()
            assert job_status(conn, job_id) == "done", f"trigger {reason}: job {job(conn, job_id)}"
            applied = conn.execute(
                "SELECT generation FROM property_compliance_score_history WHERE job_id = %s", [job_id]
            ).fetchone()
            assert applied == (property_row(conn, property_id)["generation"],), f"trigger {reason}: stale run"
            scores.append((reason, assert_fresh_score(conn, property_id)))
        print("scores after each trigger:", scores)
        assert len({score for _, score in scores}) > 3, "the triggers should have moved the score around"
        assert_invariants(conn)


def test_a_recalculation_that_keeps_failing_retries_then_dies_audited_while_other_properties_flow(
    system: System, database_url: str
) -> None:
    with connect(database_url) as conn, psycopg.connect(database_url) as locker:
        blocked, other = provision(conn, n_properties=2)
        [blocked_job] = conn.execute(
            "SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{blocked}"]
        ).fetchone()
        # An open transaction holds the property's row lock: every attempt meets lock_timeout.
        locker.execute("SELECT id FROM properties WHERE id = %s FOR UPDATE", [blocked])

        system.start_worker(env={"RECALQ_LOCK_TIMEOUT_MS": "200"})
        system.start_relay()
        wait_until(lambda: job(conn, blocked_job)["attempts"] >= 1, 60, "the first failed attempt")
        other_job = upload(conn, other, new_document("epc", FAR, DocumentStatus.VERIFIED))
        wait_until(lambda: job_status(conn, other_job) == "done", 60, "the other property's recalculation")
        assert assert_fresh_score(conn, other) == 15
        wait_until(lambda: job_status(conn, blocked_job) == "dead", 90, "the blocked job to die")

        dead = job(conn, blocked_job)
        assert (dead["attempts"], dead["max_attempts"]) == (5, 5)
        assert "lock timeout" in dead["last_error"] and "55P03" in dead["last_error"], dead["last_error"]
        [failed] = audit_rows(conn, "COMPLIANCE_RECALC_FAILED", blocked)
        assert failed["job_id"] == blocked_job
        assert failed["details"]["attempts"] == 5
        assert "lock timeout" in failed["details"]["error"]
        [queued] = [r for r in queue_rows(conn, property_id=blocked) if r["status"] == "dead"]
        assert queued["attempts"] == 5 and "lock timeout" in queued["last_error"]
        assert property_row(conn, blocked)["compliance_score_pending"] is True
        assert history_count(conn, blocked) == 0
        assert_invariants(conn)  # a DEAD job may leave its property pending (I1), nothing else

        locker.rollback()
        with conn.transaction():
            assert lifecycle.requeue(conn, blocked_job) == blocked_job
        system.wait_idle()
        assert job_status(conn, blocked_job) == "done"
        assert assert_fresh_score(conn, blocked) == 0
        assert history_count(conn, blocked) == 1
        assert_invariants(conn)


def test_a_corrupted_stored_score_is_audited_as_drift_then_replaced_by_the_computed_one(
    system: System, database_url: str
) -> None:
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        upload(conn, property_id, new_document("gas_safety", FAR, DocumentStatus.VERIFIED),
               new_document("eicr", FAR, DocumentStatus.VERIFIED))
        system.start_worker()
        system.start_relay()
        system.wait_idle()
        assert assert_fresh_score(conn, property_id) == 45
        before = property_row(conn, property_id)

        # Same inputs, so the same fingerprint: nothing but corruption explains the new value.
        conn.execute("UPDATE properties SET compliance_score = 3 WHERE id = %s", [property_id])
        correlation_id = cid()
        job_id = request_manual_recalculation(conn, property_id, actor=ADMIN, correlation_id=correlation_id)
        system.wait_idle()

        [drift] = audit_rows(conn, "COMPLIANCE_SCORE_DRIFT_DETECTED", property_id)
        assert drift["job_id"] == job_id
        assert drift["correlation_id"] == correlation_id
        assert drift["details"]["stored_score"] == 3
        assert drift["details"]["computed_score"] == 45
        assert drift["details"]["applied_score"] == 45
        assert drift["details"]["as_of"] == before["compliance_as_of"].isoformat()
        assert assert_fresh_score(conn, property_id) == 45
        assert_invariants(conn)


def test_a_score_change_explained_by_new_inputs_is_not_drift(system: System, database_url: str) -> None:
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        system.start_worker()
        system.start_relay()
        system.wait_idle()
        assert assert_fresh_score(conn, property_id) == 0

        upload(conn, property_id, new_document("gas_safety", FAR, DocumentStatus.PENDING_VERIFICATION))
        system.wait_idle()
        [gas] = conn.execute(
            "SELECT id FROM documents WHERE property_id = %s AND deleted_at IS NULL", [property_id]
        ).fetchone()
        verify_document(conn, document_id=gas, actor=ADMIN, correlation_id=cid())
        system.wait_idle()
        assert assert_fresh_score(conn, property_id) == 25
        request_manual_recalculation(conn, property_id, actor=ADMIN, correlation_id=cid())
        system.wait_idle()

        assert history_count(conn, property_id) == 4
        assert audit_rows(conn, "COMPLIANCE_SCORE_DRIFT_DETECTED", property_id) == []
        assert assert_fresh_score(conn, property_id) == 25
        assert_invariants(conn)
