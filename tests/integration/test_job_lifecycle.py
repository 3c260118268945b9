"""A worker's side of the job lifecycle (docs/job-states.md), through `outbox.lifecycle`.

Each step commits, as separate workers would, so every transition is checked on committed
rows. Leases are expired by moving `lease_expires_at` into the past, never by sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import errors

import outbox
from outbox import lifecycle
from outbox.lifecycle import FailOutcome, StartOutcome
from tests.harness.observe import waits_on_a_lock
from tests.harness.system import wait_until

TASK = "compliance.recalculate_property"
LEASE = 60.0


@pytest.fixture
def conn(module_database_url: str) -> Iterator[psycopg.Connection]:
    """Overrides the conftest `conn`: a connection to this module's shared database."""
    with psycopg.connect(module_database_url) as connection:
        yield connection
        connection.rollback()


@pytest.fixture
def key() -> str:
    """A coalescing key no other test uses."""
    return f"test:{uuid.uuid4().hex}"


def new_job(conn: psycopg.Connection, key: str, correlation_id: str = "corr-1", **kw: Any) -> int:
    job_id = outbox.enqueue(
        conn,
        task=TASK,
        coalescing_key=key,
        payload={"property_id": 1},
        correlation_id=correlation_id,
        trigger_reason="client_upload",
        actor_type="client",
        **kw,
    ).job_id
    conn.commit()
    return job_id


def start(conn: psycopg.Connection, job_id: int, *, redelivered: bool = False, **kw: Any) -> lifecycle.Start:
    result = lifecycle.start(conn, job_id, redelivered=redelivered, lease_seconds=LEASE, **kw)
    conn.commit()
    return result


def complete(conn: psycopg.Connection, job_id: int, attempt: int) -> bool:
    result = lifecycle.complete(conn, job_id, attempt)
    conn.commit()
    return result


def fail(conn: psycopg.Connection, job_id: int, attempt: int, *, retryable: bool, retry_in: float = 30) -> FailOutcome:
    result = lifecycle.fail(
        conn, job_id, attempt, error=f"boom {attempt}", retryable=retryable, retry_in_seconds=retry_in
    )
    conn.commit()
    return result


def job(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    """The job's row, with lease and next run as seconds from the database's clock."""
    cur = conn.execute(
        """
        SELECT status::text, attempts, max_attempts, last_error, superseded_by, requeue_count,
               started_at IS NOT NULL AS started, finished_at IS NOT NULL AS finished,
               extract(epoch FROM lease_expires_at - clock_timestamp())::float8 AS lease_left_s,
               extract(epoch FROM next_run_at - clock_timestamp())::float8 AS next_run_in_s,
               lease_expires_at, heartbeat_at
          FROM outbox_job WHERE id = %s
        """,
        [job_id],
    )
    assert cur.description is not None
    names = [c.name for c in cur.description]
    row = cur.fetchone()
    conn.commit()
    assert row is not None, f"job {job_id} does not exist"
    return dict(zip(names, row, strict=True))


def stored_row(conn: psycopg.Connection, job_id: int) -> tuple:
    """Every column of the job as stored, to show a call changed nothing at all."""
    row = conn.execute("SELECT * FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    conn.commit()
    assert row is not None
    return row


def expire_lease(conn: psycopg.Connection, job_id: int) -> None:
    conn.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [job_id])
    conn.commit()


def dead_job(conn: psycopg.Connection, key: str, correlation_id: str = "corr-1") -> int:
    job_id = new_job(conn, key, correlation_id, max_attempts=1)
    started = start(conn, job_id)
    assert fail(conn, job_id, started.attempt, retryable=False) is FailOutcome.DEAD
    return job_id


# --- start -----------------------------------------------------------------------------------


def test_starting_a_due_job_gives_attempt_1_under_a_lease(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)

    started = start(conn, job_id)

    assert started == lifecycle.Start(StartOutcome.STARTED, 1, {"property_id": 1}, key, None)
    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["started"], row["finished"]) == ("running", 1, True, False)
    assert LEASE - 5 < row["lease_left_s"] <= LEASE
    assert row["heartbeat_at"] is not None


