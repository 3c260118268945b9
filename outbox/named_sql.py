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


def load_named_queries(path: Path) -> Mapping[str, str]:
    text = path.read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{path}: query {name!r} is defined twice")
        statement = body.strip()
        if not statement:
            raise ValueError(f"{path}: query {name!r} is empty")
        queries[name] = statement
    return MappingProxyType(queries)
