"""What one delivery of a job came to: the runner's answer to the task that ran it.

The task adapter maps each to Celery: Completed, Cancelled and Dropped acknowledge the message, RetryLater
sends it again after `delay_seconds`, Dead acknowledges it as a failure (so Flower shows what
Postgres already recorded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Completed:
    job_id: int
    attempt: int
    #: What the handler returned: a small summary, or a reference to a domain row.
    result: Any = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """This delivery has nothing to do (the job finished, or another attempt holds it)."""

    job_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class RetryLater:
    job_id: int
    delay_seconds: float
    #: False for infrastructure errors and busy keys: no attempt was spent.
    counted: bool
    #: The attempt to resume on the next delivery (infrastructure errors mid-attempt).
    resume_attempt: int | None
    reason: str
    #: The database was unreachable: the next delay grows with consecutive such failures.
    infrastructure: bool = False


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The job stopped on its owner's request (terminal; acknowledged, never retried)."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Dead:
    job_id: int
    reason: str


Outcome = Completed | Dropped | RetryLater | Dead | Cancelled
