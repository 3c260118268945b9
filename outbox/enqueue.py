"""Enqueue: the Python face of the SQL producer contract `outbox_enqueue_request`.

It runs inside the caller's open transaction, so the job commits or rolls back with the
caller's mutation (G1). Validation happens in the database, where every producer gets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from outbox.connection import Connectionish, fetch_one, raise_if_contract_violation
from outbox.errors import ActiveJobExists, CoolingDown
from outbox.queries import QUERIES


@dataclass(frozen=True, slots=True)
class Enqueued:
    #: The job that will carry this request (new, or the key's job that has not started).
    job_id: int
    request_id: int
    #: False when (coalescing_key, correlation_id) was accepted before: nothing changed.
    created_request: bool
    #: False when the request joined a job that was already waiting (coalesced).
    created_job: bool


def enqueue(
    conn: Connectionish,
    *,
    task: str,
    coalescing_key: str,
    payload: dict[str, Any],
    correlation_id: str,
    trigger_reason: str,
    actor_type: str,
    actor_id: str | None = None,
    max_attempts: int | None = None,
) -> Enqueued:
    """Adds a request for `task` on the caller's open connection, in the caller's transaction.

    What the request does depends on the task's coalescing mode (outbox_task.mode): it joins the
    key's waiting job or creates one (`coalesce`), creates the key's one active job (`unique_active`;
    raises ActiveJobExists or CoolingDown instead, having written nothing), or creates a job of its
    own (`none`). A repeated (coalescing_key, correlation_id) answers with the first request.
    """
    params = {
        "task": task,
        "coalescing_key": coalescing_key,
        "payload": Jsonb(payload),
        "correlation_id": correlation_id,
        "trigger_reason": trigger_reason,
        "actor_type": actor_type,
        "actor_id": actor_id,
        "max_attempts": max_attempts,
    }
    try:
        row = fetch_one(conn, QUERIES["enqueue_request"], params)
    except Exception as exc:
        raise_if_contract_violation(exc)
        raise
    assert row is not None  # the function always returns one row
    refusal = row.pop("refusal")
    retry_after = row.pop("retry_after_s")
    if refusal == "active":
        raise ActiveJobExists(coalescing_key, row["job_id"])
    if refusal == "cooldown":
        raise CoolingDown(coalescing_key, retry_after)
    return Enqueued(**row)


def find_request(conn: Connectionish, *, coalescing_key: str, correlation_id: str) -> int | None:
    """The job of an already accepted (coalescing_key, correlation_id), or None."""
    row = fetch_one(
        conn,
        QUERIES["find_request"],
        {"coalescing_key": coalescing_key, "correlation_id": correlation_id},
    )
    return row["job_id"] if row else None
