"""The recalculation service against real PostgreSQL, driven in-process (G2, G4, G5, G6).

Each test runs jobs by id as a worker would, through a Recalculator whose probe and connection
factory are in the test's hands. A probe that pauses at a named point, or a factory that holds
an attempt's connection back, creates the exact interleavings (a mutation during a run, a
takeover of a slow attempt, a lock held elsewhere, a backend killed mid-transaction) that decide
whether the guarantees hold. No mocks: every failure is a real database error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import outbox
from outbox import lifecycle
from outbox.backoff import RetryPolicy
from outbox.history import attempts_of_job
from services.documents import verify_document
from services.recalc_requests import request_manual_recalculation
from services.recalculation import Applied, Dead, Dropped, RecalculationPolicy, Recalculator, RetryLater
from services.scoring import Document, DocumentStatus, ScoringInputs, score
from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import ADMIN, cid, new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.system import wait_until

TODAY = date(2026, 3, 2)
#: The longest any wait here may take before the test counts it as a hang.
TIMEOUT = 10.0
HALF = 0.5  # the recalculator's "random" draw: jitter lands on the nominal delay

POLICY = RecalculationPolicy(
    lease_seconds=30,
    retry=RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2),
    infra_retry=RetryPolicy(base_seconds=1, max_seconds=30, jitter=0.2),
    busy_retry_seconds=0.25,
    lock_timeout_ms=2000,
)
UNREACHABLE = "host=127.0.0.1 port=1 dbname=nowhere user=postgres connect_timeout=2"


# -- test machinery -------------------------------------------------------------------------------

class Checkpoint:
    """A place where a run stops until the test lets it go; `reached` says it got there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.release = threading.Event()

    def stop_here(self) -> None:
        self.reached.set()
        if not self.release.wait(TIMEOUT):
            raise AssertionError(f"the test never released {self.name}")

    def wait_reached(self) -> None:
        assert self.reached.wait(TIMEOUT), f"the run never reached {self.name}"


class Probe:
    """The recalculator's probe: at each named point, pause once and/or run an action."""

    def __init__(self) -> None:
        self.pauses: dict[str, Checkpoint] = {}
        self.actions: dict[str, Callable[[], None]] = {}

    def pause_at(self, point: str) -> Checkpoint:
        self.pauses[point] = Checkpoint(point)
        return self.pauses[point]

    def __call__(self, point: str) -> None:
        if point in self.actions:
            self.actions.pop(point)()
        if point in self.pauses:
            self.pauses.pop(point).stop_here()


class Connections:
    """The recalculator's connection factory: a real connection per transaction.

    Records each connection's backend pid (so a test can see who blocks whom, or terminate
    one), can hold the n-th connection back (so a test acts between an attempt's start and its
    apply, as a worker waiting for a pooled connection would), and can send the n-th to an
    address where no database listens (a real OperationalError, no mock).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.pids: list[int] = []
        self._held: dict[int, Checkpoint] = {}
        self._refused: set[int] = set()
        self._calls = 0
        self._lock = threading.Lock()

    def hold(self, call: int) -> Checkpoint:
        self._held[call] = Checkpoint(f"connection #{call}")
        return self._held[call]

    def refuse(self, *calls: int) -> None:
        self._refused.update(calls)

    def __call__(self) -> Any:
        return self._connect()

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            call = self._calls
            self._calls += 1
        if call in self._held:
            self._held[call].stop_here()
        url = UNREACHABLE if call in self._refused else self.url
        with psycopg.connect(url) as conn:
            self.pids.append(conn.info.backend_pid)
            yield conn


MakeRecalculator = Callable[..., Recalculator]


@pytest.fixture
def db(conn: psycopg.Connection) -> psycopg.Connection:
    """The test's own view of the database: every statement commits and sees the latest commits."""
    conn.autocommit = True
    return conn


@pytest.fixture
def make_recalculator(database_url: str) -> MakeRecalculator:
    def make(
        *,
        connections: Connections | None = None,
        probe: Callable[[str], None] | None = None,
        policy: RecalculationPolicy = POLICY,
        today: Callable[[], date] = lambda: TODAY,
    ) -> Recalculator:
        return Recalculator(
            connection=connections or Connections(database_url),
            policy=policy,
            today=today,
            probe=probe or Probe(),
            rand=lambda: HALF,
        )

    return make


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="recalc-test") as pool:
        yield pool


