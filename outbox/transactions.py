"""The short transactions a job's attempt is made of, on a pooled connection.

A worker's transaction is pipelined: BEGIN travels with the first statements, each fetch is
one round trip for everything sent before it, and COMMIT is the last one, so an attempt costs a
few round trips however many statements it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg
from psycopg.pq import TransactionStatus


@contextmanager
def pipelined_transaction(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction in pipeline mode on an autocommit connection (or psycopg's own).

    Any error, in Postgres or in between, rolls the transaction back before the connection
    goes back to its pool. A statement whose result is never read still reports its error,
    at the next fetch or at the COMMIT, so nothing fails silently.
    """
    try:
        with conn.pipeline():
            if conn.autocommit:  # otherwise psycopg opens the transaction itself
                conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status in (TransactionStatus.INTRANS,
                                                                TransactionStatus.INERROR):
            with suppress(psycopg.Error):
                conn.rollback()
        raise
