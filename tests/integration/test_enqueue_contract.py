"""The producer contract (docs/producer-contract.md) against real PostgreSQL.

Producers in any language rely on these SQL functions alone, so every rule is checked at the
SQL level, and again through `outbox.enqueue`, which must add nothing and hide nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import errors
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import outbox
from outbox import lifecycle
from services.documents import add_documents
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import cid, new_document, provision
from tests.harness.system import wait_until

TASK = "compliance.recalculate_property"
WAITING = ("pending", "published", "retrying")
ENQUEUE_SQL = """
    SELECT job_id, request_id, created_request, created_job
      FROM outbox_enqueue_request(%(task)s, %(coalescing_key)s, %(payload)s::jsonb, %(correlation_id)s,
                                  %(trigger_reason)s, %(actor_type)s, %(actor_id)s, %(max_attempts)s)
"""


def request_args(key: str = "property:1", correlation_id: str = "corr-1", **overrides: Any) -> dict[str, Any]:
    return {
        "task": TASK,
        "coalescing_key": key,
        "payload": '{"property_id": 1}',
        "correlation_id": correlation_id,
        "trigger_reason": "client_upload",
        "actor_type": "client",
        "actor_id": "client-1",
        "max_attempts": None,
        **overrides,
    }


def enqueue_sql(conn: psycopg.Connection, key: str = "property:1", correlation_id: str = "corr-1", **overrides: Any):
    """(job_id, request_id, created_request, created_job) from the SQL contract itself."""
    return conn.execute(ENQUEUE_SQL, request_args(key, correlation_id, **overrides)).fetchone()


def enqueue_py(conn: Any, key: str = "property:1", correlation_id: str = "corr-1", **overrides: Any) -> outbox.Enqueued:
    return outbox.enqueue(
        conn,
        task=overrides.get("task", TASK),
        coalescing_key=key,
        payload=overrides.get("payload", {"property_id": 1}),
        correlation_id=correlation_id,
        trigger_reason=overrides.get("trigger_reason", "client_upload"),
        actor_type=overrides.get("actor_type", "client"),
        actor_id=overrides.get("actor_id", "client-1"),
        max_attempts=overrides.get("max_attempts"),
    )


def committed(database_url: str, sql: str, params: Any = None) -> list[tuple]:
    """What another session sees: only committed rows."""
    with psycopg.connect(database_url, autocommit=True) as other:
        return other.execute(sql, params).fetchall()


def committed_counts(database_url: str) -> tuple[int, int]:
    [(jobs, requests)] = committed(
        database_url, "SELECT (SELECT count(*) FROM outbox_job), (SELECT count(*) FROM outbox_request)"
    )
    return jobs, requests


def put_in_waiting_status(conn: psycopg.Connection, job_id: int, status: str) -> None:
    """Moves a fresh pending job to another not-started status the way relay and worker would."""
    if status == "published":
        conn.execute("UPDATE outbox_job SET status = 'published', published_at = now() WHERE id = %s", [job_id])
    elif status == "retrying":
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
        assert started.outcome is lifecycle.StartOutcome.STARTED
        assert started.attempt is not None
        outcome = lifecycle.fail(conn, job_id, started.attempt, error="boom", retryable=True, retry_in_seconds=60)
        assert outcome is lifecycle.FailOutcome.RETRYING
    assert conn.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone() == (status,)


# --- G4: idempotency -------------------------------------------------------------------------


def test_a_first_request_creates_one_job_and_one_request_row(conn: psycopg.Connection, database_url: str) -> None:
    job_id, request_id, created_request, created_job = enqueue_sql(conn)
    conn.commit()

    assert (created_request, created_job) == (True, True)
    assert committed(database_url, "SELECT id, task, coalescing_key, status::text, attempts FROM outbox_job") == [
        (job_id, TASK, "property:1", "pending", 0)
    ]
    assert committed(
        database_url, "SELECT id, job_id, correlation_id, trigger_reason, actor_type, actor_id FROM outbox_request"
    ) == [(request_id, job_id, "corr-1", "client_upload", "client", "client-1")]


def test_a_repeated_correlation_id_returns_the_first_job_and_changes_nothing_in_sql(
    conn: psycopg.Connection, database_url: str
) -> None:
    first = enqueue_sql(conn)
    conn.commit()
    before = committed(database_url, "SELECT * FROM outbox_job ORDER BY id")

    again = enqueue_sql(conn, trigger_reason="admin_upload", actor_type="admin", actor_id="admin-9")
    plain = conn.execute(
        "SELECT outbox_enqueue(%(task)s, %(coalescing_key)s, %(payload)s::jsonb, %(correlation_id)s,"
        " %(trigger_reason)s, %(actor_type)s, %(actor_id)s)",
        request_args(),
    ).fetchone()
    conn.commit()

    assert again == (first[0], first[1], False, False)
    assert plain == (first[0],)
    assert committed(database_url, "SELECT * FROM outbox_job ORDER BY id") == before
    assert committed(database_url, "SELECT trigger_reason, actor_type, actor_id FROM outbox_request") == [
        ("client_upload", "client", "client-1")
    ]


def test_a_repeated_correlation_id_returns_the_first_job_and_changes_nothing_in_python(
    conn: psycopg.Connection, database_url: str
) -> None:
    first = enqueue_py(conn)
    conn.commit()
    again = enqueue_py(conn, trigger_reason="verify")
    conn.commit()

    assert first.created_request and first.created_job
    assert again == outbox.Enqueued(first.job_id, first.request_id, created_request=False, created_job=False)
    assert committed_counts(database_url) == (1, 1)


def test_a_repeat_is_recognised_even_after_its_job_finished(conn: psycopg.Connection, database_url: str) -> None:
    first = enqueue_py(conn)
    conn.commit()
    started = lifecycle.start(conn, first.job_id, redelivered=False, lease_seconds=60)
    assert lifecycle.complete(conn, first.job_id, started.attempt)
    conn.commit()

    again = enqueue_py(conn)
    conn.commit()

    assert (again.job_id, again.created_request, again.created_job) == (first.job_id, False, False)
    assert committed_counts(database_url) == (1, 1)


# --- G3: coalescing --------------------------------------------------------------------------


@pytest.mark.parametrize("status", WAITING)
def test_a_new_correlation_id_joins_the_keys_waiting_job(
    conn: psycopg.Connection, database_url: str, status: str
) -> None:
    first = enqueue_py(conn, correlation_id="corr-1")
    put_in_waiting_status(conn, first.job_id, status)
    conn.commit()

    second = enqueue_py(conn, correlation_id="corr-2")
    conn.commit()

    assert (second.job_id, second.created_request, second.created_job) == (first.job_id, True, False)
    assert second.request_id != first.request_id
    assert committed(database_url, "SELECT id, status::text FROM outbox_job") == [(first.job_id, status)]
    assert committed(database_url, "SELECT job_id, correlation_id FROM outbox_request ORDER BY id") == [
        (first.job_id, "corr-1"),
        (first.job_id, "corr-2"),
    ]


def test_a_request_while_the_keys_job_runs_creates_a_new_waiting_job_and_later_ones_join_it(
    conn: psycopg.Connection, database_url: str
) -> None:
    running = enqueue_py(conn, correlation_id="corr-1")
    conn.commit()
    assert lifecycle.start(conn, running.job_id, redelivered=False, lease_seconds=60).outcome == "started"
    conn.commit()

    during = [enqueue_py(conn, correlation_id=f"corr-{n}") for n in range(2, 6)]
    conn.commit()

    next_job = during[0].job_id
    assert next_job != running.job_id
    assert during[0].created_job
    assert all(e.job_id == next_job and e.created_request and not e.created_job for e in during[1:])
    assert committed(database_url, "SELECT id, status::text FROM outbox_job ORDER BY id") == [
        (running.job_id, "running"),
        (next_job, "pending"),
    ]


def test_a_key_never_has_more_than_one_waiting_and_one_running_job(conn: psycopg.Connection) -> None:
    for n in range(3):
        job = enqueue_py(conn, correlation_id=f"round-{n}-a").job_id
        enqueue_py(conn, correlation_id=f"round-{n}-b")
        conn.commit()
        # The previous round's running job is lost; this start supersedes it.
        conn.execute("UPDATE outbox_job SET lease_expires_at = now() - interval '1 s' WHERE status = 'running'")
        conn.commit()
        assert lifecycle.start(conn, job, redelivered=False, lease_seconds=60).outcome == "started"
        conn.commit()
        enqueue_py(conn, correlation_id=f"round-{n}-c")
        conn.commit()

        per_status = dict(conn.execute("SELECT status::text, count(*) FROM outbox_job GROUP BY status").fetchall())
        assert per_status.get("pending", 0) + per_status.get("published", 0) + per_status.get("retrying", 0) == 1
        assert per_status["running"] == 1


def test_the_partial_unique_index_refuses_a_second_waiting_job_inserted_directly(conn: psycopg.Connection) -> None:
    enqueue_py(conn)
    conn.commit()

    with pytest.raises(errors.UniqueViolation) as refused:
        conn.execute("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'property:1', '{}')", [TASK])
    conn.rollback()
    assert refused.value.diag.constraint_name == "ux_outbox_job_waiting_key"

    # A different key, and the same key once its job is no longer waiting, are both accepted.
    conn.execute("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'property:2', '{}')", [TASK])
    conn.execute("UPDATE outbox_job SET status = 'published', published_at = now() WHERE coalescing_key = 'property:1'")
    with pytest.raises(errors.UniqueViolation) as published:
        conn.execute("INSERT INTO outbox_job (task, coalescing_key, payload) VALUES (%s, 'property:1', '{}')", [TASK])
    assert published.value.diag.constraint_name == "ux_outbox_job_waiting_key"


def test_the_partial_unique_index_refuses_a_second_running_job_of_a_key(conn: psycopg.Connection) -> None:
    first = enqueue_py(conn, correlation_id="corr-1")
    conn.commit()
    lifecycle.start(conn, first.job_id, redelivered=False, lease_seconds=60)
    second = enqueue_py(conn, correlation_id="corr-2")
    conn.commit()

    with pytest.raises(errors.UniqueViolation) as refused:
        conn.execute(
            "UPDATE outbox_job SET status = 'running', attempts = 1, started_at = now(),"
            " lease_expires_at = now() + interval '1 min' WHERE id = %s",
            [second.job_id],
        )
    assert refused.value.diag.constraint_name == "ux_outbox_job_running_key"


# --- validation ------------------------------------------------------------------------------


@pytest.fixture
def refused_conn(module_database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(module_database_url) as connection:
        yield connection
        connection.rollback()


INVALID = [
    pytest.param({"task": "compliance.recalc"}, 'unknown task "compliance.recalc"', id="unknown-task"),
    pytest.param({"coalescing_key": ""}, "coalescing_key must be a non-empty string", id="empty-key"),
    pytest.param({"coalescing_key": "   "}, "coalescing_key must be a non-empty string", id="spaces-key"),
    pytest.param({"coalescing_key": " \t\n"}, "coalescing_key must be a non-empty string", id="whitespace-key"),
    pytest.param({"coalescing_key": "k" * 201}, "coalescing_key is 201 characters; the limit is 200", id="long-key"),
    pytest.param({"payload": [1, 2]}, "payload must be a JSON object, got array", id="array-payload"),
    pytest.param({"payload": "property 1"}, "payload must be a JSON object, got string", id="string-payload"),
    pytest.param({"payload": None}, "payload must be a JSON object, got null", id="null-payload"),
    pytest.param({"payload": {"blob": "x" * 8200}}, "the limit is 8192", id="large-payload"),
    pytest.param({"correlation_id": ""}, "correlation_id must be a non-empty string", id="empty-correlation"),
    pytest.param({"correlation_id": "\t "}, "correlation_id must be a non-empty string", id="blank-correlation"),
    pytest.param(
        {"correlation_id": "c" * 201}, "correlation_id must be a non-empty string of at most 200", id="long-cid"
    ),
    pytest.param({"trigger_reason": "Client Upload"}, 'trigger_reason "Client Upload" must match', id="bad-trigger"),
    pytest.param({"trigger_reason": ""}, 'trigger_reason "" must match', id="empty-trigger"),
    pytest.param({"actor_type": "Admin!"}, 'actor_type "Admin!" must match', id="bad-actor-type"),
    pytest.param({"actor_id": "a" * 201}, "actor_id is longer than 200 characters", id="long-actor-id"),
    pytest.param({"max_attempts": 0}, "max_attempts must be between 1 and 100, got 0", id="zero-attempts"),
    pytest.param({"max_attempts": 101}, "max_attempts must be between 1 and 100, got 101", id="101-attempts"),
]


def _as_sql_args(overrides: dict[str, Any]) -> dict[str, Any]:
    sql_overrides = dict(overrides)
    if "payload" in sql_overrides:
        sql_overrides["payload"] = json.dumps(sql_overrides["payload"])
    key = sql_overrides.pop("coalescing_key", "property:1")
    correlation_id = sql_overrides.pop("correlation_id", "corr-bad")
    return request_args(key, correlation_id, **sql_overrides)


@pytest.mark.parametrize(("overrides", "rule"), INVALID)
def test_the_sql_contract_refuses_bad_input_with_22023_naming_the_rule(
    refused_conn: psycopg.Connection, module_database_url: str, overrides: dict[str, Any], rule: str
) -> None:
    enqueue_sql(refused_conn, "property:ok", "corr-ok")  # written earlier in the same transaction

    with pytest.raises(psycopg.Error) as refused:
        refused_conn.execute(ENQUEUE_SQL, _as_sql_args(overrides))

    assert refused.value.sqlstate == "22023"
    assert rule in refused.value.diag.message_primary
    assert refused_conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    refused_conn.commit()  # the server turns the aborted transaction's COMMIT into a ROLLBACK
    assert committed_counts(module_database_url) == (0, 0)


def test_an_sql_null_payload_is_refused_naming_the_rule(refused_conn: psycopg.Connection) -> None:
    with pytest.raises(errors.InvalidParameterValue, match="payload must be a JSON object, got NULL"):
        refused_conn.execute(ENQUEUE_SQL, request_args(payload=None))


def test_an_unknown_task_is_refused_with_the_known_tasks_in_the_hint(refused_conn: psycopg.Connection) -> None:
    [known] = refused_conn.execute("SELECT string_agg(name, ', ' ORDER BY name) FROM outbox_task").fetchone()
    assert TASK in known
    with pytest.raises(errors.InvalidParameterValue) as refused:
        enqueue_sql(refused_conn, task="compliance.recalc")
    assert refused.value.diag.message_hint == f"known tasks: {known}"
    refused_conn.rollback()

    with pytest.raises(outbox.InvalidEnqueue) as in_python:
        enqueue_py(refused_conn, task="compliance.recalc")
    assert in_python.value.hint == f"known tasks: {known}"
    assert TASK in str(in_python.value)


@pytest.mark.parametrize(("overrides", "rule"), INVALID)
def test_python_enqueue_raises_invalid_enqueue_naming_the_rule_and_writes_nothing(
    refused_conn: psycopg.Connection, module_database_url: str, overrides: dict[str, Any], rule: str
) -> None:
    enqueue_py(refused_conn, "property:ok", "corr-ok")
    overrides = dict(overrides)
    key = overrides.pop("coalescing_key", "property:1")
    correlation_id = overrides.pop("correlation_id", "corr-bad")

    with pytest.raises(outbox.InvalidEnqueue) as refused:
        enqueue_py(refused_conn, key, correlation_id, **overrides)

    assert rule in str(refused.value)
    assert isinstance(refused.value.__cause__, errors.InvalidParameterValue)
    assert refused_conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    refused_conn.commit()
    assert committed_counts(module_database_url) == (0, 0)


# --- G1: atomicity ---------------------------------------------------------------------------


def test_an_enqueue_in_a_transaction_that_rolls_back_leaves_no_job_and_no_request(
    refused_conn: psycopg.Connection, module_database_url: str
) -> None:
    with refused_conn.transaction():
        enqueue_py(refused_conn, correlation_id="corr-1")
        enqueue_sql(refused_conn, "property:2", "corr-2")
        assert refused_conn.execute("SELECT count(*) FROM outbox_request").fetchone() == (2,)
        raise psycopg.Rollback()

    assert committed_counts(module_database_url) == (0, 0)


def test_a_document_upload_rolled_back_by_the_outer_transaction_leaves_no_trace(
    conn: psycopg.Connection, database_url: str
) -> None:
    [property_id] = provision(conn)
    provisioning_job = conn.execute("SELECT id FROM outbox_job").fetchone()[0]
    started = lifecycle.start(conn, provisioning_job, redelivered=False, lease_seconds=60)
    assert lifecycle.complete(conn, provisioning_job, started.attempt)
    conn.commit()
    before = committed(database_url, "SELECT generation FROM properties WHERE id = %s", [property_id])
    requests_before = committed(database_url, "SELECT id FROM outbox_request")

    with conn.transaction():
        added = add_documents(
            conn,
            property_id=property_id,
            documents=[new_document("gas_safety"), new_document("eicr")],
            source="client",
            actor=Actor(ActorType.CLIENT, "client-1"),
            trigger=TriggerReason.CLIENT_UPLOAD,
            correlation_id=cid(),
        )
        assert added.job_id != provisioning_job
        assert conn.execute("SELECT count(*) FROM documents").fetchone() == (2,)
        raise psycopg.Rollback()

    assert committed(database_url, "SELECT count(*) FROM documents") == [(0,)]
    assert committed(database_url, "SELECT id, status::text FROM outbox_job") == [(provisioning_job, "done")]
    assert committed(database_url, "SELECT id FROM outbox_request") == requests_before
    assert committed(database_url, "SELECT generation FROM properties WHERE id = %s", [property_id]) == before


# --- outbox.enqueue on each kind of connection ----------------------------------------------


@dataclass
class Caller:
    """A caller's open connection of one kind, with its own commit and rollback."""

    handle: Any
    commit: Callable[[], None]
    rollback: Callable[[], None]