def one(db: psycopg.Connection, sql: str, *params: Any) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql, params).fetchone()
    assert row is not None, sql
    return row


def rows(db: psycopg.Connection, sql: str, *params: Any) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def job(db: psycopg.Connection, job_id: int) -> dict[str, Any]:
    return one(db, "SELECT * FROM outbox_job WHERE id = %s", job_id)


def prop(db: psycopg.Connection, property_id: int) -> dict[str, Any]:
    return one(db, "SELECT * FROM properties WHERE id = %s", property_id)


def waiting_job(db: psycopg.Connection, property_id: int) -> int:
    [row] = rows(
        db,
        "SELECT id FROM outbox_job WHERE coalescing_key = %s AND status IN ('pending', 'published', 'retrying')",
        f"property:{property_id}",
    )
    return row["id"]


def snapshots(db: psycopg.Connection, property_id: int) -> list[dict[str, Any]]:
    return rows(db, "SELECT * FROM property_compliance_score_history WHERE property_id = %s ORDER BY id",
                property_id)


def audits(db: psycopg.Connection, action: str, **where: Any) -> list[dict[str, Any]]:
    clauses = "".join(f" AND {column} = %s" for column in where)
    return rows(db, f"SELECT * FROM audit_log WHERE action = %s{clauses} ORDER BY id",
                action, *where.values())


def inputs_of(db: psycopg.Connection, property_id: int) -> ScoringInputs:
    docs = rows(db, "SELECT id, requirement_code, status, expires_at FROM documents "
                    "WHERE property_id = %s AND deleted_at IS NULL", property_id)
    return ScoringInputs.of(
        prop(db, property_id)["has_gas_supply"],
        [Document(d["id"], d["requirement_code"], DocumentStatus(d["status"]), d["expires_at"]) for d in docs],
    )


def advisory_locks_here(db: psycopg.Connection) -> int:
    return one(db, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
                   "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")["n"]


def blocked_by(db: psycopg.Connection, pid: int) -> list[int]:
    return one(db, "SELECT pg_blocking_pids(%s) AS pids", pid)["pids"]


def new_property(db: psycopg.Connection) -> tuple[int, int]:
    """A provisioned property and the job that will give it its first score."""
    [property_id] = provision(db)
    return property_id, waiting_job(db, property_id)


def scored_property(db: psycopg.Connection, make: MakeRecalculator, *documents: Any) -> int:
    property_id, job_id = new_property(db)
    if documents:
        upload(db, property_id, *documents)
    assert isinstance(make().run(job_id), Applied)
    return property_id


def manual_recalculation(db: psycopg.Connection, property_id: int) -> int:
    return request_manual_recalculation(db, property_id, actor=ADMIN, correlation_id=cid())


# -- applying a score -----------------------------------------------------------------------------

