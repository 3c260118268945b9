"""Drift sweep: verification runs for every scored property, in bounded batches.

A verification run recomputes a score nobody asked to change; if the stored score differs from
what its own inputs give at its own as-of date, the recalculation records
COMPLIANCE_SCORE_DRIFT_DETECTED (G6) and applies the computed value. The sweep only asks for
the runs (mark_pending=False: nothing changed, so clients see no "Updating..."); workers do
them as ordinary jobs. One request per property per day (`drift-sweep:<today>`), so rerunning a
batch, or the whole sweep, asks for nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from outbox.prune import require_idle
from services.queries import QUERIES
from services.vocabulary import Actor, TriggerReason

BEAT_ACTOR = Actor.system("beat")


@dataclass(frozen=True, slots=True)
class SweepReport:
    #: Verification runs this batch asked for (repeats of today's requests are not counted).
    requested: int
    #: Where the next batch starts; None when this batch reached the last property.
    next_after_property_id: int | None


def correlation_id(today: date) -> str:
    return f"drift-sweep:{today.isoformat()}"


def sweep(conn: psycopg.Connection, *, today: date, batch_size: int, after_property_id: int = 0) -> SweepReport:
    """One batch: the `batch_size` properties after `after_property_id`, in one transaction.
    The caller walks the batches (the beat task re-enqueues itself), so no single task holds a
    worker for the whole estate."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    require_idle(conn)
    with conn.transaction():
        row = conn.execute(
            QUERIES["maintenance_drift_sweep_batch"],
            {
                "after_property_id": after_property_id,
                "limit": batch_size,
                "correlation_id": correlation_id(today),
                "trigger_reason": str(TriggerReason.DRIFT_SWEEP),
                "actor_type": str(BEAT_ACTOR.type),
                "actor_id": BEAT_ACTOR.id,
            },
        ).fetchone()
    assert row is not None
    scanned, last_id, requested = row
    return SweepReport(requested=requested, next_after_property_id=last_id if scanned == batch_size else None)


def drift_detected_since(conn: psycopg.Connection, since: datetime) -> int:
    """How many recalculations found a drifted score since `since` (timezone-aware)."""
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware (UTC)")
    row = conn.execute(QUERIES["maintenance_drift_detected_since"], {"since": since}).fetchone()
    assert row is not None
    return row[0]