def test_completing_with_the_current_attempt_marks_the_job_done(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    started = start(conn, job_id)

    assert complete(conn, job_id, started.attempt) is True

    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["finished"], row["lease_expires_at"]) == ("done", 1, True, None)


def test_a_stale_attempt_can_neither_complete_nor_fail_its_job(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    first = start(conn, job_id)
    expire_lease(conn, job_id)
    second = start(conn, job_id)
    assert (first.attempt, second.attempt) == (1, 2)

    assert complete(conn, job_id, first.attempt) is False
    assert fail(conn, job_id, first.attempt, retryable=True) is FailOutcome.STALE
    assert fail(conn, job_id, first.attempt, retryable=False) is FailOutcome.STALE
    row = job(conn, job_id)
    assert (row["status"], row["attempts"]) == ("running", 2)
    assert "boom" not in (row["last_error"] or "")

    assert complete(conn, job_id, second.attempt) is True
    assert complete(conn, job_id, second.attempt) is False  # a finished job cannot be completed twice
    assert fail(conn, job_id, second.attempt, retryable=True) is FailOutcome.STALE
    assert job(conn, job_id)["status"] == "done"


def test_completing_or_failing_a_job_that_never_started_is_refused(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)

    assert complete(conn, job_id, 0) is False
    assert complete(conn, job_id, 1) is False
    assert fail(conn, job_id, 1, retryable=False) is FailOutcome.STALE
    assert fail(conn, 999_999, 1, retryable=False) is FailOutcome.STALE
    assert job(conn, job_id)["status"] == "pending"


@pytest.mark.parametrize("finish", ["done", "dead"])
def test_starting_a_finished_job_reports_finished_and_changes_nothing(
    conn: psycopg.Connection, key: str, finish: str
) -> None:
    job_id = new_job(conn, key)
    started = start(conn, job_id)
    if finish == "done":
        assert complete(conn, job_id, started.attempt)
    else:
        assert fail(conn, job_id, started.attempt, retryable=False) is FailOutcome.DEAD
    before = stored_row(conn, job_id)

    again = start(conn, job_id, redelivered=True)

    assert (again.outcome, again.attempt) == (StartOutcome.FINISHED, 1)
    assert stored_row(conn, job_id) == before


def test_starting_a_job_that_does_not_exist_reports_missing(conn: psycopg.Connection) -> None:
    assert start(conn, 999_999).outcome is StartOutcome.MISSING


def test_a_second_delivery_while_the_attempt_is_alive_is_a_duplicate(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    start(conn, job_id)
    before = job(conn, job_id)

    duplicate = start(conn, job_id, redelivered=False)

    assert (duplicate.outcome, duplicate.attempt) == (StartOutcome.DUPLICATE, 1)
    after = job(conn, job_id)
    assert (after["status"], after["attempts"], after["lease_expires_at"]) == (
        "running",
        1,
        before["lease_expires_at"],
    )


@pytest.mark.parametrize("how", ["redelivered", "lease-expired"])
def test_a_lost_attempt_is_taken_over_as_a_new_attempt(conn: psycopg.Connection, key: str, how: str) -> None:
    job_id = new_job(conn, key)
    start(conn, job_id)
    if how == "lease-expired":
        expire_lease(conn, job_id)

    takeover = start(conn, job_id, redelivered=how == "redelivered")

    assert (takeover.outcome, takeover.attempt) == (StartOutcome.STARTED, 2)
    row = job(conn, job_id)
    assert (row["status"], row["attempts"]) == ("running", 2)
    assert LEASE - 5 < row["lease_left_s"] <= LEASE
    assert row["last_error"] == "attempt 1 was lost (worker died or lease expired)"


def test_a_lost_last_attempt_makes_the_job_dead(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key, max_attempts=2)
    start(conn, job_id)
    expire_lease(conn, job_id)
    assert start(conn, job_id).attempt == 2

    lost = start(conn, job_id, redelivered=True)

    assert (lost.outcome, lost.attempt) == (StartOutcome.DEAD, 2)
    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["finished"], row["lease_expires_at"]) == ("dead", 2, True, None)
    assert row["last_error"] == "attempt 2 of 2 was lost (worker died or lease expired)"


def test_a_job_waits_while_another_job_of_its_key_is_running(conn: psycopg.Connection, key: str) -> None:
    running = new_job(conn, key, correlation_id="corr-1")
    start(conn, running)
    waiting = new_job(conn, key, correlation_id="corr-2")

    busy = start(conn, waiting)

    assert (busy.outcome, busy.attempt, busy.retry_after_s) == (StartOutcome.BUSY, 0, None)
    assert (job(conn, waiting)["status"], job(conn, waiting)["attempts"]) == ("pending", 0)
    assert job(conn, running)["status"] == "running"


def test_a_job_started_before_its_next_run_is_busy_for_the_time_left(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    started = start(conn, job_id)
    assert fail(conn, job_id, started.attempt, retryable=True, retry_in=30) is FailOutcome.RETRYING

    early = start(conn, job_id, redelivered=False)

    assert early.outcome is StartOutcome.BUSY
    assert early.retry_after_s is not None and 25 < early.retry_after_s <= 30
    row = job(conn, job_id)
    assert (row["status"], row["attempts"]) == ("retrying", 1)


def test_a_lost_running_job_is_superseded_when_the_keys_next_job_starts(conn: psycopg.Connection, key: str) -> None:
    lost = new_job(conn, key, correlation_id="corr-1")
    start(conn, lost)
    successor = new_job(conn, key, correlation_id="corr-2")
    expire_lease(conn, lost)

    started = start(conn, successor)

    assert (started.outcome, started.attempt) == (StartOutcome.STARTED, 1)
    old = job(conn, lost)
    assert (old["status"], old["superseded_by"], old["finished"], old["lease_expires_at"]) == (
        "superseded",
        successor,
        True,
        None,
    )
    assert complete(conn, lost, 1) is False
    assert start(conn, lost, redelivered=True).outcome is StartOutcome.FINISHED


# --- fail ------------------------------------------------------------------------------------


def test_a_retryable_failure_with_attempts_left_is_retried_after_the_delay(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    started = start(conn, job_id)

    assert fail(conn, job_id, started.attempt, retryable=True, retry_in=42) is FailOutcome.RETRYING

    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["last_error"], row["lease_expires_at"]) == (
        "retrying",
        1,
        "boom 1",
        None,
    )
    assert 37 < row["next_run_in_s"] <= 42
    assert not row["finished"]


def test_a_retryable_failure_of_the_last_attempt_makes_the_job_dead(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key, max_attempts=2)
    first = start(conn, job_id)
    assert fail(conn, job_id, first.attempt, retryable=True, retry_in=0) is FailOutcome.RETRYING
    second = start(conn, job_id)
    assert second.attempt == 2

    assert fail(conn, job_id, second.attempt, retryable=True) is FailOutcome.DEAD

    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["last_error"], row["finished"]) == ("dead", 2, "boom 2", True)


def test_a_retryable_failure_while_the_key_has_a_waiting_job_is_superseded_by_that_job(
    conn: psycopg.Connection, key: str
) -> None:
    running = new_job(conn, key, correlation_id="corr-1")
    started = start(conn, running)
    waiting = new_job(conn, key, correlation_id="corr-2")  # a mutation landed while it ran

    assert fail(conn, running, started.attempt, retryable=True) is FailOutcome.SUPERSEDED

    row = job(conn, running)
    assert (row["status"], row["superseded_by"], row["last_error"], row["finished"], row["lease_expires_at"]) == (
        "superseded", waiting, "boom 1", True, None,
    )
    assert job(conn, waiting)["status"] == "pending"


def test_a_retryable_failure_racing_a_producer_that_creates_the_waiting_job_is_superseded_by_it(
    conn: psycopg.Connection, module_database_url: str, key: str
) -> None:
    running = new_job(conn, key, correlation_id="corr-1")
    started = start(conn, running)
    with psycopg.connect(module_database_url) as producer, ThreadPoolExecutor(1) as pool:
        waiting = outbox.enqueue(
            producer, task=TASK, coalescing_key=key, payload={"property_id": 1},
            correlation_id="corr-2", trigger_reason="client_upload", actor_type="client",
        ).job_id  # not committed yet: the failure's update must wait on its index entry
        failing = pool.submit(fail, conn, running, started.attempt, retryable=True)
        with psycopg.connect(module_database_url, autocommit=True) as probe:
            wait_until(lambda: waits_on_a_lock(probe, conn.info.backend_pid), 10,
                       "the failure to wait on the producer's new job")
        producer.commit()
        assert failing.result(timeout=10) is FailOutcome.SUPERSEDED

    assert (job(conn, running)["status"], job(conn, running)["superseded_by"]) == ("superseded", waiting)
    assert job(conn, waiting)["status"] == "pending"


def test_a_permanent_failure_while_the_key_has_a_waiting_job_still_makes_the_job_dead(
    conn: psycopg.Connection, key: str
) -> None:
    running = new_job(conn, key, correlation_id="corr-1")
    started = start(conn, running)
    new_job(conn, key, correlation_id="corr-2")

    assert fail(conn, running, started.attempt, retryable=False) is FailOutcome.DEAD
    assert job(conn, running)["status"] == "dead"


def test_a_permanent_failure_makes_the_job_dead_at_once(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    started = start(conn, job_id)

    assert fail(conn, job_id, started.attempt, retryable=False) is FailOutcome.DEAD

    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["max_attempts"], row["last_error"]) == ("dead", 1, 5, "boom 1")


def test_an_empty_error_is_recorded_as_unknown_and_a_long_one_is_cut(conn: psycopg.Connection, key: str) -> None:
    empty, long = new_job(conn, key), new_job(conn, f"{key}:2")
    lifecycle.fail(conn, empty, start(conn, empty).attempt, error="", retryable=False, retry_in_seconds=0)
    lifecycle.fail(conn, long, start(conn, long).attempt, error="e" * 5000, retryable=False, retry_in_seconds=0)
    conn.commit()

    assert job(conn, empty)["last_error"] == "unknown error"
    assert job(conn, long)["last_error"] == "e" * 2000


# --- resume ----------------------------------------------------------------------------------


def test_resuming_the_current_attempt_renews_its_lease_without_counting_an_attempt(
    conn: psycopg.Connection, key: str
) -> None:
    job_id = new_job(conn, key)
    start(conn, job_id)
    conn.execute("UPDATE outbox_job SET lease_expires_at = now() + interval '5 seconds' WHERE id = %s", [job_id])
    conn.commit()

    resumed = start(conn, job_id, redelivered=True, resume_attempt=1)

    assert (resumed.outcome, resumed.attempt) == (StartOutcome.STARTED, 1)
    row = job(conn, job_id)
    assert (row["status"], row["attempts"]) == ("running", 1)
    assert LEASE - 5 < row["lease_left_s"] <= LEASE
    assert complete(conn, job_id, 1) is True


def test_resuming_an_attempt_that_was_taken_over_does_not_resume_it(conn: psycopg.Connection, key: str) -> None:
    job_id = new_job(conn, key)
    start(conn, job_id)
    expire_lease(conn, job_id)
    assert start(conn, job_id).attempt == 2

    stale = start(conn, job_id, redelivered=False, resume_attempt=1)

    assert (stale.outcome, stale.attempt) == (StartOutcome.DUPLICATE, 2)
    assert job(conn, job_id)["attempts"] == 2


# --- requeue ---------------------------------------------------------------------------------


def test_requeueing_a_dead_job_gives_it_fresh_attempts(conn: psycopg.Connection, key: str) -> None:
    job_id = dead_job(conn, key)

    assert lifecycle.requeue(conn, job_id) == job_id
    conn.commit()

    row = job(conn, job_id)
    assert (row["status"], row["attempts"], row["finished"], row["requeue_count"]) == ("pending", 0, False, 1)
    assert -5 < row["next_run_in_s"] <= 0
    again = start(conn, job_id)
    assert (again.outcome, again.attempt) == (StartOutcome.STARTED, 1)


@pytest.mark.parametrize("status", ["pending", "running", "done"])
def test_requeueing_a_job_that_is_not_dead_does_nothing(conn: psycopg.Connection, key: str, status: str) -> None:
    job_id = new_job(conn, key)
    if status != "pending":
        started = start(conn, job_id)
        if status == "done":
            assert complete(conn, job_id, started.attempt)
    before = stored_row(conn, job_id)

    assert lifecycle.requeue(conn, job_id) is None
    conn.commit()

    assert stored_row(conn, job_id) == before
    assert job(conn, job_id)["status"] == status


def test_requeueing_a_job_that_does_not_exist_returns_none(conn: psycopg.Connection) -> None:
    assert lifecycle.requeue(conn, 999_999) is None


def test_requeueing_a_dead_job_while_its_key_has_a_waiting_job_supersedes_it(
    conn: psycopg.Connection, key: str
) -> None:
    dead = dead_job(conn, key, correlation_id="corr-1")
    waiting = new_job(conn, key, correlation_id="corr-2")

    assert lifecycle.requeue(conn, dead) == waiting
    conn.commit()

    row = job(conn, dead)
    assert (row["status"], row["superseded_by"], row["finished"]) == ("superseded", waiting, True)
    assert job(conn, waiting)["status"] == "pending"
    assert conn.execute(
        "SELECT count(*) FROM outbox_job WHERE coalescing_key = %s AND status = 'pending'", [key]
    ).fetchone() == (1,)


def test_requeueing_a_dead_job_racing_a_producer_that_creates_the_waiting_job_supersedes_it(
    conn: psycopg.Connection, module_database_url: str, key: str
) -> None:
    dead = dead_job(conn, key, correlation_id="corr-1")
    with psycopg.connect(module_database_url) as producer, ThreadPoolExecutor(1) as pool:
        waiting = outbox.enqueue(
            producer, task=TASK, coalescing_key=key, payload={"property_id": 1},
            correlation_id="corr-2", trigger_reason="client_upload", actor_type="client",
        ).job_id  # not committed yet: the requeue's update must wait on its index entry

        def requeue() -> int | None:
            result = lifecycle.requeue(conn, dead)
            conn.commit()
            return result

        requeueing = pool.submit(requeue)
        with psycopg.connect(module_database_url, autocommit=True) as probe:
            wait_until(lambda: waits_on_a_lock(probe, conn.info.backend_pid), 10,
                       "the requeue to wait on the producer's new job")
        producer.commit()
        assert requeueing.result(timeout=10) == waiting

    assert (job(conn, dead)["status"], job(conn, dead)["superseded_by"]) == ("superseded", waiting)
    assert job(conn, waiting)["status"] == "pending"


# --- CHECK constraints -----------------------------------------------------------------------

IMPOSSIBLE_ROWS = [
    pytest.param(
        {"status": "'done'", "finished_at": "now()", "attempts": 1},
        "ck_outbox_job_done_was_started",
        id="done-without-started_at",
    ),
    pytest.param(
        {"status": "'done'", "finished_at": "now()", "started_at": "now()", "attempts": 0},
        "ck_outbox_job_done_was_started",
        id="done-without-an-attempt",
    ),
    pytest.param(
        {"status": "'running'", "started_at": "now()", "attempts": 1},
        "ck_outbox_job_running_has_lease",
        id="running-without-lease",
    ),
    pytest.param(
        {"status": "'running'", "started_at": "now()", "lease_expires_at": "now()", "attempts": 0},
        "ck_outbox_job_running_has_lease",
        id="running-without-an-attempt",
    ),
    pytest.param(
        {"status": "'pending'", "lease_expires_at": "now()"},
        "ck_outbox_job_lease_only_while_running",
        id="lease-while-pending",
    ),
    pytest.param(
        {"status": "'superseded'", "finished_at": "now()"},
        "ck_outbox_job_superseded_names_successor",
        id="superseded-without-superseded_by",
    ),
    pytest.param(
        {"status": "'pending'", "superseded_by": "(SELECT min(id) FROM outbox_job)"},
        "ck_outbox_job_superseded_names_successor",
        id="superseded_by-while-pending",
    ),
    pytest.param({"attempts": 6, "max_attempts": 5}, "ck_outbox_job_attempts_in_range", id="attempts-over-max"),
    pytest.param({"attempts": -1}, "ck_outbox_job_attempts_in_range", id="negative-attempts"),
    pytest.param({"max_attempts": 0}, "ck_outbox_job_attempts_in_range", id="zero-max-attempts"),
    pytest.param(
        {"status": "'dead'", "finished_at": "now()", "attempts": 1},
        "ck_outbox_job_failed_has_error",
        id="dead-without-last_error",
    ),
    pytest.param(
        {"status": "'retrying'", "attempts": 1},
        "ck_outbox_job_failed_has_error",
        id="retrying-without-last_error",
    ),
    pytest.param(
        {"status": "'retrying'", "last_error": "'x'"},
        "ck_outbox_job_retrying_has_attempt",
        id="retrying-without-an-attempt",
    ),
    pytest.param(
        {"status": "'dead'", "last_error": "'x'", "attempts": 1},
        "ck_outbox_job_finished_iff_terminal",
        id="dead-without-finished_at",
    ),
    pytest.param(
        {"status": "'pending'", "finished_at": "now()"},
        "ck_outbox_job_finished_iff_terminal",
        id="pending-with-finished_at",
    ),
    pytest.param({"status": "'published'"}, "ck_outbox_job_published_has_published_at", id="published-without-time"),
    pytest.param({"payload": "'[1]'"}, "outbox_job_payload_check", id="array-payload"),
    pytest.param({"coalescing_key": "''"}, "outbox_job_coalescing_key_check", id="empty-key"),
]


@pytest.mark.parametrize(("columns", "constraint"), IMPOSSIBLE_ROWS)
def test_check_constraints_refuse_a_row_in_an_impossible_state(
    conn: psycopg.Connection, key: str, columns: dict[str, Any], constraint: str
) -> None:
    new_job(conn, f"{key}:other")  # a job that superseded_by can name
    values = {"task": f"'{TASK}'", "coalescing_key": f"'{key}'", "payload": "'{}'", **columns}
    statement = f"INSERT INTO outbox_job ({', '.join(values)}) VALUES ({', '.join(map(str, values.values()))})"

    try:
        with pytest.raises(errors.CheckViolation) as refused:
            conn.execute(statement)
    finally:
        conn.rollback()

    assert refused.value.diag.constraint_name == constraint


POSSIBLE_ROWS = [
    {"status": "'pending'"},
    {"status": "'published'", "published_at": "now()"},
    {"status": "'running'", "attempts": 1, "started_at": "now()", "lease_expires_at": "now() + interval '1 minute'"},
    {"status": "'retrying'", "attempts": 1, "last_error": "'x'"},
    {"status": "'done'", "attempts": 1, "started_at": "now()", "finished_at": "now()"},
    {"status": "'dead'", "attempts": 5, "last_error": "'x'", "finished_at": "now()"},
    {"status": "'superseded'", "superseded_by": "(SELECT min(id) FROM outbox_job)", "finished_at": "now()"},
]


def test_hand_written_rows_in_possible_states_are_accepted(conn: psycopg.Connection, key: str) -> None:
    """Without this, the CHECK tests above would also pass if every hand-written row were refused."""
    new_job(conn, f"{key}:other")
    for n, columns in enumerate(POSSIBLE_ROWS):
        values = {"task": f"'{TASK}'", "coalescing_key": f"'{key}:{n}'", "payload": "'{}'", **columns}
        conn.execute(f"INSERT INTO outbox_job ({', '.join(values)}) VALUES ({', '.join(map(str, values.values()))})")

    rows = conn.execute(
        "SELECT status::text FROM outbox_job WHERE coalescing_key LIKE %s AND coalescing_key <> %s ORDER BY id",
        [f"{key}:%", f"{key}:other"],
    )
    assert [status for (status,) in rows] == [columns["status"].strip("'") for columns in POSSIBLE_ROWS]
