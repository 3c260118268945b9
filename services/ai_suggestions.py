"""Suggestions for a stored document, and applying them.

The server always takes the suggestion from the stored bytes when applying it: a client
cannot apply values it made up, and since the extractor is deterministic the values applied
are the ones it was shown (for the same extractor version). A file's bytes never change, so
its suggestion is computed once per extractor version and read from `document_suggestion`
after that: the work a document costs is paid once, not per request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import date
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import outbox
from services.documents import DocumentChanged, apply_ai_suggestion
from services.errors import DocumentNotFound, DuplicateRequest, InvalidInput
from services.extraction import EXTRACTOR_VERSION, Evidence, Suggestion, suggest
from services.file_store import FileStore
from services.queries import QUERIES
from services.recalc_requests import coalescing_key
from services.uploads import FileKind, sniff_kind
from services.vocabulary import Actor

#: Opens a connection for a moment (e.g. the API's pool.connection).
Connect = Callable[[], AbstractContextManager[psycopg.Connection]]


def suggest_for_document(conn: psycopg.Connection, store: FileStore, *, document_id: int) -> Suggestion:
    """The extractor's suggestion for a live document, computed once per file and extractor
    version. Raises DocumentNotFound for a missing or deleted one, and
    file_store.StoredFileMissing if its file is gone (a broken invariant, not a client error)."""
    with conn.transaction():
        sha256 = _live_file(conn, document_id)
        cached = _cached(conn, sha256)
    if cached is not None:
        return cached
    suggestion = _compute(store, sha256)
    with conn.transaction():
        _cache(conn, sha256, suggestion)
    return suggestion


def suggest_holding_no_connection(connect: Connect, store: FileStore, *, document_id: int) -> Suggestion:
    """As suggest_for_document, for a request path: a connection is held only to look the
    document up and to store the answer, never while the extractor reads the file, so a slow
    first read of a large file takes no database connection from anyone else."""
    with connect() as conn:
        sha256 = _live_file(conn, document_id)
        cached = _cached(conn, sha256)
    if cached is not None:
        return cached
    suggestion = _compute(store, sha256)
    with connect() as conn:
        _cache(conn, sha256, suggestion)
    return suggestion


def _live_file(conn: psycopg.Connection, document_id: int) -> str:
    row = conn.execute(QUERIES["live_document_file"], {"document_id": document_id}).fetchone()
    if row is None:
        raise DocumentNotFound(f"document {document_id} does not exist or was deleted")
    return str(row[5])


def _compute(store: FileStore, sha256: str) -> Suggestion:
    content = store.read(sha256)
    # The bytes passed inspect_file on upload, so the first bytes tell the kind.
    kind = sniff_kind(content) or FileKind.TEXT
    return suggest(content, kind)


def _cached(conn: psycopg.Connection, sha256: str) -> Suggestion | None:
    row = conn.execute(QUERIES["cached_suggestion"], {"sha256": sha256, "version": EXTRACTOR_VERSION}).fetchone()
    return suggestion_from_json(row[0]) if row is not None else None


def _cache(conn: psycopg.Connection, sha256: str, suggestion: Suggestion) -> None:
    conn.execute(QUERIES["cache_suggestion"], {"sha256": sha256, "version": suggestion.extractor_version,
                                               "suggestion": Jsonb(suggestion_to_json(suggestion))})


def suggestion_to_json(suggestion: Suggestion) -> dict[str, Any]:
    return {
        "requirement_code": suggestion.requirement_code,
        "expires_at": suggestion.expires_at.isoformat() if suggestion.expires_at else None,
        "evidence": [dataclasses.asdict(e) for e in suggestion.evidence],
        "notes": list(suggestion.notes),
        "extractor_version": suggestion.extractor_version,
    }


def suggestion_from_json(data: dict[str, Any]) -> Suggestion:
    return Suggestion(
        requirement_code=data["requirement_code"],
        expires_at=date.fromisoformat(data["expires_at"]) if data["expires_at"] else None,
        evidence=tuple(Evidence(**e) for e in data["evidence"]),
        notes=tuple(data["notes"]),
        extractor_version=data["extractor_version"],
    )


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
