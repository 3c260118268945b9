"""Alembic migrations for recalq; `recalq migrate` or `alembic upgrade head` applies them."""
