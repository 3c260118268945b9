"""A second job kind that exists only in the tests: proof that a new kind is a handler, a task
name and an outbox_task row, run by the same runner, adapter and relay as the recalculation.

`celery -A tests.harness.toy_kind worker -Q <queue>` runs it: the composition root's Runtime
with one more entry in `job_kinds`. Its payload scripts what an attempt does:
  {"seconds": s}                 work for s seconds (every attempt)
  {"seconds_first_attempt": s}   work for s seconds on attempt 1 only, then finish at once
  {"heartbeat": true}            extend the lease while working (the handler's duty)
  {"fail_attempts": n}           raise a plain exception on the first n attempts
"""

from __future__ import annotations

import time
import uuid
from functools import cache
from typing import Any

import psycopg

from outbox import watched
from outbox.backoff import RetryPolicy
from outbox.runner import Attempt, DeadJob, Handler, JobRunner, RunnerPolicy
from outbox.watched import Stage, register_watched_task
from recalq.bootstrap import Runtime
from recalq.settings import Settings

TOY_TASK = "test.toy_job"


class ToyHandler:
    def run(self, attempt: Attempt) -> dict[str, Any]:
        payload = attempt.payload
        seconds = float(payload.get("seconds", 0))
        if attempt.attempt == 1:
            seconds = float(payload.get("seconds_first_attempt", seconds))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # the job's own work: time passing, in small units
            if payload.get("heartbeat"):
                attempt.heartbeat()
            time.sleep(0.05)
        if attempt.attempt <= int(payload.get("fail_attempts", 0)):
            raise RuntimeError(f"toy failure on attempt {attempt.attempt}")
        return {"worked_seconds": seconds, "attempt": attempt.attempt}

    def on_dead(self, conn: psycopg.Connection, job: DeadJob) -> None:
        """A toy has no domain row to mark."""


class ToyRuntime(Runtime):
    def job_kinds(self) -> dict[str, Handler]:
        return {**super().job_kinds(), TOY_TASK: ToyHandler(), WATCHED_TASK: WatchedToyHandler()}


@cache
def _runtime() -> ToyRuntime:
    return ToyRuntime(Settings())


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        return _runtime().celery_app
    raise AttributeError(f"module 'tests.harness.toy_kind' has no attribute {name!r}")


WATCHED_TASK = "test.toy_watched"
WATCHED_STAGES = [Stage("prepare", "Preparing"), Stage("work", "Working through the items"),
                  Stage("finish", "Saving your results")]


def register_watched_toy(conn: psycopg.Connection, **policy: Any) -> None:
    """The watched toy's outbox_task row (cancellable, mode none unless told otherwise)."""
    register_watched_task(conn, name=WATCHED_TASK, description="a watched toy job (tests only)",
                          stages=WATCHED_STAGES, **policy)


class WatchedToyHandler:
    """A watched job of `units` units ({"units": n} in the payload), each a transaction that
    records the unit in toy_unit (so a test counts how often each one ran) with its checkpoint.
    Payload scripts: {"fail_at_unit": k, "fail_attempts": n} fails unit k on the first n
    attempts; {"unit_seconds": s} paces each unit. `hook(attempt, unit)` runs before each unit
    (a test's Event to wait on, a kill, a cancel)."""

    watched = True

    def __init__(self, hook: Any = None) -> None:
        self.hook = hook

    def run(self, attempt: Attempt) -> dict[str, Any]:
        payload = attempt.payload
        units = int(payload.get("units", 3))
        attempt.progress(stage="prepare", message="getting ready")
        attempt.progress(stage="work", current=attempt.cursor or 0, total=units)
        for unit in range(attempt.cursor or 0, units):
            if self.hook is not None:
                self.hook(attempt, unit)
            attempt.heartbeat()  # the handler's duty on a long job: its lease outlives each unit
            with attempt.unit() as conn:
                if unit == payload.get("fail_at_unit") and attempt.attempt <= int(payload.get("fail_attempts", 1)):
                    raise RuntimeError(f"toy failure at unit {unit}")
                conn.execute("INSERT INTO toy_unit (job_id, unit, attempt) VALUES (%s, %s, %s)",
                             [attempt.job_id, unit, attempt.attempt])
                attempt.checkpoint(conn, unit + 1)
            time.sleep(float(payload.get("unit_seconds", 0)))
            attempt.progress(stage="work", current=unit + 1, total=units, message=f"item {unit + 1} of {units}")
        attempt.progress(stage="finish")
        return {"units": units}

    def on_dead(self, conn: psycopg.Connection, job: DeadJob) -> None:
        """Nothing to mark."""


TOY_UNIT_TABLE = """CREATE TABLE IF NOT EXISTS toy_unit (
    job_id bigint NOT NULL, unit integer NOT NULL, attempt integer NOT NULL, at timestamptz NOT NULL DEFAULT now())"""



#: Retries a test can wait out: a second, then at most five.
TOY_POLICY = RunnerPolicy(retry=RetryPolicy(base_seconds=1, max_seconds=5), infra_retry=RetryPolicy(1, 5),
                          busy_retry_seconds=0.1)


def submit_watched_toy(database_url: str, owner_id: int | str, **payload: Any) -> int:
    """A watched toy job for client `owner_id`, committed on its own connection; its id."""
    with psycopg.connect(database_url) as conn:
        return watched.submit(conn, task=WATCHED_TASK, coalescing_key=f"toy:{uuid.uuid4().hex}", payload=payload,
                              correlation_id=uuid.uuid4().hex, trigger_reason="test", actor_type="client",
                              actor_id=str(owner_id)).job_id


def run_watched_toy(database_url: str, job_id: int, hook: Any = None) -> Any:
    """One attempt of the watched toy in this process, as a worker would run it."""
    return JobRunner(handler=WatchedToyHandler(hook), connection=lambda: psycopg.connect(database_url),
                     policy=TOY_POLICY).run(job_id)
