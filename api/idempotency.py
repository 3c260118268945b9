"""Every change is answered once: a retry under its key gets the first answer, never a second change.

Each change route takes a key: the caller's `Idempotency-Key`, or one the server makes up when
none was sent. The answer carries it back in the `Idempotency-Key` header, on success and on a
503 alike, so a caller who never learned whether its change committed (the connection dropped,
the database went away mid-commit) can retry under that key and be told, exactly once, what
happened. The answer itself is stored in the change's transaction (services.idempotent_answers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.errors import DuplicateRequest
from services.idempotent_answers import (
    AnswerAlreadyStored,
    KeyedRequest,
    StoredAnswer,
    keyed_request,
    store_answer,
    stored_answer,
)
from services.vocabulary import Actor

M = TypeVar("M", bound=BaseModel)

#: The request and response header of a change's key.
KEY_HEADER = "Idempotency-Key"
#: The response header that marks an answer to a replayed key.
REPLAYED_HEADER = "Idempotent-Replayed"
#: Keys the server makes for requests sent without one.
SERVER_KEY_PREFIX = "srv_"

#: Stores an answer in the change's open transaction (for services that commit themselves).
Record = Callable[[psycopg.Connection, BaseModel], None]


class AnswerInstead(Exception):
    """Raised inside a change to refuse it with `response` (a problem document): the change's
    transaction rolls back, nothing is stored under the key, and the caller is answered with it."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


def keyed(request: Request, actor: Actor, key: str, values: Any = None) -> KeyedRequest:
    """The change this request asks for, under the caller's key: its path is the route's as
    sent (so the same key on another property is another request) and `values` is everything
    else it sent, validated."""
    return keyed_request(f"{actor.type}:{actor.id}", key, request.method, request.url.path, values)


def answer_once(
    conn: psycopg.Connection,
    request: KeyedRequest,
    change: Callable[[], M],
    *,
    replay_as: Callable[[M], BaseModel] | None = None,
) -> M | JSONResponse:
    """Replays the stored answer, or runs `change` in one transaction with storing its answer
    (a change that raises AnswerInstead is refused with that answer, storing nothing).
    `replay_as` is what a retry is told when it differs from the first answer (a secret shown
    once is not shown again)."""

    def in_one_transaction(record: Record) -> M:
        with conn.transaction():
            made = change()
            record(conn, made)
        return made

    return answer_once_within(conn, request, in_one_transaction, replay_as=replay_as)


def answer_once_within(
    conn: psycopg.Connection,
    request: KeyedRequest,
    change: Callable[[Record], M],
    *,
    replay_as: Callable[[M], BaseModel] | None = None,
) -> M | JSONResponse:
    """As answer_once, for a change that commits its own transaction: it calls `record` with its
    answer inside that transaction, before the commit."""
    earlier = stored_answer(conn, request)
    if earlier is not None:
        return replayed(request, earlier)

    def record(tx: psycopg.Connection, made: BaseModel) -> None:
        shown = replay_as(made) if replay_as is not None else made  # type: ignore[arg-type]
        store_answer(tx, request, shown.model_dump(mode="json"))

    try:
        return change(record)
    except AnswerInstead as refused:
        return refused.response
    except (AnswerAlreadyStored, DuplicateRequest):
        # A concurrent request under the key committed first; this one rolled back.
        first = stored_answer(conn, request)
        if first is None:
            raise  # accepted before answers were stored: the 409 "already accepted"
        return replayed(request, first)


def replayed(request: KeyedRequest, answer: StoredAnswer) -> JSONResponse:
    """A replay answers 200 (not 201/202): nothing was created or queued this time."""
    return JSONResponse(answer.body, status_code=200, headers={REPLAYED_HEADER: "true", KEY_HEADER: request.key})
