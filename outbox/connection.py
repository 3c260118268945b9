"""Runs outbox SQL on whatever open connection the caller holds.

Enqueue must join the caller's transaction, so it takes the caller's connection as it is: a
psycopg 3 connection, or a SQLAlchemy Connection or Session bound to psycopg. It never opens
one of its own.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

from outbox.errors import InvalidEnqueue

try:  # SQLAlchemy is optional for callers that use plain psycopg.
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import Session as SASession
except ImportError:  # pragma: no cover - SQLAlchemy is a dependency of recalq itself
    SAConnection = SASession = DBAPIError = None  # type: ignore[assignment,misc]

Connectionish = Any


def fetch_all(conn: Connectionish, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(conn, psycopg.Connection):
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            # Asked of the result, not of cur.description: in pipeline mode (a worker sends a
            # transaction's statements together) the description is empty until fetchall
            # waits for the result.
            try:
                return cur.fetchall()
            except psycopg.ProgrammingError:
                if cur.pgresult is not None and cur.pgresult.status == pq.ExecStatus.COMMAND_OK:
                    return []  # a statement that returns no rows
                raise
    if SASession is not None and isinstance(conn, SASession):
        conn = conn.connection()
    if SAConnection is not None and isinstance(conn, SAConnection):
        # exec_driver_sql hands the statement to psycopg unchanged (pyformat parameters).
        result = conn.exec_driver_sql(sql, params)
        return [dict(row._mapping) for row in result] if result.returns_rows else []
    raise TypeError(
        "expected an open psycopg.Connection or a SQLAlchemy Connection/Session, "
        f"got {type(conn).__name__}"
    )


def fetch_one(conn: Connectionish, sql: str, params: dict[str, Any]) -> dict[str, Any] | None:
    rows = fetch_all(conn, sql, params)
    return rows[0] if rows else None


def raise_if_contract_violation(exc: BaseException) -> None:
    """Turns the database's refusal of an enqueue into InvalidEnqueue; other errors pass."""
    orig = exc.orig if DBAPIError is not None and isinstance(exc, DBAPIError) else exc
    if isinstance(orig, psycopg.errors.InvalidParameterValue):
        diag = orig.diag
        raise InvalidEnqueue(diag.message_primary or str(orig), diag.message_hint) from exc
