"""Sorting database errors (G5, G7): an outage must never use up a job's attempts, contention
must count and back off, and anything else must surface unchanged (the runner then counts it as a
failed attempt like any other error)."""

from __future__ import annotations

import psycopg
import psycopg.errors as pg_errors
import pytest
from psycopg_pool import PoolTimeout

from outbox.db_errors import is_infrastructure_error, is_transient_error, translated_db_errors
from outbox.errors import InfrastructureUnavailable, JobError, RetryableJobError

INFRASTRUCTURE = [
    pytest.param(pg_errors.AdminShutdown("terminating connection due to administrator command"), id="57P01"),
    pytest.param(pg_errors.CrashShutdown("crash"), id="57P02"),
    pytest.param(pg_errors.CannotConnectNow("the database system is starting up"), id="57P03"),
    pytest.param(pg_errors.TooManyConnections("too many clients already"), id="53300"),
    pytest.param(pg_errors.ConnectionFailure("connection failure"), id="08006"),
    pytest.param(pg_errors.lookup("08001")("unable to connect"), id="08001"),
    pytest.param(pg_errors.ConnectionException("connection exception"), id="08000"),
    pytest.param(psycopg.OperationalError("server closed the connection unexpectedly"), id="client-side-operational"),
    pytest.param(psycopg.InterfaceError("the connection is closed"), id="client-side-interface"),
    pytest.param(PoolTimeout("couldn't get a connection after 10.00 sec"), id="pool-timeout"),
]
TRANSIENT = [
    pytest.param(pg_errors.SerializationFailure("could not serialize access"), id="40001"),
    pytest.param(pg_errors.DeadlockDetected("deadlock detected"), id="40P01"),
    pytest.param(pg_errors.LockNotAvailable("canceling statement due to lock timeout"), id="55P03"),
    pytest.param(pg_errors.QueryCanceled("canceling statement due to statement timeout"), id="57014"),
]
NEITHER = [
    pytest.param(pg_errors.UniqueViolation("duplicate key value"), id="23505"),
    pytest.param(pg_errors.UndefinedTable('relation "nope" does not exist'), id="42P01"),
    pytest.param(pg_errors.CheckViolation("violates check constraint"), id="23514"),
    pytest.param(pg_errors.NumericValueOutOfRange("integer out of range"), id="22003"),
    pytest.param(psycopg.ProgrammingError("query has no results"), id="client-side-programming"),
    pytest.param(psycopg.DataError("invalid input"), id="client-side-data"),
]
NOT_DATABASE = [
    pytest.param(ValueError("bad"), id="value-error"),
    pytest.param(ConnectionError("socket"), id="connection-error"),
    pytest.param(TimeoutError("slow"), id="timeout-error"),
]


def test_the_constructed_errors_carry_the_sqlstate_under_test():
    # The classification reads `sqlstate`; these fixtures must really have the codes they claim.
    for param in INFRASTRUCTURE + TRANSIENT + NEITHER:
        (error,) = param.values
        code = error.sqlstate if isinstance(error, psycopg.Error) else None
        assert param.id.startswith(("client-side", "pool")) == (code is None), (param.id, code)
        if code is not None:
            assert code == param.id


@pytest.mark.parametrize("error", INFRASTRUCTURE)
def test_an_unreachable_or_shutting_down_database_is_an_infrastructure_error(error):
    assert is_infrastructure_error(error)
    assert not is_transient_error(error)


@pytest.mark.parametrize("error", TRANSIENT)
def test_contention_that_may_clear_is_a_transient_error(error):
    assert is_transient_error(error)
    assert not is_infrastructure_error(error)


@pytest.mark.parametrize("error", NEITHER + NOT_DATABASE)
def test_other_errors_are_neither_infrastructure_nor_transient(error):
    assert not is_infrastructure_error(error)
    assert not is_transient_error(error)


@pytest.mark.parametrize("error", INFRASTRUCTURE)
def test_an_infrastructure_error_is_reraised_as_infrastructure_unavailable_with_its_cause(error):
    with pytest.raises(InfrastructureUnavailable) as raised, translated_db_errors():
        raise error
    assert raised.value.__cause__ is error
    assert isinstance(raised.value, JobError)
    assert type(error).__name__ in str(raised.value)


@pytest.mark.parametrize("error", TRANSIENT)
def test_a_transient_error_is_reraised_as_a_retryable_job_error_with_its_cause(error):
    with pytest.raises(RetryableJobError) as raised, translated_db_errors():
        raise error
    assert raised.value.__cause__ is error


@pytest.mark.parametrize("error", NEITHER + NOT_DATABASE)
def test_any_other_error_passes_through_unchanged(error):
    with pytest.raises(type(error)) as raised, translated_db_errors():
        raise error
    assert raised.value is error


def test_the_translated_message_names_the_error_class_the_sqlstate_and_the_first_line():
    error = pg_errors.LockNotAvailable("canceling statement due to lock timeout\nCONTEXT: while locking tuple")
    with pytest.raises(RetryableJobError) as raised, translated_db_errors():
        raise error
    assert str(raised.value) == "LockNotAvailable[55P03]: canceling statement due to lock timeout"


def test_a_translated_error_without_sqlstate_or_message_is_still_described():
    with pytest.raises(InfrastructureUnavailable) as raised, translated_db_errors():
        raise psycopg.OperationalError()
    assert str(raised.value) == "OperationalError: OperationalError"


def test_a_block_that_raises_nothing_is_left_alone():
    with translated_db_errors():
        value = 1 + 1
    assert value == 2
