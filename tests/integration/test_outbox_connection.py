"""outbox.connection runs outbox SQL on the caller's connection as it is, including one in
pipeline mode (the worker sends a transaction's statements together)."""

from __future__ import annotations

import psycopg
import pytest

from outbox.connection import fetch_all, fetch_one


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipeline"])
def test_rows_are_read_and_a_statement_without_rows_gives_none(database_url: str, pipelined: bool) -> None:
    with psycopg.connect(database_url) as conn:
        with conn.pipeline() if pipelined else conn.transaction():
            assert fetch_all(conn, "SELECT g AS n FROM generate_series(1, %(k)s) g", {"k": 2}) == [{"n": 1}, {"n": 2}]
            assert fetch_one(conn, "SELECT 'x' AS v WHERE %(k)s > 0", {"k": 1}) == {"v": "x"}
            assert fetch_one(conn, "SELECT 1 AS v WHERE false", {}) is None
            assert fetch_all(conn, "SET LOCAL work_mem = '4MB'", {}) == []


def test_an_error_in_the_statement_is_raised_not_read_as_no_rows(database_url: str) -> None:
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        fetch_all(conn, "SELECT * FROM no_such_table", {})
