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
from functools import cache
from typing import Any

import psycopg

from outbox.runner import Attempt, DeadJob, Handler
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
        return {**super().job_kinds(), TOY_TASK: ToyHandler()}


@cache
def _runtime() -> ToyRuntime:
    return ToyRuntime(Settings())


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        return _runtime().celery_app
    raise AttributeError(f"module 'tests.harness.toy_kind' has no attribute {name!r}")