def test_a_run_stores_the_formula_score_once_with_its_snapshot_and_audit_row_and_clears_pending(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    property_id, job_id = new_property(db)
    upload_cid = cid()
    upload(
        db, property_id,
        new_document("gas_safety", TODAY + timedelta(days=200), DocumentStatus.VERIFIED),  # valid 25
        new_document("eicr", TODAY + timedelta(days=10), DocumentStatus.VERIFIED),  # expiring soon 0.7 x 20
        new_document("epc"),  # pending verification 0.5 x 15
        new_document("fire_risk_assessment", TODAY - timedelta(days=1), DocumentStatus.VERIFIED),  # expired
        correlation_id=upload_cid,
    )
    assert waiting_job(db, property_id) == job_id, "the upload joined the property's waiting job"
    provisioning_cid = rows(db, "SELECT correlation_id FROM outbox_request WHERE job_id = %s ORDER BY id",
                            job_id)[0]["correlation_id"]
    before = one(db, "SELECT now() AS t")["t"]

    outcome = make_recalculator().run(job_id)

    after = one(db, "SELECT now() AS t")["t"]
    inputs = inputs_of(db, property_id)
    want = score(inputs, TODAY)
    assert want.score == 47  # 25 + 14 + 7.5 of 100, half up
    assert outcome == Applied(job_id, property_id, 47, previous_score=None, drift_detected=False)

    p = prop(db, property_id)
    assert p["compliance_score"] == 47
    assert p["compliance_breakdown"] == want.breakdown()
    assert p["compliance_version"] == want.version
    assert p["compliance_as_of"] == TODAY
    assert p["compliance_inputs_fingerprint"] == inputs.fingerprint()
    assert before <= p["compliance_last_calculated_at"] <= after
    assert p["compliance_score_pending"] is False
    assert p["scored_generation"] == p["generation"] == 2  # provisioning + upload

    [snapshot] = snapshots(db, property_id)
    assert (snapshot["job_id"], snapshot["score"], snapshot["breakdown"], snapshot["version"], snapshot["as_of"],
            snapshot["inputs_fingerprint"], snapshot["generation"]) == (
        job_id, 47, want.breakdown(), want.version, TODAY, inputs.fingerprint(), 2)

    [updated] = audits(db, "COMPLIANCE_SCORE_UPDATED", property_id=property_id)
    assert (updated["job_id"], updated["actor_type"], updated["actor_id"], updated["correlation_id"]) == (
        job_id, "system", "recalq-worker", provisioning_cid)
    assert updated["details"]["score"] == 47
    assert updated["details"]["previous_score"] is None
    assert updated["details"]["attempt"] == 1
    assert updated["details"]["requests"] == [
        {"correlation_id": provisioning_cid, "trigger_reason": "provisioning", "actor_type": "admin",
         "actor_id": "admin-1"},
        {"correlation_id": upload_cid, "trigger_reason": "client_upload", "actor_type": "client",
         "actor_id": "client-1"},
    ]
    j = job(db, job_id)
    assert (j["status"], j["attempts"], j["lease_expires_at"]) == ("done", 1, None)
    assert j["finished_at"] is not None
    assert_invariants(db)


def test_a_mutation_during_a_run_waits_for_its_commit_and_leaves_the_property_pending_on_a_new_job(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str,
    background: ThreadPoolExecutor,
) -> None:
    property_id, job_a = new_property(db)
    generation_read = prop(db, property_id)["generation"]
    probe = Probe()
    paused = probe.pause_at("recalculation.after_read_state")
    connections = Connections(database_url)
    running = background.submit(make_recalculator(connections=connections, probe=probe).run, job_a)
    paused.wait_reached()
    apply_pid = connections.pids[-1]
    assert advisory_locks_here(db) == 0, "I6: the recalculation serialises on the row lock, not advisory locks"

    with psycopg.connect(database_url, autocommit=True) as mutator:
        mutator_pid = mutator.info.backend_pid
        mutation = background.submit(upload, mutator, property_id, new_document("gas_safety"))
        wait_until(lambda: apply_pid in blocked_by(db, mutator_pid), TIMEOUT,
                   "the mutation to wait on the recalculation's property lock")
        assert not mutation.done(), "the mutation committed while the recalculation still held the property"

        paused.release.set()
        outcome = running.result(TIMEOUT)
        job_b = mutation.result(TIMEOUT)

    assert outcome == Applied(job_a, property_id, 0, previous_score=None, drift_detected=False)
    [first] = snapshots(db, property_id)
    assert first["generation"] == generation_read, "the run scored the state it read, before the mutation"
    p = prop(db, property_id)
    assert (p["generation"], p["scored_generation"]) == (generation_read + 1, generation_read)
    assert p["compliance_score_pending"] is True, "the mutation is not reflected yet"
    assert job_b != job_a
    assert job(db, job_b)["status"] == "pending"
    assert [r["trigger_reason"] for r in rows(db, "SELECT * FROM outbox_request WHERE job_id = %s", job_b)] == [
        "client_upload"]

    assert make_recalculator().run(job_b) == Applied(job_b, property_id, 13, previous_score=0, drift_detected=False)
    p = prop(db, property_id)
    assert p["compliance_score_pending"] is False
    assert p["compliance_score"] == score(inputs_of(db, property_id), TODAY).score == 13  # pending gas: 12.5
    assert_invariants(db)


# -- duplicates and takeovers (G4) ----------------------------------------------------------------

def test_running_a_finished_job_again_changes_nothing(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    property_id, job_id = new_property(db)
    assert isinstance(make_recalculator().run(job_id), Applied)

    assert make_recalculator().run(job_id) == Dropped(job_id, "the job already finished")
    assert make_recalculator().run(job_id, redelivered=True) == Dropped(job_id, "the job already finished")

    assert len(snapshots(db, property_id)) == 1
    assert len(audits(db, "COMPLIANCE_SCORE_UPDATED", property_id=property_id)) == 1
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("done", 1)
    assert_invariants(db)


def test_three_concurrent_deliveries_of_one_job_apply_it_exactly_once(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, background: ThreadPoolExecutor
) -> None:
    property_id, job_id = new_property(db)
    recalculator = make_recalculator()
    together = threading.Barrier(3, timeout=TIMEOUT)

    def deliver() -> Any:
        together.wait()
        return recalculator.run(job_id)

    outcomes = [f.result(TIMEOUT) for f in [background.submit(deliver) for _ in range(3)]]

    assert [type(o) for o in outcomes].count(Applied) == 1, outcomes
    assert [type(o) for o in outcomes].count(Dropped) == 2, outcomes
    assert len(snapshots(db, property_id)) == 1
    assert len(audits(db, "COMPLIANCE_SCORE_UPDATED", job_id=job_id)) == 1
    assert job(db, job_id)["attempts"] == 1
    assert_invariants(db)


def test_an_attempt_that_lost_its_job_to_a_takeover_is_fenced_out_and_the_takeover_applies_once(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str,
    background: ThreadPoolExecutor,
) -> None:
    property_id, job_id = new_property(db)
    slow = Connections(database_url)
    stalled = slow.hold(1)  # connection 0 starts attempt 1; connection 1 would apply it
    zombie = background.submit(make_recalculator(connections=slow).run, job_id)
    stalled.wait_reached()
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("running", 1)

    db.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id])
    takeover = make_recalculator().run(job_id, redelivered=True)
    assert takeover == Applied(job_id, property_id, 0, previous_score=None, drift_detected=False)
    assert job(db, job_id)["attempts"] == 2

    stalled.release.set()
    assert zombie.result(TIMEOUT) == Dropped(job_id, "attempt 1 was fenced out by a takeover")

    [snapshot] = snapshots(db, property_id)
    [updated] = audits(db, "COMPLIANCE_SCORE_UPDATED", property_id=property_id)
    assert snapshot["job_id"] == updated["job_id"] == job_id
    assert updated["details"]["attempt"] == 2
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("done", 2)
    assert_invariants(db)


