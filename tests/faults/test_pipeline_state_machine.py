"""Model-based fault test: hypothesis interleaves mutations, relay passes, deliveries, duplicate,
lost and killed messages, stalled workers and the passing of time, against the real schema,
the real outbox SQL, the real Relay and the real Recalculator.

Only the broker is a model (tests/harness/model_broker.py): a list of in-flight messages that
hypothesis delivers in any order, copies or loses, so every interleaving it finds is replayed
exactly. Cheap invariants are checked after every step; at the end of each run the system is
driven to idle (time passes, the relay publishes and rescues, every message is delivered) and
the full I1-I6 invariants of tests/harness/invariants.py must hold.

Reproducing a failure: hypothesis prints the failing steps and a @reproduce_failure blob, and
keeps the example in .hypothesis/ so the next run replays it first. CI (CI set) runs
derandomized, so a CI failure replays locally with CI=1.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import date, timedelta

import psycopg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row

from outbox.relay import Relay
from recalq.bootstrap import Runtime
from recalq.settings import Settings
from services.documents import delete_document, reject_document, verify_document
from services.recalculation import Outcome, Recalculator, RetryLater
from services.scoring import REQUIREMENTS, DocumentStatus
from services.vocabulary import TriggerReason
from tests.harness.data import ADMIN, cid, new_document, provision, upload
from tests.harness.invariants import assert_invariants, expected_score
from tests.harness.model_broker import (
    Message,
    ModelBroker,
    ModelWorker,
    ProcessKilled,
    StalledWorker,
    advance_clock,
)

PROPERTIES = 2
#: The model's first day; a run's `today` is this plus the days the model clock has advanced.
BASE_DAY = date(2030, 1, 1)
#: Short, so that a delivery blocked behind a held property lock fails fast (a real 55P03).
LOCK_TIMEOUT_MS = 20
#: Rounds of "time passes, relay, rescue, deliver everything" the final drain may take.
DRAIN_ROUNDS = 20
#: Past every lease, claim, retry delay and rescue grace period at the default settings.
LONG_ENOUGH = 3601.0
TABLES = ("clients, properties, documents, property_compliance_score_history, audit_log, "
          "outbox_request, outbox_job, client_tokens")
ACTIVE = ("pending", "published", "running", "retrying")

#: Delivery faults: (contended, {n-th connection: fault}); see ModelWorker.
DELIVERY_FAULTS: dict[str, tuple[bool, dict[int, str]]] = {
    "none": (False, {}),
    "property_locked_by_a_mutation": (True, {}),
    "db_unreachable_at_start": (False, {1: "refused"}),
    "db_unreachable_at_apply": (False, {2: "refused"}),
    "connection_lost_after_start_committed": (False, {1: "lost_after_commit"}),
    "connection_lost_after_apply_committed": (False, {2: "lost_after_commit"}),
    "property_locked_and_db_unreachable_recording_the_failure": (True, {3: "refused"}),
}
#: A worker SIGKILLed at a point of its apply transaction; whether the broker hands the unacked
#: message back (RabbitMQ) or keeps it out of reach (Redis, until its visibility timeout).
KILLS: dict[str, tuple[str, bool]] = {
    f"worker_killed_at_{point.split('.')[1]}{'' if back else '_message_held'}": (point, back)
    for point in ("recalculation.after_read_state", "recalculation.before_commit")
    for back in (True, False)
}
#: None (a pass that completes) first and thrice, so that most passes complete.
RELAY_KILL_POINTS = (None, None, None, "relay.after_claim", "relay.after_publish")


class Pipeline:
    """What the examples of one test share: the database and the test's connections."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.settings = Settings(database_url=database_url, lock_timeout_ms=LOCK_TIMEOUT_MS)
        self.db = self.connect()
        self.relay_conn = self.connect()
        #: Plays a mutation that holds a property's lock while a delivery runs.
        self.blocker = self.connect()

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def reset(self) -> None:
        """A clean slate per example: a fresh database each would cost seconds."""
        self.db.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")

    def close(self) -> None:
        for conn in (self.db, self.relay_conn, self.blocker):
            conn.close()


def recalculator_factory(settings_: Settings, today: Callable[[], date]) -> Callable[..., Recalculator]:
    """The Recalculator recalq.bootstrap.Runtime builds, on the model's connections and clock."""

    def build(
        connection: Callable[[], AbstractContextManager[psycopg.Connection]], probe: Callable[[str], None]
    ) -> Recalculator:
        return Recalculator(
            connection=connection,
            policy=Runtime(settings_).recalculation_policy,
            today=today,
            probe=probe,
            rand=lambda: 0.5,  # the nominal delay: jitter is not what is under test here
        )

    return build


