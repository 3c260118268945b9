"""Per-request resources: a pooled database connection, the file store, the correlation id."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel

from api.idempotency import KEY_HEADER, REPLAYED_HEADER, SERVER_KEY_PREFIX
from api.problems import MalformedHeader
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
    request: Request,
    response: Response,
    key: Annotated[
        str | None,
        Header(
            alias=KEY_HEADER,
            description="Makes a retried change safe: under one key (per caller, across every route) a "
            "change happens once, and a retry is answered 200 with the first answer and "
            "`Idempotent-Replayed: true`; the same key with another request answers 422. Without one "
            "the server makes a key and sends it back in this header. 1-128 printable ASCII "
            "characters, e.g. a UUID.",
            # Documented, but checked below: a malformed key is a 400, not a validation 422.
            json_schema_extra={"pattern": _IDEMPOTENCY_KEY.pattern},
        ),
    ] = None,
) -> str:
    """The change's key: the caller's, or a server-made one. Every answer carries it back (the
    problem handlers read it from request.state for a 503), so a caller who never learned
    whether a change committed can ask again under it."""
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise MalformedHeader(KEY_HEADER, "format", "Idempotency-Key must be 1 to 128 printable ASCII characters "
                              "without spaces (e.g. a UUID)")
    chosen = key if key is not None else SERVER_KEY_PREFIX + uuid.uuid4().hex
    request.state.change_key = chosen
    response.headers[KEY_HEADER] = chosen
    return chosen


def correlation_id(actor: Actor, key: str) -> str:
    """The request's correlation id: its key, scoped to the caller so two callers' keys never
    collide."""
    return f"{actor.type}:{actor.id}:{key}"


Conn = Annotated[psycopg.Connection, Depends(get_conn, scope="function")]
Store = Annotated[FileStore, Depends(get_store)]
Limits = Annotated[UploadLimits, Depends(get_limits)]
IdempotencyKey = Annotated[str, Depends(idempotency_key)]


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