def test_a_takeover_tried_while_an_attempt_applies_waits_for_it_and_then_finds_the_job_finished(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str,
    background: ThreadPoolExecutor,
) -> None:
    property_id, job_id = new_property(db)
    probe = Probe()
    paused = probe.pause_at("recalculation.after_read_state")
    applying = Connections(database_url)
    short_lease = replace(POLICY, lease_seconds=0.2)
    first = background.submit(make_recalculator(connections=applying, probe=probe, policy=short_lease).run, job_id)
    paused.wait_reached()
    wait_until(lambda: one(db, "SELECT lease_expires_at < now() AS gone FROM outbox_job WHERE id = %s",
                           job_id)["gone"], TIMEOUT, "the first attempt's lease to run out")

    taking_over = Connections(database_url)
    second = background.submit(make_recalculator(connections=taking_over).run, job_id, redelivered=True)
    wait_until(lambda: bool(taking_over.pids) and applying.pids[-1] in blocked_by(db, taking_over.pids[0]),
               TIMEOUT, "the takeover to wait on the job row the applying attempt holds")
    paused.release.set()

    assert first.result(TIMEOUT) == Applied(job_id, property_id, 0, previous_score=None, drift_detected=False)
    assert second.result(TIMEOUT) == Dropped(job_id, "the job already finished")
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("done", 1)
    assert len(snapshots(db, property_id)) == 1
    assert_invariants(db)


