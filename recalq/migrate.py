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
from services.vocabulary import RECALCULATE_TASK


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
    """Makes RECALQ_MAX_ATTEMPTS the attempt limit of every registered task, and
    RECALQ_RECALC_MIN_INTERVAL_SECONDS the recalculation task's minimum interval between runs
    of one property.

    A database migrated to an older revision (`recalq migrate --revision`) has no min_interval
    column yet; its policy is what that revision knew.
    """
    with psycopg.connect(settings.conninfo) as conn:
        conn.execute("UPDATE outbox_task SET max_attempts = %s", [settings.max_attempts])
        has_min_interval = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'outbox_task' AND column_name = 'min_interval')"
        ).fetchone()[0]
        if has_min_interval:
            conn.execute(
                "UPDATE outbox_task SET min_interval = make_interval(secs => %s) WHERE name = %s",
                [settings.recalc_min_interval_seconds, RECALCULATE_TASK],
            )
