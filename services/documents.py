"""Document mutations. Each one changes the document and requests the property's
recalculation in one transaction; none of them computes a score."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import psycopg

from services import audit
from services.errors import DocumentNotFound, InvalidInput, InvalidTransition
from services.queries import QUERIES
from services.recalc_requests import lock_property_for_change, request_recalculation
from services.scoring import REQUIREMENTS, DocumentStatus
from services.vocabulary import Actor, AuditAction, TriggerReason

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_DOCUMENTS_PER_REQUEST = 50


class DocumentSource:
    CLIENT = "client"
    ADMIN = "admin"
    AI = "ai"
    ALL = (CLIENT, ADMIN, AI)


@dataclass(frozen=True, slots=True)
class NewDocument:
    requirement_code: str
    file_name: str
    size_bytes: int
    sha256: str
    expires_at: date | None = None
    status: DocumentStatus = DocumentStatus.PENDING_VERIFICATION

    def validate(self) -> None:
        validate_requirement_code(self.requirement_code)
        if not isinstance(self.file_name, str) or not 1 <= len(self.file_name) <= 255:
            raise InvalidInput("file_name must be 1 to 255 characters")
        if not isinstance(self.size_bytes, int) or self.size_bytes < 0:
            raise InvalidInput("size_bytes must be a non-negative integer")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise InvalidInput("sha256 must be 64 lowercase hexadecimal characters")
        validate_expiry(self.expires_at)
        if not isinstance(self.status, DocumentStatus):
            raise InvalidInput(f"status must be one of {', '.join(DocumentStatus)}")
        if self.status is DocumentStatus.REJECTED:
            # A rejection needs a reviewer's reason: upload, then reject_document.
            raise InvalidInput("a new document must be pending_verification or verified; reject it afterwards")


@dataclass(frozen=True, slots=True)
class DocumentsAdded:
    document_ids: tuple[int, ...]
    job_id: int


@dataclass(frozen=True, slots=True)
class DocumentChanged:
    document_id: int
    property_id: int
    job_id: int


def validate_requirement_code(code: object) -> None:
    if code not in REQUIREMENTS:
        raise InvalidInput(
            f"requirement_code must be one of {', '.join(REQUIREMENTS)}; got {code!r}",
            field="requirement_code", rule="one_of", valid_values=tuple(REQUIREMENTS),
        )


def validate_expiry(expires_at: object) -> None:
    if expires_at is not None and (not isinstance(expires_at, date) or isinstance(expires_at, str)):
        raise InvalidInput("expires_at must be a date (YYYY-MM-DD) or empty", field="expires_at", rule="date")


def add_documents(
    conn: psycopg.Connection,
    *,
    property_id: int,
    documents: Sequence[NewDocument],
    source: str,
    actor: Actor,
    trigger: TriggerReason,
    correlation_id: str,
) -> DocumentsAdded:
    """Adds one or many documents (single, bulk or zip upload) and requests one recalculation."""
    if not documents:
        raise InvalidInput("at least one document is required")
    if len(documents) > MAX_DOCUMENTS_PER_REQUEST:
        raise InvalidInput(
            f"at most {MAX_DOCUMENTS_PER_REQUEST} documents per request", field="files", rule="max_items"
        )
    if source not in DocumentSource.ALL:
        raise InvalidInput(f"source must be one of {', '.join(DocumentSource.ALL)}")
    for document in documents:
        document.validate()
    with conn.transaction():
        prop = lock_property_for_change(conn, property_id, correlation_id)
        ids = []
        for document in documents:
            row = conn.execute(
                QUERIES["insert_document"],
                {
                    "property_id": property_id,
                    "requirement_code": document.requirement_code,
                    "status": str(document.status),
                    "expires_at": document.expires_at,
                    "file_name": document.file_name,
                    "size_bytes": document.size_bytes,
                    "sha256": document.sha256,
                    "source": source,
                },
            ).fetchone()
            assert row is not None
            ids.append(row[0])
        audit.record(
            conn,
            AuditAction.DOCUMENT_UPLOADED,
            actor,
            property_id=property_id,
            client_id=prop.client_id,
            correlation_id=correlation_id,
            details={"document_ids": ids, "trigger": str(trigger)},
        )
        job_id = request_recalculation(
            conn, property_id, trigger=trigger, actor=actor, correlation_id=correlation_id
        )
        return DocumentsAdded(document_ids=tuple(ids), job_id=job_id)


def delete_document(
    conn: psycopg.Connection,
    *,
    document_id: int,
    actor: Actor,
    trigger: TriggerReason,
    correlation_id: str,
) -> DocumentChanged:
    """Soft-deletes a document (client or admin delete)."""
    with conn.transaction():
        property_id = property_of_document(conn, document_id)
        prop = lock_property_for_change(conn, property_id, correlation_id)
        cur = conn.execute(QUERIES["soft_delete_document"], {"document_id": document_id})
        if cur.rowcount != 1:
            raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
        audit.record(
            conn,
            AuditAction.DOCUMENT_DELETED,
            actor,
            property_id=property_id,
            client_id=prop.client_id,
            correlation_id=correlation_id,
            details={"document_id": document_id, "trigger": str(trigger)},
        )
        job_id = request_recalculation(
            conn, property_id, trigger=trigger, actor=actor, correlation_id=correlation_id
        )
        return DocumentChanged(document_id, property_id, job_id)


def verify_document(
    conn: psycopg.Connection, *, document_id: int, actor: Actor, correlation_id: str
) -> DocumentChanged:
    return _set_status(
        conn, document_id, DocumentStatus.VERIFIED, None, actor, correlation_id,
        TriggerReason.VERIFY, AuditAction.DOCUMENT_VERIFIED,
    )


def reject_document(
    conn: psycopg.Connection, *, document_id: int, reason: str, actor: Actor, correlation_id: str
) -> DocumentChanged:
    if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= 500:
        raise InvalidInput("a rejection needs a reason of 1 to 500 characters", field="reason", rule="length_1_500")
    return _set_status(
        conn, document_id, DocumentStatus.REJECTED, reason.strip(), actor, correlation_id,
        TriggerReason.REJECT, AuditAction.DOCUMENT_REJECTED,
    )


def apply_ai_suggestion(
    conn: psycopg.Connection,
    *,
    document_id: int,
    requirement_code: str,
    expires_at: date | None,
    actor: Actor,
    correlation_id: str,
) -> DocumentChanged:
    """Applies an extractor's suggestion (requirement type, expiry) to a document."""
    validate_requirement_code(requirement_code)
    validate_expiry(expires_at)
    with conn.transaction():
        property_id = property_of_document(conn, document_id)
        prop = lock_property_for_change(conn, property_id, correlation_id)
        before = _live_document(conn, document_id)
        conn.execute(
            QUERIES["apply_ai_fields"],
            {"document_id": document_id, "requirement_code": requirement_code, "expires_at": expires_at},
        )
        audit.record(
            conn,
            AuditAction.AI_SUGGESTION_APPLIED,
            actor,
            property_id=property_id,
            client_id=prop.client_id,
            correlation_id=correlation_id,
            details={
                "document_id": document_id,
                "before": {"requirement_code": before[2], "expires_at": _iso(before[4])},
                "after": {"requirement_code": requirement_code, "expires_at": _iso(expires_at)},
            },
        )
        job_id = request_recalculation(
            conn, property_id, trigger=TriggerReason.AI_APPLY, actor=actor,
            correlation_id=correlation_id,
        )
        return DocumentChanged(document_id, property_id, job_id)


