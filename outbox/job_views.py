"""What a watcher reads: a job's snapshot, its events after a sequence number, its tombstone.

The snapshot is the job's row with its progress side row; `last_seq` is the number of the last
event, the SSE id and the ETag, so a client that has seen `last_seq` has seen everything the
snapshot says. Reads only; every one is a single indexed query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox.connection import Connectionish, fetch_all, fetch_one
from outbox.queries import QUERIES
from outbox.status import JobStatus
from outbox.user_status import LIVE, UserStatus, user_status

#: Events sent in one read; a client further behind reads again.
EVENTS_PER_READ = 500


@dataclass(frozen=True, slots=True)
class StageView:
    number: int  # 1-based
    key: str
    display: str


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    id: int
    task: str
    owner: str
    status: JobStatus
    attempt: int
    max_attempts: int
    stages: tuple[StageView, ...]
    stage: StageView | None
    fraction: float | None
    message: str | None
    current: int | None
    total: int | None
    result: Any
    error: dict[str, Any] | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    resumed_from: int | None
    last_seq: int

    @property
    def user_status(self) -> UserStatus:
        return user_status(self.status)

    @property
    def final(self) -> bool:
        """Nothing more will happen to it (a stream ends after its final event)."""
        return self.user_status not in LIVE

    def elapsed_seconds(self, now: datetime) -> float | None:
        if self.started_at is None:
            return None
        return ((self.finished_at or now) - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class JobEvent:
    seq: int
    kind: str
    attempt: int | None
    data: dict[str, Any]
    created_at: datetime

    @property
    def final(self) -> bool:
        return self.kind in FINAL_KINDS


FINAL_KINDS = frozenset({"complete", "error", "cancelled"})


@dataclass(frozen=True, slots=True)
class Tombstone:
    job_id: int
    task: str
    owner: str
    reason: str  # expired | deleted
    finished_at: datetime | None


def snapshot(conn: Connectionish, job_id: int) -> JobSnapshot | None:
    """The watched job, or None (no such job, or not a watched one)."""
    rows = fetch_all(conn, QUERIES["watched_job_snapshots"], {"job_ids": [job_id]})
    return snapshot_from_row(rows[0]) if rows else None


def snapshot_from_row(row: dict[str, Any]) -> JobSnapshot:
    """A row of `watched_job_snapshots`, however it was read (the stream reads it async)."""
    stages = tuple(StageView(i + 1, s["key"], s["display"]) for i, s in enumerate(row["stages"] or []))
    index = row["stage_index"]
    return JobSnapshot(
        id=row["id"], task=row["task"], owner=row["owner"], status=JobStatus(row["status"]),
        attempt=row["attempts"], max_attempts=row["max_attempts"], stages=stages,
        stage=stages[index] if index is not None and index < len(stages) else None,
        fraction=row["fraction"], message=row["message"], current=row["current_units"], total=row["total_units"],
        result=row["result"], error=row["error"], cancel_requested=row["cancel_requested_at"] is not None,
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        expires_at=row["expires_at"], resumed_from=row["resumed_from"], last_seq=row["last_seq"] or 0,
    )


def jobs_of_owner(conn: Connectionish, owner: str, task: str, *, limit: int = 50,
                  before_id: int | None = None) -> list[JobSnapshot]:
    """A page of the owner's jobs of one kind: two queries, whatever the page's size."""
    ids = [row["id"] for row in fetch_all(conn, QUERIES["watched_jobs_of_owner"],
                                          {"owner": owner, "task": task, "limit": limit, "before_id": before_id})]
    if not ids:
        return []
    return [snapshot_from_row(row) for row in fetch_all(conn, QUERIES["watched_job_snapshots"], {"job_ids": ids})]


def events_after(conn: Connectionish, job_id: int, after_seq: int, limit: int = EVENTS_PER_READ) -> list[JobEvent]:
    rows = fetch_all(conn, QUERIES["job_events_after"], {"job_id": job_id, "after_seq": after_seq, "limit": limit})
    return [JobEvent(**row) for row in rows]


def first_kept_seq(conn: Connectionish, job_id: int) -> int | None:
    row = fetch_one(conn, QUERIES["job_first_event"], {"job_id": job_id})
    return row["first_seq"] if row else None


def tombstone(conn: Connectionish, job_id: int) -> Tombstone | None:
    row = fetch_one(conn, QUERIES["job_tombstone"], {"job_id": job_id})
    if row is None:
        return None
    return Tombstone(job_id=row["job_id"], task=row["task"], owner=row["owner"], reason=row["reason"],
                     finished_at=row["finished_at"])

