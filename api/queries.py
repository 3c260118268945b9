"""The API's own named queries: every file in api/sql/, one namespace."""

from pathlib import Path

from outbox.named_sql import load_named_query_dir

QUERIES = load_named_query_dir(Path(__file__).parent / "sql")
