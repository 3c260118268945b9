"""Asking for a recalculation, the one way every trigger site does it.

A mutation first locks its property and checks its correlation id (a replay changes nothing),
then changes data, then asks for the recalculation in the same transaction. The SQL function
`compliance_request_recalculation` is the same contract non-Python producers call.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

import outbox
from services.errors import DuplicateRequest, PropertyNotFound
from services.queries import QUERIES
from services.vocabulary import Actor, TriggerReason


def coalescing_key(property_id: int) -> str:
    return f"property:{property_id}"


@dataclass(frozen=True, slots=True)
class LockedProperty:
    id: int
    client_id: int


def lock_property_for_change(
    conn: psycopg.Connection, property_id: int, correlation_id: str
) -> LockedProperty:
    """Locks the property and refuses a replayed correlation id before anything changes."""
    row = conn.execute(QUERIES["lock_property"], {"property_id": property_id}).fetchone()
    if row is None:
        raise PropertyNotFound(f"property {property_id} does not exist")
    job_id = outbox.find_request(
        conn, coalescing_key=coalescing_key(property_id), correlation_id=correlation_id
    )
    if job_id is not None:
        raise DuplicateRequest(correlation_id, job_id)
    return LockedProperty(id=row[0], client_id=row[1])


def request_recalculation(
    conn: psycopg.Connection,
    property_id: int,
    *,
    trigger: TriggerReason,
    actor: Actor,
    correlation_id: str,
    mark_pending: bool = True,
) -> int:
    """Enqueues (or joins) the property's recalculation; returns the job id.

    mark_pending=False is for verification runs (drift sweep): they must not show
    "Updating..." for a property nobody changed.
    """
    row = conn.execute(
        QUERIES["request_recalculation"],
        {
            "property_id": property_id,
            "correlation_id": correlation_id,
            "trigger_reason": str(trigger),
            "actor_type": str(actor.type),
            "actor_id": actor.id,
            "mark_pending": mark_pending,
        },
    ).fetchone()
    assert row is not None
    job_id, created_request, _created_job = row
    if not created_request:
        raise DuplicateRequest(correlation_id, job_id)
    return job_id


def request_manual_recalculation(
    conn: psycopg.Connection, property_id: int, *, actor: Actor, correlation_id: str
) -> int:
    """An admin asks for a fresh score (also a verification run: drift is checked)."""
    with conn.transaction():
        lock_property_for_change(conn, property_id, correlation_id)
        return request_recalculation(
            conn,
            property_id,
            trigger=TriggerReason.MANUAL_RECALCULATION,
            actor=actor,
            correlation_id=correlation_id,
        )
