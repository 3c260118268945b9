"""Nightly expiry rollover: a stored score goes stale when the calendar moves a document
across an expiry boundary, although no one changed anything.

A score is computed as of a date (`properties.compliance_as_of`). Between that date and today
a live document may have expired, or entered the expiring-soon window, and the stored score no
longer says so. Those properties get a recalculation; the rest are left alone. The boundary
test lives in SQL (services/sql/maintenance.sql) and mirrors `scoring.document_state`.

Idempotent per day: the correlation id is `expiry-rollover:<today>` and the outbox accepts a
(property, correlation id) once, so a second run, a second beat or a manual rerun enqueues
nothing new. Because the window starts at each property's as-of date rather than yesterday, a
night the beat missed is caught up by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import psycopg

from outbox.prune import require_idle
from services.queries import QUERIES
from services.scoring import EXPIRING_WINDOW
from services.vocabulary import Actor, TriggerReason

BEAT_ACTOR = Actor.system("beat")


@dataclass(frozen=True, slots=True)
class RolloverReport:
    #: Recalculation requests accepted by this run.
    enqueued: int
    #: Properties that needed one but had today's rollover request already (an earlier run).
    already_requested: int
    #: Properties examined.
    scanned: int


def correlation_id(today: date) -> str:
    return f"expiry-rollover:{today.isoformat()}"


def roll_over_expiries(conn: psycopg.Connection, *, today: date, batch_size: int = 500) -> RolloverReport:
    """Requests a recalculation for every scored property a document expiry has overtaken
    since its score's as-of date. One transaction per `batch_size` properties, so a large
    estate never holds many property locks for long; `conn` must not be inside a transaction."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    params = {
        "today": today,
        "window_days": EXPIRING_WINDOW.days,
        "correlation_id": correlation_id(today),
        "trigger_reason": str(TriggerReason.EXPIRY_ROLLOVER),
        "actor_type": str(BEAT_ACTOR.type),
        "actor_id": BEAT_ACTOR.id,
        "limit": batch_size,
    }
    require_idle(conn)
    enqueued = already = scanned = 0
    after = 0
    while True:
        with conn.transaction():
            row = conn.execute(QUERIES["maintenance_expiry_rollover_batch"],
                               params | {"after_property_id": after}).fetchone()
        assert row is not None
        batch_scanned, last_id, batch_enqueued, batch_already = row
        scanned += batch_scanned
        enqueued += batch_enqueued
        already += batch_already
        if batch_scanned < batch_size:
            return RolloverReport(enqueued=enqueued, already_requested=already, scanned=scanned)
        after = last_id
