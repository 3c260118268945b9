"""The celery beat schedule: in UTC whatever the host's zone, every entry a task the worker
really registers, and maintenance tasks that cannot hold the recalculation queue for long."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from pydantic import ValidationError

from recalq.bootstrap import Runtime
from recalq.celery_config import MAINTENANCE_TASKS
from recalq.settings import Settings

PG = "postgresql://app@db.example:5432/recalq"
REDIS = "redis://cache.example:6379/0"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("RECALQ_") or name.upper() in {"DATABASE_URL", "BROKER_URL"}:
            monkeypatch.delenv(name)


def worker_app(**overrides) -> Celery:
    """The app a worker runs, with the task modules it imports loaded (no broker is contacted)."""
    app = Runtime(Settings(database_url=PG, broker_url=REDIS, **overrides)).celery_app
    app.loader.import_default_modules()
    return app


def entry(app: Celery, name: str, now: datetime | None = None) -> ScheduleEntry:
    """The entry as beat builds it (bound to the app, so it takes the app's timezone)."""
    bound = ScheduleEntry(name=name, app=app, **app.conf.beat_schedule[name])
    if now is not None:
        bound.schedule.nowfun = lambda: now
    return bound


def at(hour: int, minute: int, day: int = 1) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def test_every_beat_entry_names_a_task_the_worker_registers_and_every_maintenance_task_is_scheduled() -> None:
    app = worker_app()
    scheduled = {e["task"] for e in app.conf.beat_schedule.values()}
    assert scheduled <= set(app.tasks)
    assert scheduled == set(MAINTENANCE_TASKS)


def test_the_schedule_is_in_utc() -> None:
    app = worker_app()
    assert (app.conf.timezone, app.conf.enable_utc) == ("UTC", True)
    for name in app.conf.beat_schedule:
        assert entry(app, name).schedule.tz.utcoffset(datetime(2026, 7, 1, 12, 0)) == timedelta(0), name  # summer


def test_the_rollover_runs_nightly_at_five_past_the_configured_utc_hour() -> None:
    default = entry(worker_app(), "expiry-rollover", now=at(23, 0))
    assert default.schedule.remaining_estimate(at(0, 5)) == timedelta(hours=1, minutes=5)  # 00:05 UTC tomorrow

    late = entry(worker_app(rollover_hour_utc=2), "expiry-rollover", now=at(1, 0, day=2))
    assert late.schedule.remaining_estimate(at(2, 5)) == timedelta(hours=1, minutes=5)  # 02:05 UTC


def test_the_drift_sweep_runs_nightly_at_its_utc_hour_and_pruning_hourly() -> None:
    sweep = entry(worker_app(drift_sweep_hour_utc=4), "drift-sweep", now=at(3, 30, day=2))
    assert sweep.schedule.remaining_estimate(at(4, 0)) == timedelta(minutes=30)  # 04:00 UTC

    prune = entry(worker_app(), "prune", now=at(10, 40))
    assert prune.schedule.remaining_estimate(at(10, 35)) == timedelta(minutes=55)  # 11:35


def test_rescue_runs_every_rescue_interval_and_a_stale_tick_expires_instead_of_piling_up() -> None:
    app = worker_app(rescue_interval_seconds=45)
    rescue = app.conf.beat_schedule["rescue"]
    assert entry(app, "rescue").schedule.run_every == timedelta(seconds=45)
    assert rescue["options"]["expires"] == 90
    for name, scheduled in app.conf.beat_schedule.items():
        assert scheduled["options"]["expires"] > 0, name


def test_maintenance_tasks_keep_no_results_are_time_limited_and_travel_on_the_recalculation_queue() -> None:
    app = worker_app(maintenance_time_limit_seconds=300, queue="ops-test")
    for name in MAINTENANCE_TASKS:
        task = app.tasks[name]
        assert task.ignore_result, name
        assert (task.time_limit, task.soft_time_limit) == (300, 270), name
        assert app.amqp.router.route({}, name)["queue"].name == "ops-test", name


def test_a_maintenance_task_is_acked_late_but_not_redelivered_when_its_child_dies() -> None:
    """A task that kills its child every time (say, out of memory) must not loop: the next
    tick reruns it. A worker that stops mid-task still hands the message back (late ack)."""
    app = worker_app()
    for name in MAINTENANCE_TASKS:
        assert (app.tasks[name].acks_late, app.tasks[name].reject_on_worker_lost) == (True, False), name
    assert app.tasks["compliance.recalculate_property"].reject_on_worker_lost  # Postgres counts those


def test_a_maintenance_time_limit_beyond_rabbitmqs_consumer_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="maintenance_time_limit_seconds"):
        Settings(database_url=PG, broker_url=REDIS, maintenance_time_limit_seconds=1800)


@pytest.mark.parametrize(("field", "value"), [("rollover_hour_utc", 24), ("drift_sweep_hour_utc", -1),
                                              ("prune_after_days", 0), ("drift_sweep_batch_size", 0)])
def test_schedule_settings_out_of_range_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(database_url=PG, broker_url=REDIS, **{field: value})


def test_the_schedule_knobs_have_their_documented_defaults() -> None:
    s = Settings()
    assert (s.rollover_hour_utc, s.drift_sweep_hour_utc, s.drift_sweep_batch_size) == (0, 3, 500)
    assert (s.prune_after_days, s.maintenance_time_limit_seconds) == (14.0, 600.0)