@contextmanager
def psycopg_caller(database_url: str) -> Iterator[Caller]:
    with psycopg.connect(database_url) as connection:
        yield Caller(connection, connection.commit, connection.rollback)


@contextmanager
def sqlalchemy_connection_caller(database_url: str) -> Iterator[Caller]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            yield Caller(connection, connection.commit, connection.rollback)
    finally:
        engine.dispose()


@contextmanager
def sqlalchemy_session_caller(database_url: str) -> Iterator[Caller]:
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with Session(engine) as session:
            yield Caller(session, session.commit, session.rollback)
    finally:
        engine.dispose()


CALLERS = [
    pytest.param(psycopg_caller, id="psycopg"),
    pytest.param(sqlalchemy_connection_caller, id="sqlalchemy-connection"),
    pytest.param(sqlalchemy_session_caller, id="sqlalchemy-session"),
]


@pytest.mark.parametrize("make_caller", CALLERS)
def test_enqueue_joins_the_callers_transaction_and_never_commits_by_itself(database_url: str, make_caller) -> None:
    with make_caller(database_url) as caller:
        rolled_back = enqueue_py(caller.handle, correlation_id="corr-rolled-back")
        assert rolled_back.created_job
        assert committed_counts(database_url) == (0, 0)
        caller.rollback()
        assert committed_counts(database_url) == (0, 0)

        kept = enqueue_py(caller.handle, correlation_id="corr-kept")
        assert committed_counts(database_url) == (0, 0)
        caller.commit()

    assert committed(database_url, "SELECT job_id, correlation_id FROM outbox_request") == [(kept.job_id, "corr-kept")]


