"""Reads the pinned SQL files (functions, views) that revisions apply.

A revision names the exact file version it installs, so replaying history always installs
what that revision shipped, even after a newer version of the object exists.
"""

from pathlib import Path

_ROOT = Path(__file__).parent


def pinned_sql(relative_path: str) -> str:
    return (_ROOT / relative_path).read_text(encoding="utf-8")
