"""The first answer of every keyed change, stored in the transaction that makes the change.

A retry of a change (the client's own, or one after an answer that never arrived) must be told
what the first request did, not have it done twice and not be told something else: the answer
is stored with the change, so it exists exactly when the change committed, and a retry under
the same key is answered with it whatever has happened since (the document was deleted, the
job finished). The request's fingerprint travels with it: the same key with anything else is
another request, and is refused instead of being answered as if it had happened.

A key belongs to its caller (`scope`), across every route: the same key from another caller is
another key; the same key on another route, property or body is a reused key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.errors import InvalidInput, ServiceError
from services.queries import QUERIES


@dataclass(frozen=True, slots=True)
class KeyedRequest:
    """A change and the key it is answered under."""

    scope: str
    key: str
    method: str
    path: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    body: Any
    created_at: datetime


class AnswerAlreadyStored(ServiceError):
    """Another request under this key committed first; this one's change must roll back."""


class KeyReused(InvalidInput):
    """The key was spent on a different request."""

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used for a different request; use a new key",
                         field="header.Idempotency-Key", rule="reused_for_another_request")


def keyed_request(scope: str, key: str, method: str, path: str, values: Any) -> KeyedRequest:
    """`values` is everything the request sent besides its path: validated fields, and each
    file by its hash and name. Serialised canonically, so field order and spacing do not
    count as a difference."""
    canonical = json.dumps({"method": method, "path": path, "values": values}, sort_keys=True,
                           separators=(",", ":"), default=str, ensure_ascii=False)
    return KeyedRequest(scope=scope, key=key, method=method, path=path,
                        fingerprint=hashlib.sha256(canonical.encode()).hexdigest())


def stored_answer(conn: psycopg.Connection, request: KeyedRequest) -> StoredAnswer | None:
    """The answer stored under the request's key, or None if the key is unspent; KeyReused if
    it was spent on another request."""
    row = conn.execute(QUERIES["stored_answer"], {"scope": request.scope, "key": request.key}).fetchone()
    if row is None:
        return None
    fingerprint, body, created_at = row[0], row[1], row[2]
    if fingerprint != request.fingerprint:
        raise KeyReused()
    return StoredAnswer(body=body, created_at=created_at)


def store_answer(conn: psycopg.Connection, request: KeyedRequest, body: Any) -> None:
    """Call inside the change's transaction, as its last statement. Raises AnswerAlreadyStored
    when a concurrent request under the key committed first: the caller's transaction must then
    roll back, and the caller answers with what that one stored."""
    row = conn.execute(QUERIES["store_answer"], {
        "scope": request.scope, "key": request.key, "fingerprint": request.fingerprint,
        "method": request.method, "path": request.path, "body": Jsonb(body),
    }).fetchone()
    if row is None:
        raise AnswerAlreadyStored(f"key {request.key!r} was answered by a concurrent request")


def prune_answers(conn: psycopg.Connection, *, older_than: timedelta, batch_size: int = 5000) -> int:
    """Forgets answers older than `older_than` (a retry after that is a new request), a batch
    per transaction; returns how many went."""
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    total = 0
    while True:
        with conn.transaction():
            deleted = conn.execute(QUERIES["prune_answers"],
                                   {"older_than": older_than, "batch_size": batch_size}).rowcount
        total += deleted
        if deleted < batch_size:
            return total
