"""Errors the tasks raise to Celery. One root: `TaskError`."""

from __future__ import annotations


class TaskError(Exception):
    """A task ended in a way Celery should record as a failure."""


class JobFailed(TaskError):
    """The job is DEAD in Postgres; raised so Celery (and Flower) record the task as FAILURE
    with the reason, instead of a SUCCESS that hides a dead job. Postgres already holds the
    truth: the message is acknowledged, never retried by Celery."""

    def __init__(self, job_id: int, reason: str) -> None:
        super().__init__(f"job {job_id} is DEAD: {reason}")
        self.job_id = job_id
        self.reason = reason
