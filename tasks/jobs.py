"""The one Celery adapter for every job kind: decode a delivery, hand it to the kind's runner,
map the outcome back to Celery.

Retries use the countdown the runner chose and recorded in Postgres, and Postgres decides when a
job is DEAD, so Celery's own retry counter is unbounded (max_retries=None). A DEAD job raises
JobFailed, declared in `throws`: Celery records a FAILURE with the reason (Flower's Failed list
matches the database) and logs it without a traceback, since nothing unexpected happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from celery import Celery, Task

from outbox.outcomes import Cancelled, Completed, Dead, Dropped, Outcome, RetryLater
from tasks.errors import JobFailed


class RunsJobs(Protocol):
    def run(
        self,
        job_id: int,
        *,
        redelivered: bool = False,
        resume_attempt: int | None = None,
        infra_failures: int = 0,
        worker: str | None = None,
    ) -> Any: ...


#: Builds a task's summary of the handler's result (what Flower shows as the task's result).
Summarise = Callable[[Any], dict[str, Any]]


def _plain_summary(result: Any) -> dict[str, Any]:
    return {"outcome": "completed", "result": result if isinstance(result, (dict, str, int, float)) else None}


def register_job_task(
    app: Celery,
    name: str,
    runner: Callable[[], RunsJobs],
    summarise: Summarise = _plain_summary,
) -> Task:
    """Registers the task `name` on `app`; `runner` gives the kind's runner in the process that
    runs the task (built lazily, after a prefork worker forked)."""

    @app.task(
        bind=True,
        name=name,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
        throws=(JobFailed,),
        shared=False,
    )
    def run_job(
        self: Task,
        job_id: int,
        payload: dict[str, Any] | None = None,
        resume_attempt: int | None = None,
        infra_failures: int = 0,
    ) -> dict[str, Any]:
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        outcome = runner().run(
            job_id,
            redelivered=redelivered,
            resume_attempt=resume_attempt,
            infra_failures=infra_failures,
            worker=self.request.hostname,
        )
        if isinstance(outcome, RetryLater):
            raise self.retry(
                countdown=outcome.delay_seconds,
                kwargs={
                    "job_id": job_id,
                    "payload": payload,
                    "resume_attempt": outcome.resume_attempt,
                    "infra_failures": infra_failures + 1 if outcome.infrastructure else 0,
                },
            )
        if isinstance(outcome, Dead):
            raise JobFailed(job_id, outcome.reason)
        return _summary(outcome, summarise)

    return run_job


def _summary(outcome: Outcome | Any, summarise: Summarise) -> dict[str, Any]:
    if isinstance(outcome, Dropped):
        return {"outcome": "dropped", "reason": outcome.reason}
    if isinstance(outcome, Cancelled):
        return {"outcome": "cancelled", "attempt": outcome.attempt}
    if isinstance(outcome, Completed):
        return summarise(outcome.result)
    return summarise(outcome)  # a runner that answers its kind's own result for a completed job
