"""Named SQL files: the loader's format rules, and that the project's own files and the names
the code looks up in them agree (a missing name would only fail when that code path runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox.named_sql import load_named_queries, load_named_query_dir

ROOT = Path(__file__).resolve().parents[2]
QUERY_FILES = {
    "outbox.queries": [ROOT / "outbox" / "queries.sql"],
    "services.queries": sorted((ROOT / "services" / "sql").glob("*.sql")),
    "api.queries": sorted((ROOT / "api" / "sql").glob("*.sql")),
}
SOURCE_PACKAGES = ("outbox", "services", "recalq", "tasks", "api")
_LOOKUP = re.compile(r"""QUERIES\[\s*["']([^"']+)["']\s*\]""")
_IMPORT = re.compile(r"^from (\w+\.queries) import QUERIES\b", re.MULTILINE)
_PLACEHOLDER = re.compile(r"%\([a-z_][a-z0-9_]*\)s|%%")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "queries.sql"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_name_line_starts_a_query_that_runs_to_the_next_one(tmp_path):
    path = write(tmp_path, (
        "-- A preamble that belongs to no query.\n"
        "\n"
        "-- name: first_query\n"
        "-- Its description stays with the statement.\n"
        "SELECT 1\n"
        "  FROM t\n"
        "\n"
        "-- name: second_query\n"
        "UPDATE t SET x = %(x)s;   \n"
        "\n\n"
    ))
    queries = load_named_queries(path)
    assert dict(queries) == {
        "first_query": "-- Its description stays with the statement.\nSELECT 1\n  FROM t",
        "second_query": "UPDATE t SET x = %(x)s;",
    }


def test_the_loaded_queries_cannot_be_changed_by_their_users(tmp_path):
    queries = load_named_queries(write(tmp_path, "-- name: q\nSELECT 1\n"))
    with pytest.raises(TypeError):
        queries["q"] = "DROP TABLE t"  # type: ignore[index]


def test_a_file_without_name_lines_has_no_queries(tmp_path):
    assert dict(load_named_queries(write(tmp_path, "-- just a comment\nSELECT 1\n"))) == {}


def test_the_file_is_read_as_utf8(tmp_path):
    queries = load_named_queries(write(tmp_path, "-- name: q\nSELECT 'Ünïcødé €'\n"))
    assert queries["q"] == "SELECT 'Ünïcødé €'"


def test_a_name_defined_twice_is_refused_with_the_file_and_the_name(tmp_path):
    path = write(tmp_path, "-- name: q\nSELECT 1\n-- name: other\nSELECT 2\n-- name: q\nSELECT 3\n")
    with pytest.raises(ValueError, match=r"'q' is defined twice") as raised:
        load_named_queries(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("-- name: q\n-- name: r\nSELECT 1\n", id="followed-by-a-name"),
        pytest.param("-- name: r\nSELECT 1\n-- name: q\n", id="at-the-end"),
        pytest.param("-- name: r\nSELECT 1\n-- name: q\n  \n\t\n\n", id="only-whitespace"),
        pytest.param("-- name: q\n-- Describes a statement nobody wrote.\n\n-- name: r\nSELECT 1\n",
                     id="only-a-description"),
    ],
)
def test_a_query_without_a_statement_is_refused(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=r"'q' is empty") as raised:
        load_named_queries(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("-- name: Second", id="capital-letter"),
        pytest.param("-- name: second-query", id="hyphen"),
        pytest.param("-- name:second", id="no-space"),
        pytest.param("--  name: second", id="two-spaces"),
        pytest.param("-- name: second extra", id="trailing-word"),
        pytest.param("-- name:", id="no-name"),
    ],
)
def test_a_malformed_name_line_is_refused_instead_of_joining_the_previous_query(tmp_path, line):
    path = write(tmp_path, f"-- name: first\nSELECT 1\n\n{line}\nSELECT 2\n")
    with pytest.raises(ValueError, match="malformed name line") as raised:
        load_named_queries(path)
    assert str(path) in str(raised.value)


def test_a_malformed_name_line_before_the_first_query_is_refused(tmp_path):
    with pytest.raises(ValueError, match="malformed name line"):
        load_named_queries(write(tmp_path, "-- name: First\nSELECT 1\n-- name: second\nSELECT 2\n"))


# -- the project's own query files ---------------------------------------------------------

PROJECT_FILES = [path for paths in QUERY_FILES.values() for path in paths]


def _loaded(module: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for path in QUERY_FILES[module]:
        merged.update(load_named_queries(path))
    return merged


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_project_query_file_loads_with_at_least_one_query(path):
    assert len(load_named_queries(path)) > 0


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_percent_sign_in_a_project_query_is_a_named_placeholder(path):
    # psycopg reads every % of a statement, comments included, as the start of a placeholder.
    for name, statement in load_named_queries(path).items():
        stray = _PLACEHOLDER.sub("", statement)
        assert "%" not in stray, f"{path.name}: query {name!r} has a % that is not %(name)s or %%"


def test_a_query_directory_refuses_a_name_defined_in_two_files(tmp_path):
    (tmp_path / "a.sql").write_text("-- name: same\nSELECT 1\n", encoding="utf-8")
    (tmp_path / "b.sql").write_text("-- name: same\nSELECT 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="defined in both"):
        load_named_query_dir(tmp_path)


def _lookups() -> list[tuple[str, str, str]]:
    """(source file, queries module it imports, name) for every QUERIES["..."] in the code."""
    found = []
    for package in SOURCE_PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            text = source.read_text(encoding="utf-8")
            names = _LOOKUP.findall(text)
            if not names:
                continue
            modules = _IMPORT.findall(text)
            relative = str(source.relative_to(ROOT))
            assert len(modules) == 1, f"{relative} looks up QUERIES but imports {modules or 'no queries module'}"
            found.extend((relative, modules[0], name) for name in names)
    return found


def test_every_query_name_the_code_looks_up_exists_in_the_file_it_imports():
    lookups = _lookups()
    loaded = {module: _loaded(module) for module in QUERY_FILES}
    # The scan sees both query modules in use; an empty scan would prove nothing.
    assert {module for _, module, _ in lookups} == set(QUERY_FILES)
    missing = [
        f"{source}: QUERIES[{name!r}] not in the files of {module}"
        for source, module, name in lookups
        if name not in loaded.get(module, {})
    ]
    assert missing == []


def test_the_query_modules_load_the_files_this_test_checks():
    import outbox.queries
    import services.queries

    assert dict(outbox.queries.QUERIES) == _loaded("outbox.queries")
    assert dict(services.queries.QUERIES) == _loaded("services.queries")