def _set_status(
    conn: psycopg.Connection,
    document_id: int,
    status: DocumentStatus,
    rejection_reason: str | None,
    actor: Actor,
    correlation_id: str,
    trigger: TriggerReason,
    action: AuditAction,
) -> DocumentChanged:
    with conn.transaction():
        property_id = property_of_document(conn, document_id)
        prop = lock_property_for_change(conn, property_id, correlation_id)
        current = DocumentStatus(_live_document(conn, document_id)[3])
        if current is status:
            raise InvalidTransition(f"document {document_id} is already {status}")
        conn.execute(
            QUERIES["set_document_status"],
            {"document_id": document_id, "status": str(status), "rejection_reason": rejection_reason},
        )
        audit.record(
            conn, action, actor, property_id=property_id, client_id=prop.client_id,
            correlation_id=correlation_id,
            details={"document_id": document_id, "from": str(current), "to": str(status),
                     "reason": rejection_reason},
        )
        job_id = request_recalculation(
            conn, property_id, trigger=trigger, actor=actor, correlation_id=correlation_id
        )
        return DocumentChanged(document_id, property_id, job_id)


def _live_document(conn: psycopg.Connection, document_id: int) -> tuple:
    row = conn.execute(QUERIES["live_document"], {"document_id": document_id}).fetchone()
    if row is None:
        raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
    return row


def property_of_document(conn: psycopg.Connection, document_id: int) -> int:
    """The document's property, deleted or not: whether it is still live is checked under the
    property lock, after the replay check, so a replayed delete answers DuplicateRequest."""
    row = conn.execute(QUERIES["document_property"], {"document_id": document_id}).fetchone()
    if row is None:
        raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
    return row[0]


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None