@pytest.mark.parametrize("make_caller", CALLERS)
def test_enqueue_on_any_connection_kind_raises_invalid_enqueue_for_a_refused_request(
    module_database_url: str, make_caller
) -> None:
    with make_caller(module_database_url) as caller:
        with pytest.raises(outbox.InvalidEnqueue, match="max_attempts must be between 1 and 100, got 0"):
            enqueue_py(caller.handle, max_attempts=0)
        caller.rollback()
    assert committed_counts(module_database_url) == (0, 0)


@pytest.mark.parametrize(
    "not_a_connection",
    [pytest.param("postgresql://nowhere", id="url"), pytest.param(None, id="none"), pytest.param(object(), id="obj")],
)
def test_enqueue_on_something_that_is_not_an_open_connection_raises_type_error(not_a_connection: Any) -> None:
    with pytest.raises(TypeError, match=r"expected an open psycopg\.Connection or a SQLAlchemy Connection/Session"):
        enqueue_py(not_a_connection)


def test_enqueue_on_a_sqlalchemy_engine_raises_type_error(module_database_url: str) -> None:
    engine = create_engine(module_database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with pytest.raises(TypeError, match="got Engine"):
            enqueue_py(engine)
    finally:
        engine.dispose()
    assert committed_counts(module_database_url) == (0, 0)


# --- NOTIFY ----------------------------------------------------------------------------------


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("LISTEN outbox_job_pending")
        yield connection


def received(listener: psycopg.Connection, timeout: float) -> list[psycopg.Notify]:
    return list(listener.notifies(timeout=timeout, stop_after=1))


def test_a_new_job_notifies_listeners_only_when_its_transaction_commits(
    conn: psycopg.Connection, listener: psycopg.Connection
) -> None:
    enqueue_py(conn)
    assert received(listener, timeout=0.3) == []

    conn.commit()

    [notify] = received(listener, timeout=5)
    assert notify.channel == "outbox_job_pending"


def test_a_rolled_back_enqueue_notifies_nobody(conn: psycopg.Connection, listener: psycopg.Connection) -> None:
    enqueue_py(conn)
    conn.rollback()
    assert received(listener, timeout=0.5) == []

    enqueue_py(conn)  # the same listener does hear a committed one, so silence above was real
    conn.commit()
    assert len(received(listener, timeout=5)) == 1


def test_a_request_that_joins_a_waiting_job_does_not_notify(conn: psycopg.Connection, listener) -> None:
    enqueue_py(conn, correlation_id="corr-1")
    conn.commit()
    assert len(received(listener, timeout=5)) == 1

    joined = enqueue_py(conn, correlation_id="corr-2")
    conn.commit()

    assert not joined.created_job
    assert received(listener, timeout=0.5) == []


# --- concurrency -----------------------------------------------------------------------------

THREADS = 8


def enqueue_from_threads(database_url: str, correlation_ids: list[str]) -> list[outbox.Enqueued]:
    """Each thread opens its own connection, waits at a barrier, then enqueues and commits."""
    barrier = threading.Barrier(len(correlation_ids), timeout=30)
    results: list[outbox.Enqueued | BaseException] = [RuntimeError("thread did not finish")] * len(correlation_ids)

    def run(i: int) -> None:
        try:
            with psycopg.connect(database_url) as connection:
                connection.execute("SELECT 1")  # connected and in a transaction before the race
                barrier.wait()
                results[i] = enqueue_py(connection, "property:hot", correlation_ids[i])
                connection.commit()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(correlation_ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    return results  # type: ignore[return-value]


def test_concurrent_repeats_of_one_request_create_exactly_one_request_and_one_job(database_url: str) -> None:
    results = enqueue_from_threads(database_url, ["corr-same"] * THREADS)

    assert committed_counts(database_url) == (1, 1)
    [(job_id, request_id)] = committed(database_url, "SELECT job_id, id FROM outbox_request")
    assert {(r.job_id, r.request_id) for r in results} == {(job_id, request_id)}
    assert sum(r.created_request for r in results) == 1
    assert sum(r.created_job for r in results) == 1


def test_concurrent_requests_for_one_key_coalesce_into_one_waiting_job(database_url: str) -> None:
    correlation_ids = [f"corr-{n}" for n in range(THREADS)]
    results = enqueue_from_threads(database_url, correlation_ids)

    [(job_id, status)] = committed(database_url, "SELECT id, status::text FROM outbox_job")
    assert status == "pending"
    assert committed(database_url, "SELECT job_id, correlation_id FROM outbox_request ORDER BY correlation_id") == [
        (job_id, c) for c in sorted(correlation_ids)
    ]
    assert {r.job_id for r in results} == {job_id}
    assert all(r.created_request for r in results)
    assert sum(r.created_job for r in results) == 1


# --- compliance_request_recalculation --------------------------------------------------------

RECALC_SQL = "SELECT * FROM compliance_request_recalculation(%s, %s, 'verify', 'system', 'billing-svc', NULL, %s)"


@pytest.fixture
def scored_property(conn: psycopg.Connection) -> int:
    """A property whose score is up to date (not pending), as after a finished recalculation."""
    [property_id] = provision(conn)
    conn.execute("UPDATE properties SET scored_generation = generation WHERE id = %s", [property_id])
    conn.commit()
    return property_id


def generation_and_pending(conn: psycopg.Connection, property_id: int) -> tuple[int, bool]:
    return conn.execute(
        "SELECT generation, compliance_score_pending FROM properties WHERE id = %s", [property_id]
    ).fetchone()


def test_a_new_recalculation_request_bumps_the_generation_and_marks_the_score_pending(
    conn: psycopg.Connection, scored_property: int
) -> None:
    generation, pending = generation_and_pending(conn, scored_property)
    assert pending is False

    job_id, created_request, _created_job = conn.execute(RECALC_SQL, [scored_property, "svc-1", True]).fetchone()
    conn.commit()

    assert created_request is True
    assert generation_and_pending(conn, scored_property) == (generation + 1, True)
    assert conn.execute("SELECT coalescing_key, payload FROM outbox_job WHERE id = %s", [job_id]).fetchone() == (
        f"property:{scored_property}",
        {"property_id": scored_property},
    )


def test_a_repeated_recalculation_request_does_not_bump_the_generation(
    conn: psycopg.Connection, scored_property: int
) -> None:
    first = conn.execute(RECALC_SQL, [scored_property, "svc-1", True]).fetchone()
    conn.commit()
    generation = generation_and_pending(conn, scored_property)

    again = conn.execute(RECALC_SQL, [scored_property, "svc-1", True]).fetchone()
    conn.commit()

    assert again == (first[0], False, False)
    assert generation_and_pending(conn, scored_property) == generation


def test_a_verification_request_without_mark_pending_leaves_the_generation_alone(
    conn: psycopg.Connection, scored_property: int
) -> None:
    generation = generation_and_pending(conn, scored_property)

    job_id, created_request, _ = conn.execute(RECALC_SQL, [scored_property, "drift-1", False]).fetchone()
    conn.commit()

    assert created_request is True
    assert conn.execute("SELECT job_id FROM outbox_request WHERE correlation_id = 'drift-1'").fetchone() == (job_id,)
    assert generation_and_pending(conn, scored_property) == generation


def test_a_recalculation_request_for_an_unknown_property_is_refused_with_22023(
    refused_conn: psycopg.Connection, module_database_url: str
) -> None:
    with pytest.raises(errors.InvalidParameterValue, match="property 999999 does not exist"):
        refused_conn.execute(RECALC_SQL, [999_999, "svc-1", True])
    refused_conn.rollback()
    assert committed_counts(module_database_url) == (0, 0)


# --- a repeat racing a worker's start --------------------------------------------------------


def wait_until_blocked_on_a_lock(watcher: psycopg.Connection, pid: int) -> None:
    wait_until(
        lambda: (
            watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            == ("Lock",)
        ),
        timeout=10,
        what=f"backend {pid} to wait for a lock",
    )


def test_a_repeat_that_races_the_start_of_its_job_creates_no_orphan_job(
    conn: psycopg.Connection, database_url: str
) -> None:
    """The first request joins a waiting job and holds its row lock; a worker's start and then
    the repeat queue behind it, in that order. When the job starts first, the repeat finds no
    waiting job to join, but it must still answer with the first request and create nothing."""
    waiting = enqueue_py(conn, correlation_id="corr-0")
    conn.commit()

    with (
        psycopg.connect(database_url) as first,
        psycopg.connect(database_url) as worker,
        psycopg.connect(database_url) as repeat,
        psycopg.connect(database_url, autocommit=True) as watcher,
    ):
        joined = enqueue_py(first, correlation_id="corr-1")
        assert joined.job_id == waiting.job_id
        results: dict[str, Any] = {}

        def run(name: str, connection: psycopg.Connection, call: Callable[[], Any]) -> threading.Thread:
            def target() -> None:
                try:
                    results[name] = call()
                    connection.commit()
                except BaseException as exc:
                    results[name] = exc

            thread = threading.Thread(target=target)
            thread.start()
            return thread

        worker_pid, repeat_pid = worker.info.backend_pid, repeat.info.backend_pid
        starting = run(
            "start", worker, lambda: lifecycle.start(worker, waiting.job_id, redelivered=False, lease_seconds=60)
        )
        wait_until_blocked_on_a_lock(watcher, worker_pid)
        repeating = run("repeat", repeat, lambda: enqueue_py(repeat, correlation_id="corr-1"))
        wait_until_blocked_on_a_lock(watcher, repeat_pid)
        first.commit()
        starting.join(timeout=30)
        repeating.join(timeout=30)

    assert results["start"].outcome is lifecycle.StartOutcome.STARTED
    assert results["repeat"] == outbox.Enqueued(joined.job_id, joined.request_id, False, False)
    assert committed(database_url, "SELECT id, status::text FROM outbox_job") == [(waiting.job_id, "running")]
    assert committed_counts(database_url) == (1, 2)
