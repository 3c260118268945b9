"""Celery configuration derived from Settings. Every choice here is a reliability decision:

- JSON only (a pickle message is refused, never executed);
- acks_late + reject_on_worker_lost + prefetch 1: a message is acknowledged only after its
  job's outcome is in Postgres, and a killed worker's message goes back to the queue;
- cancel long-running tasks on connection loss, so a redelivered message never runs beside
  the original (Postgres fences it anyway);
- publisher confirms on RabbitMQ, and bounded timeouts so a hung broker cannot hang the relay;
- the Redis visibility timeout far above the longest countdown plus the hard time limit;
- a beat schedule in UTC whose tasks are short (batched), time-limited, keep no results and
  expire when the next run of the same entry would make them pointless.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from recalq.settings import Settings

#: The maintenance tasks beat sends, under the names tasks/maintenance.py registers them.
from tasks.maintenance import DRIFT_SWEEP_TASK, MAINTENANCE_TASKS, PRUNE_TASK, RESCUE_TASK, ROLLOVER_TASK

__all__ = ["DRIFT_SWEEP_TASK", "MAINTENANCE_TASKS", "PRUNE_TASK", "RESCUE_TASK", "ROLLOVER_TASK",
           "beat_schedule", "celery_config"]

RETRY_COUNTDOWN_CAP_SECONDS = 600.0
REDIS_VISIBILITY_TIMEOUT_SECONDS = 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    timeout = settings.broker_timeout_seconds
    if settings.broker_is_rabbitmq:
        transport_options: dict[str, Any] = {
            "confirm_publish": True,
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "write_timeout": timeout,
        }
    else:
        transport_options = {
            "visibility_timeout": REDIS_VISIBILITY_TIMEOUT_SECONDS,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_timeout": timeout,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "task_ignore_result": True,
        "task_default_queue": settings.queue,
        "task_create_missing_queues": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_send_task_events": True,
        "task_send_sent_event": settings.task_sent_events,
        "worker_concurrency": settings.worker_concurrency,
        "timezone": "UTC",
        "enable_utc": True,
        "task_annotations": {
            name: {
                "time_limit": settings.maintenance_time_limit_seconds,
                "soft_time_limit": 0.9 * settings.maintenance_time_limit_seconds,
            }
            for name in MAINTENANCE_TASKS
        },
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """What `celery -A recalq.celery_app beat` sends, in UTC (the app's timezone; crontabs follow it).

    Every task is idempotent, so two beats, or a rerun by hand, do no harm. `expires` drops a
    message that waited in the queue past the point where the next run supersedes it, so a
    worker outage does not end in a pile of identical maintenance tasks.
    """
    rescue_every = settings.rescue_interval_seconds
    return {
        "expiry-rollover": {
            "task": ROLLOVER_TASK,
            "schedule": crontab(minute=5, hour=settings.rollover_hour_utc),
            "options": {"expires": 12 * 3600},
        },
        "rescue": {
            "task": RESCUE_TASK,
            "schedule": timedelta(seconds=rescue_every),
            # At least a minute: clocks of beat and worker hosts may disagree by some seconds.
            "options": {"expires": max(2 * rescue_every, 60.0)},
        },
        "prune": {
            "task": PRUNE_TASK,
            "schedule": crontab(minute=35),
            "options": {"expires": 3600},
        },
        "drift-sweep": {
            "task": DRIFT_SWEEP_TASK,
            "schedule": crontab(minute=0, hour=settings.drift_sweep_hour_utc),
            "options": {"expires": 12 * 3600},
        },
    }
