"""Suggestions for a stored document, and applying them.

The server always recomputes the suggestion from the stored bytes when applying it: a client
cannot apply values it made up, and since the extractor is deterministic the values applied
are the ones it was shown (for the same extractor version).
"""

from __future__ import annotations

import psycopg

import outbox
from services.documents import DocumentChanged, apply_ai_suggestion
from services.errors import DocumentNotFound, DuplicateRequest, InvalidInput
from services.extraction import Suggestion, suggest
from services.file_store import FileStore
from services.queries import QUERIES
from services.recalc_requests import coalescing_key
from services.uploads import FileKind, sniff_kind
from services.vocabulary import Actor


def suggest_for_document(conn: psycopg.Connection, store: FileStore, *, document_id: int) -> Suggestion:
    """The extractor's suggestion for a live document. Raises DocumentNotFound for a missing
    or deleted one, and file_store.StoredFileMissing if its file is gone (a broken
    invariant, not a client error)."""
    with conn.transaction():
        row = conn.execute(QUERIES["live_document_file"], {"document_id": document_id}).fetchone()
    if row is None:
        raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
    sha256 = row[5]
    content = store.read(sha256)
    # The bytes passed inspect_file on upload, so the first bytes tell the kind.
    kind = sniff_kind(content) or FileKind.TEXT
    return suggest(content, kind)


def apply_suggestion(
    conn: psycopg.Connection,
    store: FileStore,
    *,
    document_id: int,
    actor: Actor,
    correlation_id: str,
) -> tuple[Suggestion, DocumentChanged]:
    """Recomputes the suggestion and applies what it found; a field it did not find keeps the
    document's current value. Nothing found: InvalidInput (rule nothing_to_apply), nothing
    changes. A replayed correlation id raises DuplicateRequest before any extraction."""
    _refuse_replay(conn, document_id, correlation_id)
    suggestion = suggest_for_document(conn, store, document_id=document_id)
    if suggestion.requirement_code is None and suggestion.expires_at is None:
        raise InvalidInput(
            "the extractor found neither a requirement nor an expiry date in this document: "
            + "; ".join(suggestion.notes),
            field="document", rule="nothing_to_apply",
        )
    with conn.transaction():
        current = conn.execute(QUERIES["lock_live_document_fields"], {"document_id": document_id}).fetchone()
        if current is None:
            raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
        current_requirement, current_expiry = current
        changed = apply_ai_suggestion(
            conn,
            document_id=document_id,
            requirement_code=suggestion.requirement_code or current_requirement,
            expires_at=suggestion.expires_at or current_expiry,
            actor=actor,
            correlation_id=correlation_id,
        )
    return suggestion, changed


def _refuse_replay(conn: psycopg.Connection, document_id: int, correlation_id: str) -> None:
    """A cheap early answer for a replay (apply_ai_suggestion checks again under the lock,
    which is the check that counts)."""
    with conn.transaction():
        row = conn.execute(QUERIES["document_property"], {"document_id": document_id}).fetchone()
        if row is None:
            raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
        job_id = outbox.find_request(conn, coalescing_key=coalescing_key(row[0]), correlation_id=correlation_id)
    if job_id is not None:
        raise DuplicateRequest(correlation_id, job_id)
