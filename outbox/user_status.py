"""The words a person watching a job sees, mapped from the engine's statuses in one place.

Operators keep the engine's states (pending, published, running, retrying, done, dead,
superseded, cancelled); a person who started a job sees fewer, plainer ones. Every kind uses
this mapping; a kind whose users say something else (an export "completed", an analysis
"succeeded") names its dialect here, never in its own code. "expired" and "deleted" are not
statuses: a job whose status is gone answers a 404 problem that says which.
"""

from __future__ import annotations

from enum import StrEnum

from outbox.status import JobStatus


class UserStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_PLAIN = {
    JobStatus.PENDING: UserStatus.QUEUED,
    JobStatus.PUBLISHED: UserStatus.QUEUED,
    # A retry is still the same job running, on its next attempt (the attempt number says so).
    JobStatus.RUNNING: UserStatus.RUNNING,
    JobStatus.RETRYING: UserStatus.RUNNING,
    JobStatus.DONE: UserStatus.DONE,
    JobStatus.DEAD: UserStatus.FAILED,
    JobStatus.CANCELLED: UserStatus.CANCELLED,
    # Only coalesced (unwatched) jobs are superseded; their successor did the work.
    JobStatus.SUPERSEDED: UserStatus.DONE,
}

#: Kinds whose users name the statuses otherwise: dialect -> plain status -> their word.
DIALECTS: dict[str, dict[UserStatus, str]] = {
    "export": {UserStatus.QUEUED: "processing", UserStatus.RUNNING: "processing", UserStatus.DONE: "completed",
               UserStatus.FAILED: "failed", UserStatus.CANCELLED: "cancelled"},
    "analysis": {UserStatus.QUEUED: "queued", UserStatus.RUNNING: "running", UserStatus.DONE: "succeeded",
                 UserStatus.FAILED: "failed", UserStatus.CANCELLED: "cancelled"},
}

#: What a watcher may still expect: a job in one of these will change again.
LIVE = frozenset({UserStatus.QUEUED, UserStatus.RUNNING})


def user_status(status: JobStatus | str) -> UserStatus:
    return _PLAIN[JobStatus(status)]


def in_dialect(status: JobStatus | str, dialect: str | None = None) -> str:
    """The status in a kind's own words (the plain words when it has no dialect)."""
    plain = user_status(status)
    return DIALECTS[dialect][plain] if dialect is not None else plain.value
