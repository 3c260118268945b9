"""A worker's side of the job lifecycle: start, complete, fail, requeue.

Each call is one SQL function (migrations/functions/outbox_v1.sql) run on the caller's
connection, so the transition is atomic and fenced by the attempt number: an attempt that
lost its lease can neither complete nor fail the job.

Every call also works on a psycopg connection in pipeline mode (a worker sends a transaction's
statements in a few round trips): `outbox.connection.fetch_all` waits for each result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row

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


def start(
    conn: psycopg.Connection,
    job_id: int,
    *,
    redelivered: bool,
    lease_seconds: float,
    resume_attempt: int | None = None,
) -> Start:
    row = fetch_one(
        conn,
        QUERIES["start_job"],
        {
            "job_id": job_id,
            "redelivered": redelivered,
            "lease_seconds": lease_seconds,
            "resume_attempt": resume_attempt,
        },
    )
    assert row is not None
    return Start(
        outcome=StartOutcome(row["outcome"]),
        attempt=row["attempt"],
        payload=row["payload"],
        coalescing_key=row["coalescing_key"],
        retry_after_s=row["retry_after_s"],
    )


def complete(conn: psycopg.Connection, job_id: int, attempt: int) -> bool:
    row = fetch_one(conn, QUERIES["complete_job"], {"job_id": job_id, "attempt": attempt})
    return bool(row and row["completed"])


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
    """Gives a DEAD job fresh attempts; returns the job that will run, or None if not DEAD."""
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
