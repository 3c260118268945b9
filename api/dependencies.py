"""Per-request resources: a pooled database connection, the file store, the correlation id."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Header, HTTPException, Request, Response
from pydantic import BaseModel

from services.file_store import FileStore
from services.uploads import UploadLimits
from services.vocabulary import Actor

#: Printable ASCII without spaces, like Stripe's and the IETF draft's keys (a UUID fits).
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    with request.app.state.runtime.connection() as conn:
        yield conn


def get_store(request: Request) -> FileStore:
    return request.app.state.file_store


def get_limits(request: Request) -> UploadLimits:
    return request.app.state.upload_limits


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=_IDEMPOTENCY_KEY.pattern,
            description="Makes a retried request safe: the same key (per caller) changes data and "
            "enqueues once; a replay answers 200 with `Idempotent-Replayed: true`. 1-128 printable "
            "ASCII characters, e.g. a UUID.",
        ),
    ] = None,
) -> str | None:
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise HTTPException(
            400, "Idempotency-Key must be 1 to 128 printable ASCII characters without spaces (e.g. a UUID)"
        )
    return key


def correlation_id(actor: Actor, key: str | None) -> str:
    """The request's correlation id: the caller's Idempotency-Key, scoped to the caller so two
    callers' keys never collide; without a key, one made up for this request alone."""
    return f"{actor.type}:{actor.id}:{key if key is not None else 'auto:' + uuid.uuid4().hex}"


Conn = Annotated[psycopg.Connection, Depends(get_conn, scope="function")]
Store = Annotated[FileStore, Depends(get_store)]
Limits = Annotated[UploadLimits, Depends(get_limits)]
IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]

#: The response header that marks an answer to a replayed Idempotency-Key.
REPLAYED_HEADER = "Idempotent-Replayed"


def mark_replayed(response: Response) -> None:
    """A replay answers 200 (not 201/202): nothing was created or queued this time."""
    response.status_code = 200
    response.headers[REPLAYED_HEADER] = "true"


def replay_response(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry for a replay's answer, shared by every mutation route."""
    return {
        200: {
            "model": model,
            "description": f"A replay (`{REPLAYED_HEADER}: true`): the request was accepted before with this "
            "Idempotency-Key; nothing changed again, and the body is what the first request made",
            "headers": {REPLAYED_HEADER: {"description": "Always `true`",
                                          "schema": {"type": "string", "enum": ["true"]}}},
        }
    }
