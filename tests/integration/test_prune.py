"""Outbox retention against real PostgreSQL: what pruning removes, what it must keep, and
that it works in short batches that never wait on live work.

Jobs reach their states through the lifecycle functions a worker uses; only their age is set
by hand (finished_at moved into the past), never by sleeping.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import outbox
from outbox import lifecycle
from outbox.prune import PruneReport, prune_finished, purge_dead

TASK = "compliance.recalculate_property"
RETENTION = timedelta(days=14)
OLD = timedelta(days=15)


class CountingConnection(psycopg.Connection):
    """A real connection that counts the transactions it opens (one per batch)."""

    transactions = 0

    def transaction(self, *args: Any, **kwargs: Any) -> Any:
        self.transactions += 1
        return super().transaction(*args, **kwargs)


def new_key() -> str:
    return f"test:{uuid.uuid4().hex}"


def enqueue(conn: psycopg.Connection, key: str, requests: int = 1) -> int:
    job_ids = {
        outbox.enqueue(conn, task=TASK, coalescing_key=key, payload={"property_id": 1},
                       correlation_id=f"corr-{uuid.uuid4().hex}", trigger_reason="client_upload",
                       actor_type="client").job_id
        for _ in range(requests)
    }
    conn.commit()
    [job_id] = job_ids
    return job_id


def run(conn: psycopg.Connection, job_id: int, *, succeed: bool) -> None:
    started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
    assert started.attempt is not None
    if succeed:
        assert lifecycle.complete(conn, job_id, started.attempt)
    else:
        assert lifecycle.fail(conn, job_id, started.attempt, error="boom", retryable=False,
                              retry_in_seconds=1) is lifecycle.FailOutcome.DEAD
    conn.commit()


def finished_job(conn: psycopg.Connection, *, succeed: bool = True, age: timedelta = OLD, requests: int = 1) -> int:
    job_id = enqueue(conn, new_key(), requests)
    run(conn, job_id, succeed=succeed)
    age_job(conn, job_id, age)
    return job_id


def age_job(conn: psycopg.Connection, job_id: int, age: timedelta) -> None:
    conn.execute("UPDATE outbox_job SET finished_at = now() - %s WHERE id = %s", [age, job_id])
    conn.commit()


def existing(conn: psycopg.Connection, job_ids: list[int]) -> set[int]:
    rows = conn.execute("SELECT id FROM outbox_job WHERE id = ANY(%s)", [job_ids]).fetchall()
    conn.commit()
    return {r[0] for r in rows}


def requests_of(conn: psycopg.Connection, job_ids: list[int]) -> int:
    row = conn.execute("SELECT count(*) FROM outbox_request WHERE job_id = ANY(%s)", [job_ids]).fetchone()
    conn.commit()
    assert row is not None
    return row[0]


def superseded_by_requeue(conn: psycopg.Connection, key: str) -> tuple[int, int]:
    """A DEAD job requeued while its key has a waiting job: it becomes superseded by that job.
    Returns (superseded, waiting)."""
    dead = enqueue(conn, key)
    run(conn, dead, succeed=False)
    waiting = enqueue(conn, key)
    assert waiting != dead
    assert lifecycle.requeue(conn, dead) == waiting
    conn.commit()
    return dead, waiting


def test_prune_removes_old_done_jobs_and_their_requests_and_keeps_dead_recent_and_unfinished_ones(
    conn: psycopg.Connection,
) -> None:
    old_done = finished_job(conn, requests=2)
    recent_done = finished_job(conn, age=timedelta(days=13))
    old_dead = finished_job(conn, succeed=False, age=timedelta(days=400))
    unfinished = enqueue(conn, new_key())
    conn.execute("UPDATE outbox_job SET created_at = now() - interval '400 days' WHERE id = %s", [unfinished])
    conn.commit()

    report = prune_finished(conn, older_than=RETENTION)

    assert report == PruneReport(jobs=1, requests=2)
    assert existing(conn, [old_done, recent_done, old_dead, unfinished]) == {recent_done, old_dead, unfinished}
    assert requests_of(conn, [old_done]) == 0
    assert requests_of(conn, [recent_done, old_dead, unfinished]) == 3


def test_a_task_with_its_own_retention_is_pruned_by_it_and_its_attempts_go_with_its_jobs(
    conn: psycopg.Connection,
) -> None:
    conn.execute("INSERT INTO outbox_task (name, description, mode, retention) "
                 "VALUES ('test.short_lived', 'kept one day', 'none', '1 day')")
    conn.commit()
    short = outbox.enqueue(conn, task="test.short_lived", coalescing_key="owner:1", payload={},
                           correlation_id="c-1", trigger_reason="submitted", actor_type="client").job_id
    conn.commit()
    run(conn, short, succeed=True)
    age_job(conn, short, timedelta(days=2))
    default = finished_job(conn, age=timedelta(days=2))  # the default 14 days: kept

    report = prune_finished(conn, older_than=RETENTION)

    assert report == PruneReport(jobs=1, requests=1)
    assert existing(conn, [short, default]) == {default}
    assert conn.execute("SELECT count(*) FROM outbox_attempt WHERE job_id = %s", [short]).fetchone() == (0,)


def test_prune_deletes_in_batches_of_the_given_size_one_transaction_each(database_url: str) -> None:
    with CountingConnection.connect(database_url) as conn:
        jobs = [finished_job(conn) for _ in range(7)]
        conn.transactions = 0

        report = prune_finished(conn, older_than=RETENTION, batch_size=3)

        assert report == PruneReport(jobs=7, requests=7)
        assert existing(conn, jobs) == set()
        assert conn.transactions == 4  # 3 + 3 + 1, then one that finds nothing left


def test_prune_skips_a_job_another_transaction_holds_instead_of_waiting_for_it(
    conn: psycopg.Connection, database_url: str
) -> None:
    held, free = finished_job(conn), finished_job(conn)
    with psycopg.connect(database_url) as other:
        other.execute("SET lock_timeout = '5s'")
        other.execute("SELECT 1 FROM outbox_job WHERE id = %s FOR UPDATE", [held])
        conn.execute("SET lock_timeout = '1s'")  # a wait would fail the prune, not hang it
        conn.commit()

        report = prune_finished(conn, older_than=RETENTION)

        assert report == PruneReport(jobs=1, requests=1)
        assert existing(conn, [held, free]) == {held}
    assert prune_finished(conn, older_than=RETENTION) == PruneReport(jobs=1, requests=1)


def test_a_superseded_job_and_the_job_that_superseded_it_are_both_pruned_when_old(conn: psycopg.Connection) -> None:
    superseded, successor = superseded_by_requeue(conn, new_key())
    run(conn, successor, succeed=True)
    age_job(conn, superseded, OLD)
    age_job(conn, successor, OLD)

    report = prune_finished(conn, older_than=RETENTION, batch_size=1)

    assert report == PruneReport(jobs=2, requests=2)
    assert existing(conn, [superseded, successor]) == set()


def test_an_old_done_job_is_kept_while_a_recent_superseded_job_still_names_it(conn: psycopg.Connection) -> None:
    superseded, successor = superseded_by_requeue(conn, new_key())
    run(conn, successor, succeed=True)
    age_job(conn, successor, OLD)
    age_job(conn, superseded, timedelta(days=1))

    assert prune_finished(conn, older_than=RETENTION) == PruneReport(jobs=0, requests=0)
    assert existing(conn, [superseded, successor]) == {superseded, successor}


def test_purge_dead_by_id_removes_only_that_dead_job_and_its_requests(conn: psycopg.Connection) -> None:
    target = finished_job(conn, succeed=False, age=timedelta(0), requests=2)
    other_dead = finished_job(conn, succeed=False, age=timedelta(0))
    done = finished_job(conn, age=timedelta(0))

    report = purge_dead(conn, job_ids=[target, done])

    assert report == PruneReport(jobs=1, requests=2)
    assert existing(conn, [target, other_dead, done]) == {other_dead, done}


def test_purge_dead_by_key_takes_the_superseded_jobs_that_name_the_dead_one(conn: psycopg.Connection) -> None:
    key = new_key()
    superseded, successor = superseded_by_requeue(conn, key)
    run(conn, successor, succeed=False)  # the successor dies too
    unrelated = finished_job(conn, succeed=False)

    report = purge_dead(conn, coalescing_key=key)

    assert report == PruneReport(jobs=2, requests=2)
    assert existing(conn, [superseded, successor, unrelated]) == {unrelated}


def test_purge_dead_before_a_time_removes_the_jobs_that_died_earlier_in_batches(conn: psycopg.Connection) -> None:
    early = [finished_job(conn, succeed=False, age=timedelta(days=3)) for _ in range(3)]
    late = finished_job(conn, succeed=False, age=timedelta(hours=1))

    report = purge_dead(conn, all_before=datetime.now(UTC) - timedelta(days=1), batch_size=2)

    assert report == PruneReport(jobs=3, requests=3)
    assert existing(conn, [*early, late]) == {late}


def test_a_dead_job_requeued_before_the_purge_is_not_purged(conn: psycopg.Connection) -> None:
    job_id = finished_job(conn, succeed=False)
    assert lifecycle.requeue(conn, job_id) == job_id
    conn.commit()

    assert purge_dead(conn, job_ids=[job_id]) == PruneReport(jobs=0, requests=0)
    assert existing(conn, [job_id]) == {job_id}


@pytest.mark.parametrize("selectors", [
    pytest.param({}, id="none"),
    pytest.param({"job_ids": [1], "coalescing_key": "k"}, id="two"),
])
def test_purge_dead_needs_exactly_one_selector(conn: psycopg.Connection, selectors: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one of job_ids, coalescing_key, all_before"):
        purge_dead(conn, **selectors)


def test_purge_dead_refuses_a_naive_time(conn: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        purge_dead(conn, all_before=datetime(2026, 1, 1))  # naive on purpose


def test_prune_refuses_a_connection_inside_a_transaction_whose_batches_could_not_commit(
    conn: psycopg.Connection,
) -> None:
    old_done = finished_job(conn)
    conn.execute("SELECT 1")  # opens a transaction on this non-autocommit connection
    with pytest.raises(ValueError, match="not IDLE"):
        prune_finished(conn, older_than=RETENTION)
    conn.rollback()
    assert existing(conn, [old_done]) == {old_done}
