"""The recalculation's task: the generic job adapter under its task name, with a summary that
says what was applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task

from services.recalculation import Applied
from services.vocabulary import RECALCULATE_TASK
from tasks.jobs import RunsJobs, register_job_task


def _summary(result: Any) -> dict[str, Any]:
    if isinstance(result, Applied):
        return {"outcome": "applied", "property_id": result.property_id, "score": result.score,
                "drift_detected": result.drift_detected}
    return {"outcome": "completed"}


def register(app: Celery, runner: Callable[[], RunsJobs]) -> Task:
    return register_job_task(app, RECALCULATE_TASK, runner, _summary)
