"""Applies the Alembic migrations, then the task policy from settings.

Configured in code (no alembic.ini needed), so an installed recalq migrates from anywhere.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql

import migrations
from recalq.settings import RABBITMQ_CONSUMER_TIMEOUT_SECONDS, Settings
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
    """Applies the deployment's settings to the recalculation task's policy row: attempts
    (RECALQ_MAX_ATTEMPTS), the minimum interval between runs of one property
    (RECALQ_RECALC_MIN_INTERVAL_SECONDS), the attempt lease (RECALQ_JOB_LEASE_SECONDS) and the
    Celery time limits (RECALQ_TASK_TIME_LIMIT, RECALQ_TASK_SOFT_TIME_LIMIT). Every other job
    kind's policy is the row its own migration registers.

    A database migrated to an older revision (`recalq migrate --revision`) lacks the newer
    columns; its policy is what that revision knew.
    """
    with psycopg.connect(settings.conninfo) as conn:
        columns = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'outbox_task'"
        )}
        policy: dict[str, object] = {"max_attempts": settings.max_attempts}
        if "min_interval" in columns:
            policy["min_interval"] = timedelta(seconds=settings.recalc_min_interval_seconds)
        if "lease_seconds" in columns:
            policy |= {
                "lease_seconds": settings.job_lease_seconds,
                "time_limit_seconds": settings.task_time_limit,
                "soft_time_limit_seconds": settings.task_soft_time_limit,
            }
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name)) for name in policy
        )
        conn.execute(
            sql.SQL("UPDATE outbox_task SET {} WHERE name = {}").format(assignments, sql.Placeholder("task")),
            {**policy, "task": RECALCULATE_TASK},
        )
        if "time_limit_seconds" in columns:
            _check_time_limits(conn, settings)


def _check_time_limits(conn: psycopg.Connection, settings: Settings) -> None:
    """A late-acked message waits out its retry countdown and then its run unacknowledged; past
    RabbitMQ's consumer_timeout the broker closes the channel and the message runs twice."""
    room = RABBITMQ_CONSUMER_TIMEOUT_SECONDS - settings.longest_retry_countdown
    too_long = [row[0] for row in conn.execute(
        "SELECT name FROM outbox_task WHERE time_limit_seconds >= %s ORDER BY name", [room]
    )]
    if too_long:
        raise ValueError(
            f"task(s) {', '.join(too_long)} have a time limit of {room:g} s or more: with the longest retry "
            f"countdown ({settings.longest_retry_countdown:g} s) it would outlive RabbitMQ's consumer_timeout "
            f"({RABBITMQ_CONSUMER_TIMEOUT_SECONDS:g} s); lower outbox_task.time_limit_seconds or "
            "RECALQ_RETRY_MAX_SECONDS"
        )
