"""Jobs people watch: submitting one, cancelling it, and what its attempt reports.

A watched task (outbox_task.watched) is one whose jobs a person starts and follows: each job
has an owner, a snapshot of its task's stages, a progress row and an append-only event log
whose `seq` numbers every change a watcher can see (migrations/functions/outbox_v6.sql). The
lifecycle transitions write their own events; this module is the Python face of the rest.

Nothing here knows what a job does: stages, results and errors are the handler's words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox.connection import Connectionish, fetch_one
from outbox.enqueue import Enqueued, enqueue
from outbox.errors import FencedOut, OutboxError
from outbox.queries import QUERIES

#: At most one progress event per job this often (a stage change always writes one).
PROGRESS_EVENT_INTERVAL_S = 1.0
#: How often an attempt writes progress to the database at all; calls in between only remember
#: the latest values (a handler may report on every item without flooding anything).
PROGRESS_WRITE_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class Stage:
    """A step of a job, as its watcher is shown it."""

    key: str
    display: str

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "display": self.display}


def owner_of(actor_type: str, actor_id: str | None) -> str:
    """Who may watch a job: the submitting actor, as one string."""
    return f"{actor_type}:{actor_id or ''}"


def submit(
    conn: Connectionish,
    *,
    task: str,
    coalescing_key: str,
    payload: dict[str, Any],
    correlation_id: str,
    trigger_reason: str,
    actor_type: str,
    actor_id: str | None,
) -> Enqueued:
    """Enqueues a job of a watched task in the caller's transaction, owned by the actor, with
    its first event. Raises ActiveJobExists / CoolingDown as `enqueue` does (unique_active)."""
    made = enqueue(conn, task=task, coalescing_key=coalescing_key, payload=payload, correlation_id=correlation_id,
                   trigger_reason=trigger_reason, actor_type=actor_type, actor_id=actor_id)
    if made.created_job:
        fetch_one(conn, QUERIES["watch_job"], {"job_id": made.job_id, "owner": owner_of(actor_type, actor_id)})
    return made


class CancelOutcome(StrEnum):
    #: It had not started: it is cancelled now.
    CANCELLED = "cancelled"
    #: It is running: it stops at its next unit.
    REQUESTED = "requested"
    #: It had already ended; nothing changed.
    FINISHED = "finished"
    #: Its task's policy forbids cancelling (the recalculation).
    NOT_CANCELLABLE = "not_cancellable"
    MISSING = "missing"


def cancel(conn: Connectionish, job_id: int) -> CancelOutcome:
    row = fetch_one(conn, QUERIES["cancel_job"], {"job_id": job_id})
    assert row is not None
    return CancelOutcome(row["outcome"])


class ResumeRefused(OutboxError):
    """The job cannot be resumed as asked; `reason` says why, `active_job_id` names the key's
    active job when that is the reason."""

    def __init__(self, reason: str, active_job_id: int | None = None) -> None:
        super().__init__(reason if active_job_id is None else f"{reason}: job {active_job_id} is active")
        self.reason = reason
        self.active_job_id = active_job_id


def resume(conn: Connectionish, job_id: int, *, correlation_id: str, trigger_reason: str, actor_type: str,
           actor_id: str | None) -> int:
    """A new job carrying on from a failed or cancelled one's checkpoint, with the same lock;
    returns its id. Raises ResumeRefused ('not_resumable', or 'active' with the key's job)."""
    row = fetch_one(conn, QUERIES["resume_job"], {"job_id": job_id, "correlation_id": correlation_id,
                                                 "trigger_reason": trigger_reason, "actor_type": actor_type,
                                                 "actor_id": actor_id})
    assert row is not None
    if row["refusal"] is not None:
        raise ResumeRefused(row["refusal"], row["job_id"])
    return int(row["job_id"])


def forget(conn: Connectionish, job_id: int) -> bool:
    """Deletes a finished watched job for its owner, leaving a tombstone "deleted"; False when
    there is no such finished watched job."""
    row = fetch_one(conn, QUERIES["forget_watched_job"], {"job_id": job_id})
    return bool(row and row["forgotten"])


def register_watched_task(
    conn: psycopg.Connection,
    *,
    name: str,
    description: str,
    stages: list[Stage],
    mode: str = "none",
    cancellable: bool = True,
    queue: str | None = None,
    lease_seconds: float = 120,
    time_limit_seconds: float = 90,
    soft_time_limit_seconds: float = 60,
    heartbeats: bool = False,
    max_attempts: int = 5,
    cooldown_seconds: float = 0,
) -> None:
    """Registers (or updates) a watched task's row; each kind's migration or set-up calls it."""
    conn.execute(
        QUERIES["register_watched_task"],
        {"name": name, "description": description, "stages": Jsonb([s.as_json() for s in stages]), "mode": mode,
         "cancellable": cancellable, "queue": queue, "lease": lease_seconds, "limit": time_limit_seconds,
         "soft": soft_time_limit_seconds, "heartbeats": heartbeats, "attempts": max_attempts,
         "cooldown": cooldown_seconds},
    )


@dataclass(slots=True)
class ProgressWriter:
    """An attempt's progress reports: each call remembers the latest values; the database sees
    them at most every PROGRESS_WRITE_INTERVAL_S (a stage change at once, and `flush`), and
    writes an event at most every PROGRESS_EVENT_INTERVAL_S. A report from an attempt that lost
    its job raises FencedOut, so the handler stops working for nothing."""

    job_id: int
    attempt: int
    stage: str | None = None
    fraction: float | None = None
    message: str | None = None
    current: int | None = None
    total: int | None = None
    _written_at: float = float("-inf")
    _written_stage: str | None = None
    _dirty: bool = False

    def report(self, conn_factory: Any, *, stage: str | None = None, fraction: float | None = None,
               message: str | None = None, current: int | None = None, total: int | None = None) -> None:
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
        if fraction is None and current is not None and total:
            fraction = min(1.0, current / total)
        self.stage = stage if stage is not None else self.stage
        self.fraction, self.message, self.current, self.total = fraction, message, current, total
        self._dirty = True
        if self.stage != self._written_stage or time.monotonic() - self._written_at >= PROGRESS_WRITE_INTERVAL_S:
            self.flush(conn_factory)

    def flush(self, conn_factory: Any) -> None:
        if not self._dirty:
            return
        with conn_factory() as conn, conn.transaction():
            row = fetch_one(conn, QUERIES["report_progress"], {
                "job_id": self.job_id, "attempt": self.attempt, "stage": self.stage, "fraction": self.fraction,
                "message": self.message, "current": self.current, "total": self.total,
                "min_interval_s": PROGRESS_EVENT_INTERVAL_S,
            })
        self._written_at, self._written_stage, self._dirty = time.monotonic(), self.stage, False
        if row is None or row["written"] == "stale":
            raise FencedOut(f"attempt {self.attempt} of job {self.job_id} no longer holds it; progress refused")


def load_checkpoint(conn: Connectionish, job_id: int) -> Any:
    row = fetch_one(conn, QUERIES["load_checkpoint"], {"job_id": job_id})
    return row["cursor"] if row else None

