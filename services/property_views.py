"""Read models of a client's properties and documents, for the client API.

Every read takes the client id along with the property id and answers PropertyNotFound for a
property of another client exactly as for one that does not exist: an API must not let a
client learn which ids exist. Property ownership never changes, so a check made before a
mutation's transaction stays true inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from services.errors import DocumentNotFound, InvalidInput, PropertyNotFound
from services.queries import QUERIES

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

#: What a client shows for a score: current, being recomputed ("Updating..."), or given up on
#: (the latest recalculation is DEAD and an operator has to requeue it).
UP_TO_DATE = "up_to_date"
UPDATING = "updating"
FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PropertyView:
    id: int
    client_id: int
    name: str
    has_gas_supply: bool
    compliance_score: int | None
    compliance_breakdown: dict[str, Any] | None
    compliance_version: int | None
    compliance_last_calculated_at: datetime | None
    compliance_score_pending: bool
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PropertyPage:
    items: tuple[PropertyView, ...]
    #: Pass as `after_id` for the next page; None on the last page.
    next_after_id: int | None


@dataclass(frozen=True, slots=True)
class DocumentView:
    id: int
    property_id: int
    requirement_code: str
    status: str
    expires_at: date | None
    file_name: str
    size_bytes: int
    sha256: str
    source: str
    rejection_reason: str | None
    created_at: datetime
    updated_at: datetime


def score_status(pending: bool, latest_job_status: str | None) -> str:
    if not pending:
        return UP_TO_DATE
    return FAILED if latest_job_status == "dead" else UPDATING


def owned_property(conn: psycopg.Connection, client_id: int, property_id: int) -> PropertyView:
    """The client's property; PropertyNotFound if it is missing or another client's."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            QUERIES["pv_property_of_client"], {"client_id": client_id, "property_id": property_id}
        ).fetchone()
    if row is None:
        raise PropertyNotFound(f"property {property_id} does not exist")
    return property_from_row(row)


def properties_of_client(
    conn: psycopg.Connection, client_id: int, *, limit: int = DEFAULT_PAGE_SIZE, after_id: int | None = None
) -> PropertyPage:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be 1 to {MAX_PAGE_SIZE}", field="limit", rule=f"range_1_{MAX_PAGE_SIZE}")
    with conn.cursor(row_factory=dict_row) as cur:
        # One row more than asked tells whether another page follows.
        rows = cur.execute(
            QUERIES["pv_properties_of_client"],
            {"client_id": client_id, "after_id": after_id if after_id is not None else 0, "limit": limit + 1},
        ).fetchall()
    items = tuple(property_from_row(row) for row in rows[:limit])
    return PropertyPage(items=items, next_after_id=items[-1].id if len(rows) > limit else None)


def live_documents(conn: psycopg.Connection, property_id: int) -> list[DocumentView]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["pv_live_documents_of_property"], {"property_id": property_id}).fetchall()
    return [DocumentView(**row) for row in rows]


def document_of_property(
    conn: psycopg.Connection, property_id: int, document_id: int, *, include_deleted: bool = False
) -> DocumentView:
    """A document of this property; DocumentNotFound for one of another property, so a
    document id is only reachable through its own (owned) property."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            QUERIES["pv_document_of_property"],
            {"property_id": property_id, "document_id": document_id, "include_deleted": include_deleted},
        ).fetchone()
    if row is None:
        raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
    return DocumentView(**row)


def documents_by_ids(conn: psycopg.Connection, property_id: int, document_ids: list[int]) -> list[DocumentView]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            QUERIES["pv_documents_by_ids"], {"property_id": property_id, "document_ids": list(document_ids)}
        ).fetchall()
    return [DocumentView(**row) for row in rows]


def property_from_row(row: dict[str, Any]) -> PropertyView:
    """A row of the property queries (sync or async) as the view every reader shows."""
    latest = row.pop("latest_job_status")
    return PropertyView(**row, status=score_status(row["compliance_score_pending"], latest))
