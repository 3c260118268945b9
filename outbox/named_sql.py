"""Loads named queries from a .sql file, so SQL that matters is read as SQL.

Format: each query starts with a line `-- name: <name>`; the comment lines right after it
describe the query; the rest, up to the next `-- name:`, is the statement.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
#: Any line that looks like a name line. One that _NAME does not accept would otherwise be read
#: as a comment inside the previous query, and its query would silently not exist.
_NAME_LIKE = re.compile(r"^--\s*name\s*:.*$", re.MULTILINE | re.IGNORECASE)


def load_named_queries(path: Path) -> Mapping[str, str]:
    text = path.read_text(encoding="utf-8")
    parts = _NAME.split(text)
    for chunk in parts[0::2]:
        if malformed := _NAME_LIKE.search(chunk):
            raise ValueError(f"{path}: malformed name line {malformed.group(0)!r}; use '-- name: <snake_case>'")
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{path}: query {name!r} is defined twice")
        statement = body.strip()
        if not _has_sql(statement):
            raise ValueError(f"{path}: query {name!r} is empty")
        queries[name] = statement
    return MappingProxyType(queries)


def _has_sql(statement: str) -> bool:
    """A description with no statement under it is still an empty query."""
    return any(line.strip() and not line.lstrip().startswith("--") for line in statement.splitlines())


def load_named_query_dir(directory: Path) -> Mapping[str, str]:
    """Every `*.sql` file of a directory as one namespace: a package keeps its queries in files
    by topic but looks them up in one place, and a name defined in two files is an error."""
    merged: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for path in sorted(directory.glob("*.sql")):
        for name, statement in load_named_queries(path).items():
            if name in merged:
                raise ValueError(f"query {name!r} is defined in both {origin[name]} and {path}")
            merged[name] = statement
            origin[name] = path
    return MappingProxyType(merged)
