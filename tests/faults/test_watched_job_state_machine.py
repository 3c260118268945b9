"""Model-based test of a watched job's life: hypothesis interleaves starts, redeliveries, lapsed
leases and takeovers, progress, units with checkpoints, completion, failure, cancel, resume and a
second submission under the same lock, from current and stale attempts, against the real schema
and the real outbox SQL on PostgreSQL.

A small Python model predicts every answer (which attempt holds the job, what a cancel does, what
a stale write gets); after every step the database must agree with it and keep the invariants:
one terminal state that never changes, events numbered 1..n with at most one final event and that
one last, no event from an attempt once a later attempt has started, a resumed job carrying its
predecessor's checkpoint. CI (CI set) runs derandomized, so a CI failure replays locally with CI=1.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

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

from outbox import lifecycle, watched
from outbox.attempt import Attempt
from outbox.errors import ActiveJobExists, FencedOut, JobCancelled
from outbox.lifecycle import FailOutcome, StartOutcome
from outbox.watched import CancelOutcome, ResumeRefused
from tests.harness.toy_kind import WATCHED_TASK, register_watched_toy

KEY = "toy:the-one-lock"
MAX_ATTEMPTS = 3
TERMINAL = {"done", "dead", "cancelled"}
ACTIVE = {"pending", "running", "retrying"}
FINAL_EVENT = {"done": "complete", "dead": "error", "cancelled": "cancelled"}
#: How many attempts behind the newest a write comes from: mostly the current one.
BACK = st.sampled_from([0, 0, 0, 1, 2])
TABLES = "outbox_job, outbox_request, outbox_event, outbox_progress, outbox_checkpoint, outbox_attempt"


@dataclass
class ModelJob:
    """What the model expects of one job."""

    id: int
    status: str = "pending"
    attempts: int = 0
    cancel_requested: bool = False
    lease_lapsed: bool = False
    due: bool = True
    checkpoint: Any = None
    resumed_checkpoint: Any = None


class WatchedJobMachine(RuleBasedStateMachine):
    database_url: str

    def __init__(self) -> None:
        super().__init__()
        self.db = psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row)
        self.jobs: list[ModelJob] = []
        self.terminal_seen: dict[int, str] = {}
        self.outcomes: Counter[str] = Counter()
        self.units = 0

    def teardown(self) -> None:
        self.db.close()

    # -- helpers --------------------------------------------------------------------------------
    @property
    def active(self) -> ModelJob | None:
        found = [job for job in self.jobs if job.status in ACTIVE]
        assert len(found) <= 1, "the lock let two jobs of one key be active"
        return found[0] if found else None

    def chosen(self, pick: int) -> ModelJob:
        """Mostly the active job (where the action is), sometimes any job of the chain."""
        active = self.active
        return active if active is not None and pick < 8 else self.jobs[pick % len(self.jobs)]

    def holds(self, job: ModelJob, attempt: int) -> bool:
        return job.status == "running" and job.attempts == attempt

    def attempt_of(self, job: ModelJob, number: int) -> Attempt:
        return Attempt(job_id=job.id, attempt=number, payload={}, coalescing_key=KEY,
                       _connection=lambda: psycopg.connect(self.database_url))

    def submit(self) -> int:
        with psycopg.connect(self.database_url) as conn:
            return watched.submit(conn, task=WATCHED_TASK, coalescing_key=KEY, payload={"units": 3},
                                  correlation_id=uuid.uuid4().hex, trigger_reason="test", actor_type="client",
                                  actor_id="7").job_id

    # -- rules ----------------------------------------------------------------------------------
    @initialize()
    def first_job(self) -> None:
        self.db.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        self.jobs.append(ModelJob(self.submit()))

    @rule(now=st.integers(0, 3))
    def submit_under_the_same_lock(self, now: int) -> None:
        active = self.active
        if active is not None and now:
            return  # mostly while nothing is active: a refusal is quick to find, a new chain is not
        try:
            job_id = self.submit()
        except ActiveJobExists as refused:
            assert active is not None, "refused with no active job"
            assert refused.active_job_id == active.id
            self.outcomes["submit refused"] += 1
            return
        assert active is None, f"a second job was admitted while job {active.id} is active"
        self.jobs.append(ModelJob(job_id))

    @precondition(lambda self: self.active is not None)
    @rule(redelivered=st.booleans())
    def deliver(self, redelivered: bool) -> None:
        job = self.active
        assert job is not None
        start = lifecycle.start(self.db, job.id, redelivered=redelivered, lease_seconds=60)
        if job.status == "running":
            if not redelivered and not job.lease_lapsed:
                expected = StartOutcome.DUPLICATE
            elif job.cancel_requested:
                expected, job.status = StartOutcome.FINISHED, "cancelled"
            elif job.attempts >= MAX_ATTEMPTS:
                expected, job.status = StartOutcome.DEAD, "dead"
            else:
                expected = StartOutcome.STARTED
                job.attempts += 1
                job.lease_lapsed = False
        elif not job.due:
            expected = StartOutcome.BUSY
        else:
            expected, job.status = StartOutcome.STARTED, "running"
            job.attempts += 1
            job.lease_lapsed = False
        assert start.outcome == expected, (start, job)
        if expected is StartOutcome.STARTED:
            assert start.attempt == job.attempts
            assert watched.load_checkpoint(self.db, job.id) == job.checkpoint
        self.outcomes[f"start {expected}"] += 1

    @precondition(lambda self: self.active is not None and self.active.status == "running")
    @rule()
    def lease_lapses(self) -> None:
        job = self.active
        assert job is not None
        self.db.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 hour' WHERE id = %s", [job.id])
        job.lease_lapsed = True

    @precondition(lambda self: self.active is not None and self.active.status == "retrying")
    @rule()
    def retry_falls_due(self) -> None:
        job = self.active
        assert job is not None
        self.db.execute("UPDATE outbox_job SET next_run_at = now() - interval '1 second' WHERE id = %s", [job.id])
        job.due = True

    @precondition(lambda self: any(job.attempts for job in self.jobs))
    @rule(pick=st.integers(0, 10), back=BACK)
    def report_progress(self, pick: int, back: int) -> None:
        job = self.chosen(pick)
        number = max(job.attempts - back, 1)
        answer = self.db.execute(
            "SELECT outbox_report_progress(%s, %s, 'work', NULL, 'moving', %s, 3, interval '0') AS a",
            [job.id, number, self.units]).fetchone()["a"]
        assert answer == ("event" if self.holds(job, number) else "stale"), (answer, job, number)
        self.outcomes[f"progress {answer}"] += 1

    @precondition(lambda self: any(job.attempts for job in self.jobs))
    @rule(pick=st.integers(0, 10), back=BACK)
    def run_a_unit(self, pick: int, back: int) -> None:
        job = self.chosen(pick)
        number = max(job.attempts - back, 1)
        self.units += 1
        attempt = self.attempt_of(job, number)
        try:
            with attempt.unit() as conn:
                attempt.checkpoint(conn, self.units)
        except FencedOut:
            assert not self.holds(job, number), (job, number)
            self.outcomes["unit fenced"] += 1
            return
        except JobCancelled:
            assert self.holds(job, number) and job.cancel_requested, (job, number)
            self.outcomes["unit cancelled"] += 1
            return
        assert self.holds(job, number) and not job.cancel_requested, (job, number)
        job.checkpoint = self.units
        self.outcomes["unit done"] += 1

    @precondition(lambda self: any(job.attempts for job in self.jobs))
    @rule(pick=st.integers(0, 10), back=BACK)
    def complete(self, pick: int, back: int) -> None:
        job = self.chosen(pick)
        number = max(job.attempts - back, 1)
        done = lifecycle.complete(self.db, job.id, number, {"units": 3})
        assert done == self.holds(job, number), (job, number)
        if done:
            job.status = "done"
        self.outcomes[f"complete {done}"] += 1

    @precondition(lambda self: any(job.attempts for job in self.jobs))
    @rule(pick=st.integers(0, 10), back=BACK, retryable=st.booleans())
    def fail(self, pick: int, back: int, retryable: bool) -> None:
        job = self.chosen(pick)
        number = max(job.attempts - back, 1)
        outcome = lifecycle.fail(self.db, job.id, number, error="boom", retryable=retryable, retry_in_seconds=3600)
        if not self.holds(job, number):
            expected = FailOutcome.STALE
        elif job.cancel_requested:
            expected, job.status = FailOutcome.CANCELLED, "cancelled"
        elif retryable and job.attempts < MAX_ATTEMPTS:
            expected, job.status, job.due = FailOutcome.RETRYING, "retrying", False
        else:
            expected, job.status = FailOutcome.DEAD, "dead"
        assert outcome == expected, (outcome, job, number)
        self.outcomes[f"fail {outcome}"] += 1

    @precondition(lambda self: any(job.attempts for job in self.jobs))
    @rule(pick=st.integers(0, 10), back=BACK)
    def stop_as_cancelled(self, pick: int, back: int) -> None:
        job = self.chosen(pick)
        number = max(job.attempts - back, 1)
        stopped = lifecycle.finish_cancelled(self.db, job.id, number)
        assert stopped == (self.holds(job, number) and job.cancel_requested), (job, number)
        if stopped:
            job.status = "cancelled"

    @precondition(lambda self: self.active is not None)
    @rule(pick=st.integers(0, 10), early=st.integers(0, 3))
    def cancel(self, pick: int, early: int) -> None:
        job = self.chosen(pick)
        if job.attempts == 0 and early:
            return  # most cancels come after the start: a job cancelled before it runs has no more story
        outcome = watched.cancel(self.db, job.id)
        if job.status in TERMINAL:
            expected = CancelOutcome.FINISHED
        elif job.status == "running":
            expected, job.cancel_requested = CancelOutcome.REQUESTED, True
        else:
            expected, job.status, job.cancel_requested = CancelOutcome.CANCELLED, "cancelled", True
        assert outcome == expected, (outcome, job)
        self.outcomes[f"cancel {outcome}"] += 1

    @precondition(lambda self: any(job.status in {"dead", "cancelled"} for job in self.jobs))
    @rule(pick=st.integers(0, 10))
    def resume(self, pick: int) -> None:
        resumable = [job for job in self.jobs if job.status in {"dead", "cancelled"}]
        job = resumable[pick % len(resumable)] if pick < 8 else self.jobs[pick % len(self.jobs)]
        if self.active is not None and pick < 6:
            return  # as with submissions: mostly when the lock is free
        active = self.active
        try:
            new_id = watched.resume(self.db, job.id, correlation_id=uuid.uuid4().hex, trigger_reason="test",
                                    actor_type="client", actor_id="7")
        except ResumeRefused as refused:
            if job.status not in {"dead", "cancelled"}:
                assert refused.reason == "not_resumable", (refused, job)
            else:
                assert active is not None and (refused.reason, refused.active_job_id) == ("active", active.id)
            self.outcomes[f"resume {refused.reason}"] += 1
            return
        assert job.status in {"dead", "cancelled"} and active is None, (job, active)
        self.jobs.append(ModelJob(new_id, checkpoint=job.checkpoint, resumed_checkpoint=job.checkpoint))
        self.outcomes["resumed"] += 1

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def the_database_agrees_with_the_model(self) -> None:
        for job in self.jobs:
            row = self.db.execute("SELECT status::text, attempts, cancel_requested_at IS NOT NULL AS asked, "
                                  "finished_at IS NOT NULL AS finished FROM outbox_job WHERE id = %s",
                                  [job.id]).fetchone()
            assert (row["status"], row["attempts"]) == (job.status, job.attempts), (row, job)
            assert row["asked"] == job.cancel_requested, (row, job)
            assert row["finished"] == (job.status in TERMINAL), row

    @invariant()
    def a_terminal_state_is_reached_once_and_never_left(self) -> None:
        for job in self.jobs:
            if job.id in self.terminal_seen:
                assert job.status == self.terminal_seen[job.id], (job, self.terminal_seen[job.id])
            elif job.status in TERMINAL:
                self.terminal_seen[job.id] = job.status

    @invariant()
    def events_are_numbered_without_gaps_end_once_and_never_come_from_an_overtaken_attempt(self) -> None:
        for job in self.jobs:
            events = self.db.execute("SELECT seq, kind::text, attempt FROM outbox_event WHERE job_id = %s "
                                     "ORDER BY seq", [job.id]).fetchall()
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
            finals = [i for i, e in enumerate(events) if e["kind"] in FINAL_EVENT.values()]
            if job.status in TERMINAL:
                assert finals == [len(events) - 1], events
                assert events[-1]["kind"] == FINAL_EVENT[job.status], events
            else:
                assert finals == [], events
            attempts = [e["attempt"] for e in events]
            assert attempts == sorted(attempts), f"an overtaken attempt wrote after its successor: {events}"
            started = [e["attempt"] for e in events if e["kind"] == "started"]
            assert started == list(range(1, job.attempts + 1)), events

    @invariant()
    def each_attempt_is_recorded_once_with_one_outcome(self) -> None:
        for job in self.jobs:
            rows = self.db.execute("SELECT attempt, count(*) AS n FROM outbox_attempt WHERE job_id = %s "
                                   "GROUP BY attempt", [job.id]).fetchall()
            assert all(r["n"] == 1 for r in rows), rows
            assert all(1 <= r["attempt"] <= job.attempts for r in rows), rows


def run_machine(database_url: str, **overrides: Any) -> Counter[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, mode="unique_active", max_attempts=MAX_ATTEMPTS)
    outcomes: Counter[str] = Counter()

    class Machine(WatchedJobMachine):
        def teardown(self) -> None:
            outcomes.update(self.outcomes)
            super().teardown()

    Machine.database_url = database_url
    run_state_machine_as_test(Machine, settings=settings(deadline=None, derandomize=bool(os.environ.get("CI")),
                                                         print_blob=True, **overrides))
    return outcomes


def test_any_interleaving_of_attempts_takeovers_cancels_failures_and_resumes_keeps_one_terminal_state(
    database_url: str,
) -> None:
    outcomes = run_machine(database_url, max_examples=100, stateful_step_count=40)
    # The run reached the paths it claims to (hypothesis could in principle avoid them).
    for path in ("start started", "progress stale", "unit fenced", "unit cancelled", "cancel requested",
                 "resumed", "submit refused", "fail retrying"):
        assert outcomes[path], (path, outcomes)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_many_long_interleavings_of_a_watched_job_keep_one_terminal_state(database_url: str) -> None:
    outcomes = run_machine(database_url, max_examples=400, stateful_step_count=80)
    assert outcomes["resumed"] and outcomes["unit cancelled"], outcomes