# -- drift (G6) -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("corruption", "stored_score", "breakdown_matches"),
    [
        ("UPDATE properties SET compliance_score = 99 WHERE id = %s", 99, True),
        ("UPDATE properties SET compliance_breakdown = jsonb_set(compliance_breakdown, "
         "'{requirements,0,state}', '\"valid\"') WHERE id = %s", 13, False),
    ],
    ids=["score", "breakdown"],
)
def test_a_stored_score_its_inputs_do_not_explain_is_audited_as_drift_once_and_then_corrected(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, corruption: str, stored_score: int,
    breakdown_matches: bool,
) -> None:
    property_id = scored_property(db, make_recalculator, new_document("gas_safety"))
    want = score(inputs_of(db, property_id), TODAY)
    assert prop(db, property_id)["compliance_score"] == want.score == 13
    db.execute(corruption, [property_id])  # type: ignore[arg-type]
    job_id = manual_recalculation(db, property_id)

    outcome = make_recalculator().run(job_id)

    assert outcome == Applied(job_id, property_id, 13, previous_score=stored_score, drift_detected=True)
    [drift] = audits(db, "COMPLIANCE_SCORE_DRIFT_DETECTED", property_id=property_id)
    assert (drift["job_id"], drift["actor_type"], drift["actor_id"]) == (job_id, "system", "recalq-worker")
    assert drift["details"] == {
        "stored_score": stored_score,
        "computed_score": 13,
        "as_of": TODAY.isoformat(),
        "breakdown_matches": breakdown_matches,
        "applied_score": 13,
        "applied_as_of": TODAY.isoformat(),
    }
    p = prop(db, property_id)
    assert (p["compliance_score"], p["compliance_breakdown"]) == (13, want.breakdown())
    assert len(audits(db, "COMPLIANCE_SCORE_UPDATED", job_id=job_id)) == 1
    assert_invariants(db)


def test_a_score_changed_by_new_inputs_is_not_drift(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    property_id = scored_property(db, make_recalculator, new_document("gas_safety"))
    [document_id] = [r["id"] for r in rows(db, "SELECT id FROM documents WHERE property_id = %s", property_id)]
    verified = verify_document(db, document_id=document_id, actor=ADMIN, correlation_id=cid())

    outcome = make_recalculator().run(verified.job_id)

    assert outcome == Applied(verified.job_id, property_id, 25, previous_score=13, drift_detected=False)
    assert audits(db, "COMPLIANCE_SCORE_DRIFT_DETECTED") == []
    assert_invariants(db)


def test_a_score_changed_only_by_a_later_as_of_date_is_not_drift(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    today = [TODAY]
    property_id, job_id = new_property(db)
    upload(db, property_id, new_document("gas_safety", TODAY + timedelta(days=5), DocumentStatus.VERIFIED))
    assert make_recalculator(today=lambda: today[0]).run(job_id) == Applied(
        job_id, property_id, 18, previous_score=None, drift_detected=False)  # expiring soon: 0.7 x 25
    fingerprint = prop(db, property_id)["compliance_inputs_fingerprint"]

    today[0] = TODAY + timedelta(days=6)  # the certificate expired yesterday
    rerun = manual_recalculation(db, property_id)
    outcome = make_recalculator(today=lambda: today[0]).run(rerun)

    assert outcome == Applied(rerun, property_id, 0, previous_score=18, drift_detected=False)
    assert audits(db, "COMPLIANCE_SCORE_DRIFT_DETECTED") == []
    p = prop(db, property_id)
    assert (p["compliance_as_of"], p["compliance_inputs_fingerprint"]) == (today[0], fingerprint)
    assert_invariants(db)


# -- failures (G5) --------------------------------------------------------------------------------

def test_a_lock_timeout_is_retried_with_growing_backoff_and_the_fifth_failure_is_dead_and_audited(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str
) -> None:
    property_id, job_id = new_property(db)
    client_id = prop(db, property_id)["client_id"]
    recalculator = make_recalculator(policy=replace(POLICY, lock_timeout_ms=50))
    delays = []
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM properties WHERE id = %s FOR UPDATE", [property_id])
        for attempt in range(1, 5):
            outcome = recalculator.run(job_id)
            assert isinstance(outcome, RetryLater), outcome
            assert (outcome.counted, outcome.infrastructure, outcome.resume_attempt) == (True, False, None)
            assert "lock timeout" in outcome.reason
            delays.append(outcome.delay_seconds)
            j = one(db, "SELECT *, next_run_at > now() AS later FROM outbox_job WHERE id = %s", job_id)
            assert (j["status"], j["attempts"], j["later"]) == ("retrying", attempt, True)
            assert j["next_run_at"] - j["updated_at"] == timedelta(seconds=outcome.delay_seconds)
            assert "55P03" in j["last_error"] and "lock timeout" in j["last_error"]

            early = recalculator.run(job_id)
            assert isinstance(early, RetryLater) and not early.counted, "a delivery before next_run_at is turned away"
            assert job(db, job_id)["attempts"] == attempt
            db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])

        outcome = recalculator.run(job_id)
        holder.rollback()

    assert delays == [POLICY.retry.delay(n, rand=lambda: HALF) for n in range(1, 5)] == [10, 20, 40, 80]
    assert isinstance(outcome, Dead) and "lock timeout" in outcome.reason
    j = job(db, job_id)
    assert (j["status"], j["attempts"], j["max_attempts"]) == ("dead", 5, 5)
    assert j["last_error"] == outcome.reason
    [failed] = audits(db, "COMPLIANCE_RECALC_FAILED")
    assert (failed["job_id"], failed["property_id"], failed["client_id"]) == (job_id, property_id, client_id)
    assert failed["details"] == {"error": outcome.reason, "attempts": 5}
    assert snapshots(db, property_id) == []
    assert prop(db, property_id)["compliance_score_pending"] is True, "a DEAD job leaves the property pending"
    assert_invariants(db)


