"""Writes audit rows. Append-only: nothing in recalq updates or deletes them."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.queries import QUERIES
from services.vocabulary import Actor, AuditAction


def record(
    conn: psycopg.Connection,
    action: AuditAction,
    actor: Actor,
    *,
    property_id: int | None = None,
    client_id: int | None = None,
    correlation_id: str | None = None,
    job_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        QUERIES["insert_audit"],
        {
            "action": str(action),
            "actor_type": str(actor.type),
            "actor_id": actor.id,
            "property_id": property_id,
            "client_id": client_id,
            "correlation_id": correlation_id,
            "job_id": job_id,
            "details": Jsonb(details or {}),
        },
    )
