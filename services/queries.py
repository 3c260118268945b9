"""The compliance services' named queries, loaded once from sql/compliance.sql."""

from pathlib import Path

from outbox.named_sql import load_named_queries

QUERIES = load_named_queries(Path(__file__).parent / "sql" / "compliance.sql")
