"""Reads the pinned SQL files (functions, views) that revisions apply.

A revision names the exact file version it installs, so replaying history always installs
what that revision shipped, even after a newer version of the object exists.
"""

import re
from pathlib import Path

_ROOT = Path(__file__).parent


def pinned_sql(relative_path: str) -> str:
    return (_ROOT / relative_path).read_text(encoding="utf-8")


def pinned_function(relative_path: str, name: str) -> str:
    """One function of a pinned file, as CREATE OR REPLACE.

    A revision that replaces one function of a file restores exactly that function's pinned
    text on downgrade; re-running the whole file would collide with the functions it did not
    replace. Every pinned function body is quoted with $fn$.
    """
    text = pinned_sql(relative_path)
    found = re.search(
        rf"^CREATE (?:OR REPLACE )?FUNCTION {re.escape(name)}\(.*?\$fn\$.*?\$fn\$;",
        text,
        re.MULTILINE | re.DOTALL,
    )
    if found is None:
        raise LookupError(f"{relative_path} defines no function {name}")
    statement = found.group(0)
    return re.sub(r"^CREATE (?:OR REPLACE )?FUNCTION", "CREATE OR REPLACE FUNCTION", statement, count=1)
