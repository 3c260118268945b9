"""The Celery face of `services.recalculation`: decode, delegate, map the outcome.

Retries use the countdown the service chose and recorded in Postgres: only named transient
errors count as attempts, infrastructure errors and busy keys do not, and Postgres decides
when a job is DEAD. Celery's own retry counter is therefore unbounded (max_retries=None).
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from services.recalculation import Applied, Dead, Dropped, Outcome, RetryLater

RECALCULATE_TASK = "compliance.recalculate_property"


@shared_task(
    bind=True,
    name=RECALCULATE_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
    ignore_result=True,
)
def recalculate_property(
    self: Task,
    job_id: int,
    payload: dict[str, Any] | None = None,
    resume_attempt: int | None = None,
    infra_failures: int = 0,
) -> dict[str, Any]:
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    outcome: Outcome = self.app.recalq.recalculator.run(
        job_id,
        redelivered=redelivered,
        resume_attempt=resume_attempt,
        infra_failures=infra_failures,
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
    return _summary(outcome)


def _summary(outcome: Applied | Dropped | Dead) -> dict[str, Any]:
    if isinstance(outcome, Applied):
        return {"outcome": "applied", "property_id": outcome.property_id, "score": outcome.score,
                "drift_detected": outcome.drift_detected}
    if isinstance(outcome, Dead):
        return {"outcome": "dead", "reason": outcome.reason}
    return {"outcome": "dropped", "reason": outcome.reason}