class Fails:
    """A probe that raises a plain exception at a point, the first `times` times it is reached:
    a bug or unforeseen data inside the attempt, not an error the runner knows by name."""

    def __init__(self, point: str, times: int) -> None:
        self.point, self.left = point, times

    def __call__(self, reached: str) -> None:
        if reached == self.point and self.left > 0:
            self.left -= 1
            raise RuntimeError(f"boom {self.left}")


def test_a_plain_exception_is_a_counted_attempt_retried_with_backoff_and_the_fifth_is_dead_and_audited(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    property_id, job_id = new_property(db)
    recalculator = make_recalculator(probe=Fails("recalculation.after_read_state", times=5))
    delays = []
    for attempt in range(1, 5):
        outcome = recalculator.run(job_id)
        assert isinstance(outcome, RetryLater), outcome
        assert (outcome.counted, outcome.infrastructure) == (True, False)
        assert outcome.reason == f"RuntimeError: boom {5 - attempt}"
        delays.append(outcome.delay_seconds)
        j = job(db, job_id)
        assert (j["status"], j["attempts"], j["last_error"]) == ("retrying", attempt, outcome.reason)
        db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])

    outcome = recalculator.run(job_id)

    assert delays == [10, 20, 40, 80], "capped exponential backoff, as for any counted failure"
    assert outcome == Dead(job_id, "RuntimeError: boom 0")
    j = job(db, job_id)
    assert (j["status"], j["attempts"], j["last_error"]) == ("dead", 5, "RuntimeError: boom 0")
    [failed] = audits(db, "COMPLIANCE_RECALC_FAILED")
    assert (failed["job_id"], failed["property_id"], failed["details"]) == (
        job_id, property_id, {"error": "RuntimeError: boom 0", "attempts": 5})
    assert snapshots(db, property_id) == [], "no failed attempt left an effect behind"
    assert_invariants(db)


def test_every_attempt_keeps_its_own_row_with_its_error_so_three_failures_and_a_success_are_four_rows(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    _property_id, job_id = new_property(db)
    recalculator = make_recalculator(probe=Fails("recalculation.after_read_state", times=3))
    celery_task_id = job(db, job_id)["celery_task_id"]
    for _ in range(3):
        assert isinstance(recalculator.run(job_id, worker="w1@host"), RetryLater)
        db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])
    assert isinstance(recalculator.run(job_id, worker="w2@host"), Applied)

    attempts = rows(db, "SELECT run, attempt, outcome::text AS outcome, error, worker, celery_task_id, "
                        "started_at <= finished_at AS ordered FROM outbox_attempt WHERE job_id = %s "
                        "ORDER BY attempt", job_id)
    assert [(a["run"], a["attempt"], a["outcome"], a["error"], a["worker"], a["ordered"]) for a in attempts] == [
        (0, 1, "failed", "RuntimeError: boom 2", "w1@host", True),
        (0, 2, "failed", "RuntimeError: boom 1", "w1@host", True),
        (0, 3, "failed", "RuntimeError: boom 0", "w1@host", True),
        (0, 4, "succeeded", None, "w2@host", True),
    ]
    assert {a["celery_task_id"] for a in attempts} == {celery_task_id}
    assert job(db, job_id)["last_error"] == "RuntimeError: boom 0", "the job keeps only the last error"


