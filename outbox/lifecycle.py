"""A worker's side of the job lifecycle: start, heartbeat, complete, fail, requeue.

Each call is one SQL function (migrations/functions/outbox_v5.sql and outbox_v6.sql) run on the caller's
connection, so the transition is atomic and fenced by the attempt number: an attempt that
lost its lease can neither complete nor fail the job. Each also keeps the attempt's row of
outbox_attempt, so every attempt's outcome and error stay readable.

Every call also works on a psycopg connection in pipeline mode (a worker sends a transaction's
statements in a few round trips): `outbox.connection.fetch_all` waits for each result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox.connection import fetch_all, fetch_one
from outbox.queries import QUERIES


class StartOutcome(StrEnum):
    #: The caller now holds `attempt`; run the job and finish with that number.
    STARTED = "started"
    #: The job is done, dead or superseded: this delivery is stale.
    FINISHED = "finished"
    #: Another live attempt holds the job: drop this delivery.
    DUPLICATE = "duplicate"
    #: Another job of the key is running, or the job is not due yet: try again later.
    BUSY = "busy"
    #: The previous attempt was lost and none is left: the job became DEAD just now.
    DEAD = "dead"
    #: No such job.
    MISSING = "missing"


class FailOutcome(StrEnum):
    RETRYING = "retrying"
    DEAD = "dead"
    #: The key already has a waiting job; it covers this job's requests, so no retry is needed.
    SUPERSEDED = "superseded"
    #: The job's cancel had been requested: it ends cancelled, not retried.
    CANCELLED = "cancelled"
    #: The attempt had been fenced out; nothing was recorded.
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Start:
    outcome: StartOutcome
    attempt: int | None
    payload: dict[str, Any] | None
    coalescing_key: str | None
    #: For BUSY when the job is not due yet: seconds until it is.
    retry_after_s: float | None
    #: For STARTED: the lease the attempt holds, in seconds (heartbeat well within it). Left out of
    #: equality: two starts are the same transition whatever lease the task gives.
    lease_s: float | None = field(default=None, compare=False)
    #: For STARTED of a watched job: its checkpoint (None: from the beginning).
    cursor: Any = field(default=None, compare=False)


def start(
    conn: psycopg.Connection,
    job_id: int,
    *,
    redelivered: bool,
    lease_seconds: float | None,
    resume_attempt: int | None = None,
    worker: str | None = None,
) -> Start:
    """`lease_seconds` None: the task's own lease. `worker` names the worker in the attempt's row."""
    row = fetch_one(
        conn,
        QUERIES["start_job"],
        {
            "job_id": job_id,
            "redelivered": redelivered,
            "lease_seconds": lease_seconds,
            "resume_attempt": resume_attempt,
            "worker": worker,
        },
    )
    assert row is not None
    return Start(
        outcome=StartOutcome(row["outcome"]),
        attempt=row["attempt"],
        payload=row["payload"],
        coalescing_key=row["coalescing_key"],
        retry_after_s=row["retry_after_s"],
        lease_s=row["lease_s"],
    )


def heartbeat(conn: psycopg.Connection, job_id: int, attempt: int) -> bool:
    """Extends the attempt's lease by its task's lease; False when the attempt lost its job."""
    row = fetch_one(conn, QUERIES["heartbeat_job"], {"job_id": job_id, "attempt": attempt})
    return bool(row and row["alive"])


def complete(conn: psycopg.Connection, job_id: int, attempt: int, result: Any = None) -> bool:
    """`result`: what a watched job's watchers are told it made (small JSON)."""
    if result is None:
        row = fetch_one(conn, QUERIES["complete_job"], {"job_id": job_id, "attempt": attempt})
    else:
        row = fetch_one(conn, QUERIES["complete_job_with_result"],
                        {"job_id": job_id, "attempt": attempt, "result": Jsonb(result)})
    return bool(row and row["completed"])


def finish_cancelled(conn: psycopg.Connection, job_id: int, attempt: int) -> bool:
    """The attempt stops because its cancel was requested; False if it no longer holds the job."""
    row = fetch_one(conn, QUERIES["finish_cancelled_job"], {"job_id": job_id, "attempt": attempt})
    return bool(row and row["cancelled"])


def fail(
    conn: psycopg.Connection,
    job_id: int,
    attempt: int,
    *,
    error: str,
    retryable: bool,
    retry_in_seconds: float,
) -> FailOutcome:
    row = fetch_one(
        conn,
        QUERIES["fail_job"],
        {
            "job_id": job_id,
            "attempt": attempt,
            "error": error,
            "retryable": retryable,
            "retry_in_seconds": retry_in_seconds,
        },
    )
    assert row is not None
    return FailOutcome(row["outcome"])


def requeue(conn: psycopg.Connection, job_id: int) -> int | None:
    """Gives a DEAD job fresh attempts under a new Celery task id; returns the job that will run,
    or None if it is not DEAD (or its unique_active key is held by another job)."""
    row = fetch_one(conn, QUERIES["requeue_job"], {"job_id": job_id})
    return row["job_id"] if row else None


def requests_of_job(conn: psycopg.Connection, job_id: int, limit: int = 50) -> list[dict[str, Any]]:
    if isinstance(conn, psycopg.Connection):
        return send_requests_of_job(conn, job_id, limit).fetchall()
    return fetch_all(conn, QUERIES["requests_of_job"], {"job_id": job_id, "limit": limit})


def send_requests_of_job(
    conn: psycopg.Connection, job_id: int, limit: int = 50
) -> psycopg.Cursor[dict[str, Any]]:
    """Sends `requests_of_job` and returns its cursor unread: in pipeline mode its rows come
    back in the same round trip as the statements sent around it (read them with fetchall)."""
    cur = conn.cursor(row_factory=dict_row)
    cur.execute(QUERIES["requests_of_job"], {"job_id": job_id, "limit": limit})
    return cur
