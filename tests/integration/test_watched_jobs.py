"""The engine's watched jobs, driven in-process with the watched toy kind: events, progress
fenced by attempt, checkpoints, cancel, results and structured errors.

Each test runs the real runner against real PostgreSQL; a `hook` the handler calls before each
unit is where a test cancels, takes the job over, or waits.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import lifecycle, watched
from outbox.attempt import Attempt
from outbox.backoff import RetryPolicy
from outbox.errors import FencedOut
from outbox.outcomes import Cancelled, Completed, Dropped, RetryLater
from outbox.runner import JobRunner, RunnerPolicy
from outbox.watched import CancelOutcome, ProgressWriter
from tests.harness.jobs import property_with_one_job
from tests.harness.toy_kind import TOY_UNIT_TABLE, WATCHED_TASK, WatchedToyHandler, register_watched_toy

POLICY = RunnerPolicy(retry=RetryPolicy(base_seconds=1, max_seconds=5), infra_retry=RetryPolicy(1, 5),
                      busy_retry_seconds=0.1)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        register_watched_toy(conn, max_attempts=3)
        conn.execute(TOY_UNIT_TABLE)
        yield conn


def submit(database_url: str, **payload: Any) -> int:
    with psycopg.connect(database_url) as conn:
        made = watched.submit(conn, task=WATCHED_TASK, coalescing_key=f"toy:{uuid.uuid4().hex[:8]}",
                              payload=payload, correlation_id=uuid.uuid4().hex, trigger_reason="test",
                              actor_type="client", actor_id="7")
    return made.job_id


def runner(database_url: str, hook: Callable[[Attempt, int], None] | None = None) -> JobRunner:
    return JobRunner(handler=WatchedToyHandler(hook), connection=lambda: psycopg.connect(database_url),
                     policy=POLICY)


def events(db: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    return db.execute("SELECT seq, kind::text, attempt, data FROM outbox_event WHERE job_id = %s ORDER BY seq",
                      [job_id]).fetchall()


def kinds(db: psycopg.Connection, job_id: int) -> list[str]:
    return [e["kind"] for e in events(db, job_id)]


def job(db: psycopg.Connection, job_id: int) -> dict[str, Any]:
    return db.execute("SELECT status::text, attempts, result, error, owner, stages FROM outbox_job WHERE id = %s",
                      [job_id]).fetchone()


def units(db: psycopg.Connection, job_id: int) -> list[tuple[int, int]]:
    return [(r["unit"], r["attempt"]) for r in db.execute(
        "SELECT unit, attempt FROM toy_unit WHERE job_id = %s ORDER BY unit, attempt", [job_id])]


def start(database_url: str, job_id: int) -> int:
    """Starts an attempt of the job as a worker would, outside the runner; returns its number."""
    with psycopg.connect(database_url) as conn:
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
    assert started.attempt is not None, started
    return started.attempt


def due_now(db: psycopg.Connection, job_id: int) -> None:
    db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])


def test_a_watched_job_keeps_its_owner_stages_events_in_sequence_and_its_result(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=3)
    assert job(db, job_id)["owner"] == "client:7"
    assert [s["key"] for s in job(db, job_id)["stages"]] == ["prepare", "work", "finish"]

    outcome = runner(database_url).run(job_id)

    assert isinstance(outcome, Completed)
    found = events(db, job_id)
    assert [e["seq"] for e in found] == list(range(1, len(found) + 1)), "no gaps, no repeats"
    assert found[0]["kind"] == "queued" and found[1]["kind"] == "started" and found[-1]["kind"] == "complete"
    assert {e["kind"] for e in found[2:-1]} == {"progress"}
    assert found[-1]["data"] == {"result": {"units": 3}}
    assert job(db, job_id)["result"] == {"units": 3}
    progress = db.execute("SELECT stage, stage_index, last_seq FROM outbox_progress WHERE job_id = %s",
                          [job_id]).fetchone()
    assert (progress["stage"], progress["stage_index"], progress["last_seq"]) == ("finish", 2, found[-1]["seq"])


def test_progress_from_an_attempt_that_lost_its_job_is_refused_and_writes_nothing(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=2)
    attempt = start(database_url, job_id)
    db.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id])
    assert start(database_url, job_id) == 2  # taken over
    before = events(db, job_id)

    with pytest.raises(FencedOut):
        ProgressWriter(job_id, attempt).report(lambda: psycopg.connect(database_url), stage="work")

    assert events(db, job_id) == before


def test_nothing_is_written_after_a_terminal_state(db: psycopg.Connection, database_url: str) -> None:
    job_id = submit(database_url, units=1)
    assert isinstance(runner(database_url).run(job_id), Completed)
    before = events(db, job_id)

    with pytest.raises(FencedOut):
        ProgressWriter(job_id, 1).report(lambda: psycopg.connect(database_url), stage="work", fraction=0.5)

    assert events(db, job_id) == before
    assert job(db, job_id)["status"] == "done"


def test_a_retry_resumes_from_its_checkpoint_and_its_events_carry_its_attempt(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=4, fail_at_unit=2, fail_attempts=1)

    first = runner(database_url).run(job_id)
    assert isinstance(first, RetryLater) and first.counted
    failed = job(db, job_id)
    assert failed["status"] == "retrying"
    assert failed["error"] == {"stage": "work", "message": "RuntimeError: toy failure at unit 2", "can_resume": True}
    due_now(db, job_id)
    second = runner(database_url).run(job_id)

    assert isinstance(second, Completed)
    assert units(db, job_id) == [(0, 1), (1, 1), (2, 2), (3, 2)], "finished units are not repeated"
    after_retry = [e for e in events(db, job_id) if e["seq"] > max(
        e["seq"] for e in events(db, job_id) if e["kind"] == "retrying")]
    assert after_retry and {e["attempt"] for e in after_retry} == {2}
    assert "retrying" in kinds(db, job_id)


def test_cancelling_a_job_that_has_not_started_cancels_it_at_once_and_no_delivery_runs_it(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=2)

    assert watched.cancel(db, job_id) is CancelOutcome.CANCELLED
    outcome = runner(database_url).run(job_id)

    assert isinstance(outcome, Dropped)
    assert job(db, job_id)["status"] == "cancelled"
    assert kinds(db, job_id) == ["queued", "cancelled"]
    assert units(db, job_id) == []
    assert watched.cancel(db, job_id) is CancelOutcome.FINISHED


def test_cancelling_a_running_job_stops_it_at_its_next_unit_and_it_is_never_retried(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=5)

    def cancel_at_unit_2(attempt: Attempt, unit: int) -> None:
        if unit == 2:
            with psycopg.connect(database_url, autocommit=True) as other:
                assert watched.cancel(other, job_id) is CancelOutcome.REQUESTED

    outcome = runner(database_url, cancel_at_unit_2).run(job_id)

    assert isinstance(outcome, Cancelled)
    assert units(db, job_id) == [(0, 1), (1, 1)], "unit 2 was never begun"
    assert job(db, job_id)["status"] == "cancelled"
    assert kinds(db, job_id)[-2:] == ["cancel_requested", "cancelled"]
    assert db.execute("SELECT outcome::text FROM outbox_attempt WHERE job_id = %s", [job_id]).fetchone()["outcome"] \
        == "cancelled"
    assert isinstance(runner(database_url).run(job_id, redelivered=True), Dropped)


def test_a_failure_after_a_cancel_request_ends_the_job_cancelled_not_retried(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=3)
    attempt = start(database_url, job_id)
    assert watched.cancel(db, job_id) is CancelOutcome.REQUESTED

    with psycopg.connect(database_url) as conn:
        outcome = lifecycle.fail(conn, job_id, attempt, error="boom", retryable=True, retry_in_seconds=0)

    assert outcome is lifecycle.FailOutcome.CANCELLED
    assert job(db, job_id)["status"] == "cancelled"
    assert kinds(db, job_id)[-1] == "cancelled"


def test_a_cancelled_job_whose_worker_died_is_cancelled_not_taken_over(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=3)
    start(database_url, job_id)
    assert watched.cancel(db, job_id) is CancelOutcome.REQUESTED
    db.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id])

    outcome = runner(database_url).run(job_id, redelivered=True)

    assert isinstance(outcome, Dropped)
    assert job(db, job_id)["status"] == "cancelled" and units(db, job_id) == []


def _race_cancel_with_completion(db: psycopg.Connection, database_url: str) -> tuple[str, tuple[str, ...]]:
    job_id = submit(database_url, units=1)
    go = threading.Barrier(2)

    def cancel() -> None:
        go.wait(10)
        with psycopg.connect(database_url, autocommit=True) as other:
            watched.cancel(other, job_id)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    runner(database_url, lambda attempt, unit: go.wait(10)).run(job_id)
    canceller.join(10)
    final = tuple(k for k in kinds(db, job_id) if k in ("complete", "error", "cancelled"))
    return job(db, job_id)["status"], final


def test_a_cancel_racing_completion_ends_in_exactly_one_terminal_state(
    db: psycopg.Connection, database_url: str
) -> None:
    for _ in range(10):
        assert _race_cancel_with_completion(db, database_url) in {("done", ("complete",)),
                                                                  ("cancelled", ("cancelled",))}


def test_a_recalculation_cannot_be_cancelled(db: psycopg.Connection, database_url: str) -> None:
    _, job_id = property_with_one_job(database_url)

    assert watched.cancel(db, job_id) is CancelOutcome.NOT_CANCELLABLE
    assert db.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone()["status"] == "pending"


def test_a_flood_of_progress_reports_writes_about_one_event_a_second_and_every_stage_change(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=1)
    attempt = start(database_url, job_id)
    writer = ProgressWriter(job_id, attempt)
    connect = lambda: psycopg.connect(database_url)  # noqa: E731
    before = len(events(db, job_id))

    for i in range(2000):
        writer.report(connect, stage="work", current=i, total=2000, message="x" * 100)
    writer.report(connect, stage="finish")

    written = events(db, job_id)[before:]
    assert 2 <= len(written) <= 5, [e["data"] for e in written]
    assert [e["data"]["stage"] for e in written][-1] == "finish"
    assert all(len(str(e["data"])) < 1000 for e in written)


def test_pruning_a_finished_watched_job_removes_its_events_attempts_and_checkpoint_and_leaves_a_tombstone(
    db: psycopg.Connection, database_url: str
) -> None:
    from outbox.prune import prune_finished, prune_tombstones

    job_id = submit(database_url, units=2)
    assert isinstance(runner(database_url).run(job_id), Completed)
    db.execute("UPDATE outbox_job SET finished_at = now() - interval '30 days' WHERE id = %s", [job_id])
    side = ("outbox_event", "outbox_progress", "outbox_checkpoint", "outbox_attempt", "outbox_request")
    assert all(db.execute(f"SELECT count(*) AS n FROM {t} WHERE job_id = %s", [job_id]).fetchone()["n"] for t in side)

    with psycopg.connect(database_url, autocommit=True) as conn:
        report = prune_finished(conn, older_than=timedelta(days=14))

    assert report.jobs == 1
    assert [db.execute(f"SELECT count(*) AS n FROM {t} WHERE job_id = %s", [job_id]).fetchone()["n"]
            for t in side] == [0] * len(side)
    tomb = db.execute("SELECT owner, reason, keep_until > now() AS kept FROM outbox_tombstone WHERE job_id = %s",
                      [job_id]).fetchone()
    assert tomb == {"owner": "client:7", "reason": "expired", "kept": True}
    assert units(db, job_id) == [(0, 1), (1, 1)], "the domain's rows stay"

    db.execute("UPDATE outbox_tombstone SET keep_until = now() - interval '1 second' WHERE job_id = %s", [job_id])
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert prune_tombstones(conn) == 1


def test_a_snapshot_shows_the_stage_by_number_and_words_and_its_last_seq_is_the_last_event(
    db: psycopg.Connection, database_url: str
) -> None:
    from outbox import job_views

    job_id = submit(database_url, units=2)
    queued = job_views.snapshot(db, job_id)
    assert queued is not None and queued.user_status == "queued" and queued.stage is None
    assert [s.display for s in queued.stages] == ["Preparing", "Working through the items", "Saving your results"]

    runner(database_url).run(job_id)
    done = job_views.snapshot(db, job_id)

    assert done is not None and done.final and done.user_status == "done"
    assert done.stage is not None and (done.stage.number, done.stage.key) == (3, "finish")
    assert done.last_seq == events(db, job_id)[-1]["seq"]
    assert [e.seq for e in job_views.events_after(db, job_id, done.last_seq - 1)] == [done.last_seq]
    assert job_views.snapshot(db, 999_999) is None and job_views.tombstone(db, 999_999) is None


def test_a_resumed_job_inherits_the_checkpoint_and_repeats_no_finished_unit(
    db: psycopg.Connection, database_url: str
) -> None:
    job_id = submit(database_url, units=4, fail_at_unit=2, fail_attempts=9)
    db.execute("UPDATE outbox_job SET max_attempts = 1 WHERE id = %s", [job_id])
    assert runner(database_url).run(job_id).__class__.__name__ == "Dead"
    assert job(db, job_id)["status"] == "dead"

    with psycopg.connect(database_url) as conn:
        resumed = watched.resume(conn, job_id, correlation_id="resume-1", trigger_reason="resume",
                                 actor_type="client", actor_id="7")
    with psycopg.connect(database_url) as conn:
        again = watched.resume(conn, job_id, correlation_id="resume-1", trigger_reason="resume",
                               actor_type="client", actor_id="7")
    db.execute("UPDATE outbox_job SET payload = payload || '{\"fail_at_unit\": null}' WHERE id = %s", [resumed])
    outcome = runner(database_url).run(resumed)

    assert again == resumed, "a repeated resume is the same job"
    assert isinstance(outcome, Completed)
    assert units(db, job_id) == [(0, 1), (1, 1)] and units(db, resumed) == [(2, 1), (3, 1)]
    assert job(db, resumed)["owner"] == "client:7"
    assert kinds(db, resumed)[0] == "queued"


def test_a_job_that_did_not_fail_cannot_be_resumed(db: psycopg.Connection, database_url: str) -> None:
    job_id = submit(database_url, units=1)

    with psycopg.connect(database_url) as conn, pytest.raises(watched.ResumeRefused) as refused:
        watched.resume(conn, job_id, correlation_id="r", trigger_reason="resume", actor_type="client", actor_id="7")

    assert refused.value.reason == "not_resumable"