def test_a_requeued_job_runs_under_a_new_celery_task_id_and_its_attempts_are_a_second_run(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    _property_id, job_id = new_property(db)
    db.execute("UPDATE outbox_job SET max_attempts = 1 WHERE id = %s", [job_id])
    first_task_id = job(db, job_id)["celery_task_id"]
    assert isinstance(make_recalculator(probe=Fails("recalculation.after_read_state", times=1)).run(job_id), Dead)

    with db.transaction():
        assert lifecycle.requeue(db, job_id) == job_id
    second_task_id = job(db, job_id)["celery_task_id"]
    assert isinstance(make_recalculator().run(job_id), Applied)

    attempts = rows(db, "SELECT run, attempt, outcome::text AS outcome, celery_task_id FROM outbox_attempt "
                        "WHERE job_id = %s ORDER BY run, attempt", job_id)
    assert second_task_id != first_task_id
    assert [(a["run"], a["attempt"], a["outcome"], a["celery_task_id"]) for a in attempts] == [
        (0, 1, "failed", first_task_id), (1, 1, "succeeded", second_task_id)]


def test_a_lost_attempt_taken_over_is_recorded_as_lost_beside_the_takeover(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    _property_id, job_id = new_property(db)
    with db.transaction():
        started = lifecycle.start(db, job_id, redelivered=False, lease_seconds=30, worker="gone@host")
    assert started.attempt == 1
    [running] = attempts_of_job(db, job_id)
    assert (running.attempt, running.outcome, running.worker, running.finished_at) == (1, None, "gone@host", None)
    assert isinstance(make_recalculator().run(job_id, redelivered=True, worker="w2@host"), Applied)

    attempts = rows(db, "SELECT attempt, outcome::text AS outcome, error, worker FROM outbox_attempt "
                        "WHERE job_id = %s ORDER BY attempt", job_id)
    assert [(a["attempt"], a["outcome"], a["error"], a["worker"]) for a in attempts] == [
        (1, "lost", "worker died or lease expired", "gone@host"), (2, "succeeded", None, "w2@host")]


def test_a_poison_job_goes_dead_at_once_with_its_reason_and_the_other_jobs_still_apply(
    db: psycopg.Connection, make_recalculator: MakeRecalculator
) -> None:
    property_id, good = new_property(db)

    def enqueue(key: str, payload: dict[str, Any]) -> int:
        with db.transaction():
            return outbox.enqueue(db, task=RECALCULATE_TASK, coalescing_key=key, payload=payload,
                                  correlation_id=cid(), trigger_reason="manual_recalculation",
                                  actor_type="admin", actor_id="admin-1").job_id

    missing = enqueue("property:999999", {"property_id": 999999})
    malformed = enqueue("property:x", {"property_id": "x"})
    recalculator = make_recalculator()

    assert recalculator.run(missing) == Dead(missing, "property 999999 does not exist")
    assert recalculator.run(malformed) == Dead(malformed, "payload {'property_id': 'x'} has no valid property_id")
    assert isinstance(recalculator.run(good), Applied)

    for job_id in (missing, malformed):
        j = job(db, job_id)
        assert (j["status"], j["attempts"]) == ("dead", 1)
        [failed] = audits(db, "COMPLIANCE_RECALC_FAILED", job_id=job_id)
        assert failed["details"] == {"error": j["last_error"], "attempts": 1}
    assert audits(db, "COMPLIANCE_RECALC_FAILED", job_id=missing)[0]["property_id"] == 999999
    assert job(db, good)["status"] == "done"
    assert prop(db, property_id)["compliance_score_pending"] is False
    assert_invariants(db)


def test_an_unreachable_database_at_start_spends_no_attempt_and_backs_off_per_consecutive_failure(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str
) -> None:
    property_id, job_id = new_property(db)
    connections = Connections(database_url)
    connections.refuse(0, 1)
    recalculator = make_recalculator(connections=connections)

    first = recalculator.run(job_id)
    second = recalculator.run(job_id, infra_failures=1)

    for outcome in (first, second):
        assert isinstance(outcome, RetryLater), outcome
        assert (outcome.counted, outcome.infrastructure, outcome.resume_attempt) == (False, True, None)
    assert (first.delay_seconds, second.delay_seconds) == (1.0, 2.0)
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("pending", 0)

    assert recalculator.run(job_id, infra_failures=2) == Applied(job_id, property_id, 0, None, drift_detected=False)
    assert job(db, job_id)["attempts"] == 1
    assert_invariants(db)


def test_a_connection_killed_mid_apply_rolls_back_and_the_same_attempt_resumes_later(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str
) -> None:
    property_id, job_id = new_property(db)
    connections = Connections(database_url)
    probe = Probe()

    def kill_the_apply_connection() -> None:
        victim = connections.pids[-1]
        assert one(db, "SELECT pg_terminate_backend(%s) AS ok", victim)["ok"]
        wait_until(lambda: not rows(db, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", victim), TIMEOUT,
                   "the terminated backend to exit")

    probe.actions["recalculation.after_read_state"] = kill_the_apply_connection
    outcome = make_recalculator(connections=connections, probe=probe).run(job_id)

    assert isinstance(outcome, RetryLater), outcome
    assert (outcome.counted, outcome.infrastructure, outcome.resume_attempt) == (False, True, 1)
    j = job(db, job_id)
    assert (j["status"], j["attempts"]) == ("running", 1)
    assert snapshots(db, property_id) == []
    assert prop(db, property_id)["compliance_score"] is None

    resumed = make_recalculator().run(job_id, resume_attempt=1, infra_failures=1)

    assert resumed == Applied(job_id, property_id, 0, previous_score=None, drift_detected=False)
    assert (job(db, job_id)["status"], job(db, job_id)["attempts"]) == ("done", 1)
    [updated] = audits(db, "COMPLIANCE_SCORE_UPDATED", job_id=job_id)
    assert updated["details"]["attempt"] == 1
    assert_invariants(db)


def test_a_job_whose_property_has_another_job_running_waits_without_spending_an_attempt(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str,
    background: ThreadPoolExecutor,
) -> None:
    property_id, job_a = new_property(db)
    slow = Connections(database_url)
    stalled = slow.hold(1)  # job A has started; its apply has not begun
    running = background.submit(make_recalculator(connections=slow).run, job_a)
    stalled.wait_reached()
    job_b = upload(db, property_id, new_document("epc"))
    assert job_b != job_a

    busy = make_recalculator().run(job_b)

    assert isinstance(busy, RetryLater), busy
    assert (busy.counted, busy.infrastructure, busy.resume_attempt) == (False, False, None)
    assert busy.delay_seconds == POLICY.busy_retry_seconds
    assert (job(db, job_b)["status"], job(db, job_b)["attempts"]) == ("pending", 0)

    stalled.release.set()
    assert isinstance(running.result(TIMEOUT), Applied)
    assert isinstance(make_recalculator().run(job_b), Applied)
    assert (job(db, job_b)["status"], job(db, job_b)["attempts"]) == ("done", 1)
    assert prop(db, property_id)["compliance_score_pending"] is False
    assert_invariants(db)


def test_a_job_whose_property_has_another_job_committing_answers_busy_at_once_instead_of_waiting(
    db: psycopg.Connection, make_recalculator: MakeRecalculator, database_url: str,
    background: ThreadPoolExecutor,
) -> None:
    property_id, job_a = new_property(db)
    slow = Connections(database_url)
    stalled = slow.hold(1)  # job A has started; its apply has not begun
    probe = Probe()
    applying = probe.pause_at("recalculation.after_read_state")  # inside A's apply: its job row is locked
    running = background.submit(make_recalculator(connections=slow, probe=probe).run, job_a)
    stalled.wait_reached()
    job_b = upload(db, property_id, new_document("epc"))
    stalled.release.set()
    applying.wait_reached()

    # Before NOWAIT, this start blocked on A's locked row until A committed, holding a worker.
    busy = background.submit(make_recalculator().run, job_b).result(TIMEOUT / 2)

    assert isinstance(busy, RetryLater), busy
    assert (busy.counted, busy.infrastructure) == (False, False)
    assert (job(db, job_b)["status"], job(db, job_b)["attempts"]) == ("pending", 0)
    applying.release.set()
    assert isinstance(running.result(TIMEOUT), Applied)
    assert isinstance(make_recalculator().run(job_b), Applied)
    assert prop(db, property_id)["compliance_score_pending"] is False
    assert_invariants(db)
