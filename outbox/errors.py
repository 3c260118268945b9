"""Errors the outbox raises, and the ones a job's handler raises to tell the runner what a
failure means. One root, so callers can catch `OutboxError`.

    OutboxError
     +-- InvalidEnqueue             the database refused an enqueue (names the rule broken)
     +-- EnqueueRefused             a unique_active task refused a submission; nothing was written
     |    +-- ActiveJobExists       the key already has an active job (`active_job_id`)
     |    +-- CoolingDown           the key's last job finished less than the cooldown ago
     +-- PublishFailed              the broker did not take (all of) a batch
     +-- JobError                   raised inside a job's attempt; the runner sorts it:
          +-- PermanentJobError         retrying cannot help: the job is DEAD at once
          +-- InfrastructureUnavailable the database is unreachable: retried, never counted
          +-- RetryableJobError         a counted, retried attempt with the handler's reason
          +-- FencedOut                 the attempt lost its job (taken over, finished): stop
          +-- JobCancelled              its owner asked it to stop: it ends cancelled at this unit

Any other exception from a handler is a counted attempt too, retried with backoff until the
job's attempts run out (G5): a bug or a flaky dependency is treated like any failure, and the
job ends DEAD, visible and requeueable, after its last attempt.
"""

from __future__ import annotations

from collections.abc import Sequence


class OutboxError(Exception):
    """An outbox operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidEnqueue(OutboxError):
    """The enqueue request broke a rule of the outbox contract."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint


class EnqueueRefused(OutboxError):
    """The task's policy refused the submission; the caller's transaction is intact."""


class ActiveJobExists(EnqueueRefused):
    """The key already has an active job: one at a time."""

    def __init__(self, coalescing_key: str, active_job_id: int) -> None:
        super().__init__(f"key {coalescing_key!r} already has active job {active_job_id}")
        self.coalescing_key = coalescing_key
        self.active_job_id = active_job_id


class CoolingDown(EnqueueRefused):
    """The key's previous job finished less than the task's cooldown ago."""

    def __init__(self, coalescing_key: str, retry_after_seconds: float) -> None:
        super().__init__(f"key {coalescing_key!r} is cooling down for another {retry_after_seconds:.1f}s")
        self.coalescing_key = coalescing_key
        self.retry_after_seconds = retry_after_seconds


class PublishFailed(OutboxError):
    """The broker did not accept every message of a batch."""

    def __init__(self, message: str, published: Sequence[int] = ()) -> None:
        super().__init__(message)
        #: Job ids that did reach the broker before the failure.
        self.published = tuple(published)


class JobError(OutboxError):
    """A job's attempt failed."""


class PermanentJobError(JobError):
    """Retrying cannot help (the job's subject does not exist, its payload is malformed): the
    job goes DEAD at once with this reason. A package's own errors may inherit it as well."""


class InfrastructureUnavailable(JobError):
    """The database could not be reached; the attempt is retried and not counted."""


class RetryableJobError(JobError):
    """The attempt failed for a reason that may clear (contention, a provider's 500); it counts
    and is retried with backoff."""


class FencedOut(JobError):
    """The attempt no longer holds its job (taken over, or finished): its work must roll back."""


class JobCancelled(JobError):
    """The job's cancel was requested; the attempt stops at this unit boundary."""