class PipelineMachine(RuleBasedStateMachine):
    pipeline: Pipeline  # set by the test that runs the machine

    def __init__(self) -> None:
        super().__init__()
        p = self.pipeline
        p.reset()
        self.broker = ModelBroker()
        build = recalculator_factory(p.settings, self.today)
        self.worker = ModelWorker(p.connect, build)
        self.stall_worker = ModelWorker(p.connect, build)
        self.stalled: StalledWorker | None = None
        self.relay_kill_at: str | None = None
        self.relay = Relay(connect=p.connect, publish=self.broker.publish, probe=self._relay_probe)
        self.properties: list[int] = []
        #: Live documents: id -> status, as this model's own mutations left them.
        self.documents: dict[int, DocumentStatus] = {}
        self.attempts_seen: dict[int, int] = {}
        self.delivered: set[int] = set()  # jobs some delivery of this step ran for
        self.outcomes: Counter[str] = Counter()
        self.consistent = True  # False while a step runs; stays False if it raised

    # -- plumbing ----------------------------------------------------------------------------
    def today(self) -> date:
        return BASE_DAY + timedelta(days=int(self.broker.clock // 86400))

    def _relay_probe(self, point: str) -> None:
        if point == self.relay_kill_at:
            raise ProcessKilled(point)

    def _step(self) -> None:
        self.consistent = False
        self.delivered = set()

    def _settle(self, message: Message, outcome: Outcome) -> None:
        """What the task does with the outcome: a RetryLater becomes a retry message."""
        self.outcomes[type(outcome).__name__] += 1
        if isinstance(outcome, RetryLater):
            self.broker.retry(message, outcome)

    def _killed(self, message: Message, broker_gives_it_back: bool) -> None:
        self.outcomes["killed"] += 1
        if broker_gives_it_back:  # RabbitMQ: the channel closed with the message unacked
            self.broker.give_back(message)
        # else Redis: unacked until the visibility timeout (an hour); the relay's rescue is
        # what re-sends it, so the model treats it as lost.

    def _pick(self, indices: list[int], pick: int) -> Message:
        return self.broker.take(indices[pick % len(indices)])

    def _docs(self, *excluded: DocumentStatus) -> list[int]:
        return sorted(d for d, s in self.documents.items() if s not in excluded)

    @initialize(max_attempts=st.sampled_from([5, 2]))
    def provision_properties(self, max_attempts: int) -> None:
        """The default budget of 5 attempts, or 2 (RECALQ_MAX_ATTEMPTS=2, as `recalq migrate`
        applies it), under which runs reach DEAD often enough to check what follows it."""
        self._step()
        self.pipeline.db.execute("UPDATE outbox_task SET max_attempts = %s", [max_attempts])
        self.properties = provision(self.pipeline.db, PROPERTIES)

    # -- mutations (the services, each in its own transaction) -------------------------------
    @rule(
        kind=st.sampled_from(["upload", "verify", "reject", "delete"]),
        prop=st.integers(0, PROPERTIES - 1),
        requirement=st.sampled_from(REQUIREMENTS),
        verified=st.booleans(),
        expires_in_days=st.sampled_from([None, -1, 0, 1, 29, 31, 400]),
        pick=st.integers(0, 50),
    )
    def mutate(
        self, kind: str, prop: int, requirement: str, verified: bool, expires_in_days: int | None, pick: int
    ) -> None:
        """One service call; a change with no document to apply to is an upload instead."""
        self._step()
        db = self.pipeline.db
        targets = {
            "verify": self._docs(DocumentStatus.VERIFIED),
            "reject": self._docs(DocumentStatus.REJECTED),
            "delete": self._docs(),
        }.get(kind)
        if not targets:
            status = DocumentStatus.VERIFIED if verified else DocumentStatus.PENDING_VERIFICATION
            expires = None if expires_in_days is None else self.today() + timedelta(days=expires_in_days)
            upload(db, self.properties[prop], new_document(requirement, expires, status))
            [doc_id] = db.execute("SELECT max(id) FROM documents").fetchone()
            self.documents[doc_id] = status
            return
        doc_id = targets[pick % len(targets)]
        if kind == "verify":
            verify_document(db, document_id=doc_id, actor=ADMIN, correlation_id=cid())
            self.documents[doc_id] = DocumentStatus.VERIFIED
        elif kind == "reject":
            reject_document(db, document_id=doc_id, reason="illegible", actor=ADMIN, correlation_id=cid())
            self.documents[doc_id] = DocumentStatus.REJECTED
        else:
            delete_document(db, document_id=doc_id, actor=ADMIN, trigger=TriggerReason.ADMIN_DELETE,
                            correlation_id=cid())
            del self.documents[doc_id]

    # -- the relay --------------------------------------------------------------------------
    @rule(rescue=st.booleans(), killed_at=st.sampled_from(RELAY_KILL_POINTS))
    def relay_pass(self, rescue: bool, killed_at: str | None) -> None:
        """A normal pass (claim due jobs) or a rescue pass (re-send jobs that look lost)."""
        self._step()
        self.relay_kill_at = killed_at
        try:
            (self.relay.rescue_pass if rescue else self.relay.run_pass)(self.pipeline.relay_conn)
        except ProcessKilled:
            self.outcomes["relay killed"] += 1
        finally:
            self.relay_kill_at = None

    @rule(seconds=st.sampled_from([1.0, 31.0, 121.0, 181.0, 301.0, LONG_ENOUGH, 86400.0]))
    def time_passes(self, seconds: float) -> None:
        self._step()
        advance_clock(self.pipeline.db, self.broker, seconds)

    # -- the broker and the workers -----------------------------------------------------------
    @rule(pick=st.integers(0, 50), fault=st.sampled_from([*DELIVERY_FAULTS, *KILLS]))
    def deliver(self, pick: int, fault: str) -> None:
        """A worker takes any due message and runs the task, perhaps under a fault.

        With nothing due it waits, as a worker does: until the next retry's ETA if one is
        queued, else while the relay runs a pass. So the rule is always enabled and hypothesis
        spends its steps on deliveries rather than on looking for a state that allows one.
        """
        self._step()
        if not self.broker.due():
            if self.broker.messages:
                wait = min(m.due_at for m in self.broker.messages) - self.broker.clock
                advance_clock(self.pipeline.db, self.broker, wait)
            else:
                self.relay.run_pass(self.pipeline.relay_conn)
            if not self.broker.due():
                return
        message = self._pick(self.broker.due(), pick)
        self.delivered.add(message.job_id)
        if fault.startswith("worker_killed"):
            kill_at, broker_gives_it_back = KILLS[fault]
            try:
                outcome = self.worker.deliver(message, kill_at=kill_at)
            except ProcessKilled:
                self._killed(message, broker_gives_it_back)
            else:
                self._settle(message, outcome)  # it never reached the kill point: nothing to run
            return
        contended, faults = DELIVERY_FAULTS[fault]
        if not contended:
            self._settle(message, self.worker.deliver(message, faults=faults))
            return
        blocker = self.pipeline.blocker
        property_id = (message.kwargs.get("payload") or {}).get("property_id")
        with blocker.transaction():
            blocker.execute("SELECT 1 FROM properties WHERE id = %s FOR UPDATE", [property_id])
            outcome = self.worker.deliver(message, faults=faults)
        self._settle(message, outcome)

    @precondition(lambda self: self.broker.due())
    @rule(pick=st.integers(0, 50))
    def duplicate_message(self, pick: int) -> None:
        self._step()
        due = self.broker.due()
        self.broker.messages.append(self.broker.messages[due[pick % len(due)]])

    @precondition(lambda self: self.broker.messages)
    @rule(pick=st.integers(0, 50))
    def lose_message(self, pick: int) -> None:
        self._step()
        self.broker.take(pick % len(self.broker.messages))

    @precondition(lambda self: self.stalled is None and self.broker.due())
    @rule(pick=st.integers(0, 50))
    def stall_worker_after_start(self, pick: int) -> None:
        self._step()
        message = self._pick(self.broker.due(), pick)
        self.delivered.add(message.job_id)
        stalled = StalledWorker(self.stall_worker, message)
        if stalled.stalled:
            self.stalled = stalled
        else:
            self._finish_stalled(stalled, broker_gives_it_back=False)

    @precondition(lambda self: self.stalled is not None)
    @rule(killed=st.booleans(), broker_gives_it_back=st.booleans())
    def resume_stalled_worker(self, killed: bool, broker_gives_it_back: bool) -> None:
        self._step()
        stalled, self.stalled = self.stalled, None
        assert stalled is not None
        self.delivered.add(stalled.message.job_id)
        stalled.resume(kill=killed)
        self._finish_stalled(stalled, broker_gives_it_back)

    def _finish_stalled(self, stalled: StalledWorker, broker_gives_it_back: bool) -> None:
        if isinstance(stalled.error, ProcessKilled):
            self._killed(stalled.message, broker_gives_it_back)
        elif stalled.error is not None:
            raise stalled.error
        else:
            assert stalled.outcome is not None
            self._settle(stalled.message, stalled.outcome)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def pipeline_invariants_hold(self) -> None:
        check_step_invariants(self.pipeline.db, self.attempts_seen, self.delivered)
        self.consistent = True

    def teardown(self) -> None:
        try:
            if self.consistent:  # a failed step is reported as it is, not as a failed drain
                self.drain()
                check_step_invariants(self.pipeline.db, None, set())
                assert_invariants(self.pipeline.db)
        finally:
            if self.stalled is not None:
                self.stalled.resume(kill=True)
            self.worker.close()
            self.stall_worker.close()

    def drain(self) -> None:
        """Everything a healthy system does until idle: time passes, the relay publishes and
        rescues, workers take every message that is due."""
        if self.stalled is not None:
            stalled, self.stalled = self.stalled, None
            stalled.resume()
            self._finish_stalled(stalled, broker_gives_it_back=False)
        for _ in range(DRAIN_ROUNDS):
            if not self.broker.messages and not active_jobs(self.pipeline.db):
                return
            advance_clock(self.pipeline.db, self.broker, LONG_ENOUGH)
            self.relay.drain(self.pipeline.relay_conn)
            self.relay.rescue_pass(self.pipeline.relay_conn)
            while due := self.broker.due():
                message = self.broker.take(due[0])
                self._settle(message, self.worker.deliver(message))
        raise AssertionError(
            f"not idle after {DRAIN_ROUNDS} drain rounds: jobs {active_jobs(self.pipeline.db)}, "
            f"messages {self.broker.messages}"
        )


def active_jobs(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT id, status::text, attempts FROM outbox_job WHERE status::text = ANY(%s) ORDER BY id",
        [list(ACTIVE)],
    ).fetchall()


def check_step_invariants(
    conn: psycopg.Connection, attempts_seen: dict[int, int] | None, delivered: set[int]
) -> None:
    """What must hold between any two steps, whatever has failed so far.

    attempts_seen (updated in place) makes attempts monotonic: they grow only by a delivery of
    that job, by one at most. None skips that check (the final drain delivers many times).
    """
    with conn.cursor(row_factory=dict_row) as cur:
        jobs = cur.execute(
            """SELECT j.id, j.coalescing_key, j.status::text AS status, j.attempts, j.max_attempts,
                      j.last_error,
                      (SELECT count(*) FROM property_compliance_score_history h WHERE h.job_id = j.id) AS snapshots,
                      (SELECT count(*) FROM audit_log a WHERE a.job_id = j.id
                          AND a.action = 'COMPLIANCE_SCORE_UPDATED') AS updated_audits,
                      (SELECT count(*) FROM audit_log a WHERE a.job_id = j.id
                          AND a.action = 'COMPLIANCE_RECALC_FAILED') AS failed_audits
                 FROM outbox_job j ORDER BY j.id"""
        ).fetchall()
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        for j in jobs:
            where = f"job {j['id']} ({j['status']}, attempt {j['attempts']})"
            assert j["attempts"] <= j["max_attempts"], f"{where}: more attempts than allowed"
            if j["status"] == "running":
                running[j["coalescing_key"]] += 1
            if j["status"] in ("pending", "published", "retrying"):
                waiting[j["coalescing_key"]] += 1
            if j["status"] in ("pending", "published"):
                assert j["attempts"] == 0, f"{where}: a job not yet started has attempts"
            if j["status"] == "retrying":
                assert j["attempts"] < j["max_attempts"], f"{where}: retrying with no attempt left"
            # Every failure this model injects is retryable: only a spent budget makes a job DEAD.
            spent = j["attempts"] == j["max_attempts"] and j["status"] not in ("running", "done", "superseded")
            assert (j["status"] == "dead") == spent, f"{where}: DEAD exactly when every attempt failed"
            if j["status"] == "dead":
                assert j["last_error"], f"{where}: DEAD without a reason"
            assert j["failed_audits"] == (1 if j["status"] == "dead" else 0), \
                f"{where}: {j['failed_audits']} COMPLIANCE_RECALC_FAILED audit rows"
            applied = 1 if j["status"] == "done" else 0
            assert (j["snapshots"], j["updated_audits"]) == (applied, applied), \
                f"{where}: {j['snapshots']} snapshots and {j['updated_audits']} audit rows, want {applied}"
            if attempts_seen is not None:
                before = attempts_seen.get(j["id"], 0)
                grew = j["attempts"] - before
                allowed = 1 if j["id"] in delivered else 0
                assert 0 <= grew <= allowed, f"{where}: attempts went {before} -> {j['attempts']}"
                attempts_seen[j["id"]] = j["attempts"]
        assert max(running.values(), default=0) <= 1, f"two running jobs for one key: {running}"
        assert max(waiting.values(), default=0) <= 1, f"two waiting jobs for one key: {waiting}"

        props = cur.execute(
            """SELECT p.id, p.compliance_score_pending AS pending, p.compliance_score AS score,
                      p.compliance_breakdown AS breakdown, p.compliance_as_of AS as_of,
                      EXISTS (SELECT 1 FROM outbox_job j WHERE j.coalescing_key = 'property:' || p.id
                                 AND j.status IN ('pending', 'published', 'running', 'retrying')) AS has_active,
                      (SELECT j.status::text FROM outbox_job j WHERE j.coalescing_key = 'property:' || p.id
                        ORDER BY j.id DESC LIMIT 1) AS last_status
                 FROM properties p ORDER BY p.id"""
        ).fetchall()
    for p in props:
        if p["pending"]:
            assert p["has_active"] or p["last_status"] == "dead", \
                f"property {p['id']} is pending with nothing left to recompute it (last job {p['last_status']})"
        else:
            want, breakdown = expected_score(conn, p["id"], p["as_of"])
            assert (p["score"], p["breakdown"]) == (want, breakdown), \
                f"property {p['id']} is not pending but its score {p['score']} is not the formula's {want}"


def run_machine(database_url: str, **overrides: object) -> Counter[str]:
    pipeline = Pipeline(database_url)
    outcomes: Counter[str] = Counter()

    class Machine(PipelineMachine):
        def teardown(self) -> None:
            outcomes.update(self.outcomes)
            super().teardown()

    Machine.pipeline = pipeline
    try:
        run_state_machine_as_test(Machine, settings=settings(
            deadline=None,
            derandomize=bool(os.environ.get("CI")),
            print_blob=True,
            **overrides,
        ))
    finally:
        pipeline.close()
    return outcomes


def test_any_interleaving_of_mutations_deliveries_duplicates_losses_and_crashes_keeps_the_invariants(
    database_url: str,
) -> None:
    outcomes = run_machine(database_url, max_examples=30, stateful_step_count=30)
    # The run exercised the paths it claims to (hypothesis could in principle avoid them).
    assert outcomes["Applied"] and outcomes["RetryLater"] and outcomes["killed"], outcomes


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_long_interleavings_keep_the_invariants(database_url: str) -> None:
    outcomes = run_machine(database_url, max_examples=400, stateful_step_count=60)
    assert outcomes["Applied"] and outcomes["Dead"] and outcomes["killed"], outcomes


def test_a_job_whose_attempt_fails_while_a_newer_job_of_its_key_waits_is_retried_or_superseded(
    database_url: str,
) -> None:
    """The machine's first find, replayed step by step so that it is checked on every run.

    A mutation made while a job runs creates a second job for the key (a running job takes no
    more requests). If the running attempt then fails with a retryable error, outbox_fail moves
    it back to 'retrying', a second waiting job for the key, which ux_outbox_job_waiting_key
    refuses: the failure escapes as a UniqueViolation and the attempt is never recorded.
    """
    pipeline = Pipeline(database_url)

    class Machine(PipelineMachine):
        pass

    Machine.pipeline = pipeline
    state = Machine()
    try:
        state.pipeline_invariants_hold()
        state.provision_properties(max_attempts=5)
        state.pipeline_invariants_hold()
        # The relay publishes both properties' jobs; the worker dies applying property 1's.
        state.deliver(pick=0, fault="worker_killed_at_after_read_state_message_held")
        state.pipeline_invariants_hold()
        state.mutate(kind="upload", prop=0, requirement="gas_safety", verified=True, expires_in_days=400, pick=0)
        state.pipeline_invariants_hold()
        state.time_passes(seconds=181.0)  # the dead worker's lease, then the takeover grace, run out
        state.pipeline_invariants_hold()
        state.relay_pass(rescue=True, killed_at=None)  # re-sends job 1, its worker lost
        state.pipeline_invariants_hold()
        [job_1] = [i for i, m in enumerate(state.broker.messages) if m.job_id == 1]
        # Attempt 2 of job 1 meets a mutation holding the property past lock_timeout.
        state.deliver(pick=job_1, fault="property_locked_by_a_mutation")
        state.pipeline_invariants_hold()
        state.teardown()
    finally:
        if state.stalled is not None:
            state.stalled.resume(kill=True)
        state.worker.close()
        pipeline.close()
