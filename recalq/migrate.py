"""Applies the Alembic migrations, then the task policy from settings.

Configured in code (no alembic.ini needed), so an installed recalq migrates from anywhere.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

import migrations
from recalq.settings import Settings


def alembic_config(sqlalchemy_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["database_url"] = sqlalchemy_url
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings.sqlalchemy_url), revision)
    apply_task_policy(settings)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings.sqlalchemy_url), revision)


def apply_task_policy(settings: Settings) -> None:
    """Makes RECALQ_MAX_ATTEMPTS the attempt limit of every registered task."""
    with psycopg.connect(settings.conninfo) as conn:
        conn.execute("UPDATE outbox_task SET max_attempts = %s", [settings.max_attempts])
