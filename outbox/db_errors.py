"""Sorts database errors into the three kinds a job's attempt treats differently (SQLSTATE).

- infrastructure: the database cannot be reached or is shutting down. The attempt is retried
  and never counted, so an outage cannot push healthy jobs to DEAD.
- transient: contention that may clear (lock timeout, deadlock, serialization failure,
  statement timeout). The attempt counts and is retried with backoff.
- anything else passes unchanged; the runner counts it as a failed attempt like any error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import PoolTimeout

from outbox.errors import InfrastructureUnavailable, RetryableJobError

_INFRASTRUCTURE_SQLSTATES = frozenset({
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "53300",  # too_many_connections
})
_TRANSIENT_SQLSTATES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available (lock_timeout)
    "57014",  # query_canceled (statement_timeout)
})


def is_infrastructure_error(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        # No SQLSTATE: the error came from the client side, i.e. the connection broke.
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return sqlstate.startswith("08") or sqlstate in _INFRASTRUCTURE_SQLSTATES


def is_transient_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.Error) and exc.sqlstate in _TRANSIENT_SQLSTATES


@contextmanager
def translated_db_errors() -> Iterator[None]:
    """Re-raises infrastructure and transient database errors as the runner's error classes."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        if is_infrastructure_error(exc):
            raise InfrastructureUnavailable(describe(exc)) from exc
        if is_transient_error(exc):
            raise RetryableJobError(describe(exc)) from exc
        raise


def describe(exc: BaseException) -> str:
    """One line naming the error's type and SQLSTATE: what an operator reads in last_error."""
    sqlstate = getattr(exc, "sqlstate", None)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}[{sqlstate}]: {message}" if sqlstate else f"{type(exc).__name__}: {message}"
