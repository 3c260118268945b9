"""The outbox's named queries, loaded once from queries.sql."""

from pathlib import Path

from outbox.named_sql import load_named_queries

QUERIES = load_named_queries(Path(__file__).with_name("queries.sql"))
