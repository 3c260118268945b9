"""Retention for the outbox: finished jobs and their requests go once they are old enough.

The outbox is a queue, not an archive: history that matters (scores, snapshots, audit rows)
lives with the domain. Without pruning, every claim, rescue scan and view over `outbox_job`
would slow down with age. Each batch is one short transaction that skips locked rows, so
pruning never waits on live work and never holds locks for long.

DEAD jobs are never pruned: they are the operator's to requeue, or to `purge_dead` on purpose.
A watched job's events, progress and checkpoint go with it (ON DELETE CASCADE); it leaves a
tombstone, so its owner is told "expired" rather than "unknown" for the task's
tombstone_retention, after which the tombstone goes too (`prune_tombstones`).
A request's correlation id is refused as a repeat only while its row is kept, so the retention
period is also how long an idempotency key is remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.pq import TransactionStatus

from outbox.queries import QUERIES


@dataclass(frozen=True, slots=True)
class PruneReport:
    jobs: int
    requests: int

    def __add__(self, other: PruneReport) -> PruneReport:
        return PruneReport(self.jobs + other.jobs, self.requests + other.requests)


def prune_finished(conn: psycopg.Connection, *, older_than: timedelta, batch_size: int = 5000) -> PruneReport:
    """Deletes done and superseded jobs that finished more than `older_than` ago (or their task's
    own `retention`, where it sets one), with their requests and attempts, `batch_size` jobs per
    transaction. `conn` must not be inside a transaction, or
    the batches would all commit (or roll back) with the caller's."""
    if older_than <= timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    params = {"older_than_seconds": older_than.total_seconds(), "limit": _positive(batch_size)}
    return _batches(conn, "prune_finished_jobs", params)


def expire_watched(conn: psycopg.Connection, *, batch_size: int = 5000) -> PruneReport:
    """Deletes finished watched jobs whose status expired (expires_at passed), whatever the
    retention; each leaves a tombstone "expired" for its owner."""
    return _batches(conn, "expire_watched_jobs", {"limit": _positive(batch_size)})


def prune_tombstones(conn: psycopg.Connection, *, batch_size: int = 5000) -> int:
    """Forgets tombstones past their keep_until: after that an old id is simply unknown."""
    require_idle(conn)
    total = 0
    while True:
        with conn.transaction():
            deleted = conn.execute(QUERIES["prune_tombstones"], {"limit": _positive(batch_size)}).rowcount
        total += deleted
        if deleted < batch_size:
            return total


def purge_dead(
    conn: psycopg.Connection,
    *,
    job_ids: list[int] | None = None,
    coalescing_key: str | None = None,
    all_before: datetime | None = None,
    batch_size: int = 5000,
) -> PruneReport:
    """Deletes DEAD jobs for good, chosen by exactly one of: their ids, their coalescing key,
    or every one that died before `all_before`. Superseded jobs that name a purged job go with
    it (their requests were its requests). A job requeued meanwhile is not DEAD and stays."""
    chosen = [name for name, value in (("job_ids", job_ids), ("coalescing_key", coalescing_key),
                                       ("all_before", all_before)) if value is not None]
    if len(chosen) != 1:
        raise ValueError(f"purge_dead needs exactly one of job_ids, coalescing_key, all_before; got {chosen or 'none'}")
    if job_ids is not None and not job_ids:
        return PruneReport(0, 0)
    if coalescing_key is not None and not coalescing_key.strip():
        raise ValueError("coalescing_key must be a non-empty string")
    if all_before is not None and all_before.tzinfo is None:
        raise ValueError("all_before must be timezone-aware (UTC), or its meaning depends on the server's zone")
    params = {
        "job_ids": list(job_ids) if job_ids is not None else None,
        "coalescing_key": coalescing_key,
        "finished_before": all_before,
        "limit": _positive(batch_size),
    }
    return _batches(conn, "purge_dead_jobs", params)


def _batches(conn: psycopg.Connection, query: str, params: dict[str, object]) -> PruneReport:
    """Runs a deleting batch until one deletes nothing: a batch may leave rows a later one can
    take (a job still named by a superseded one that this batch deleted)."""
    require_idle(conn)
    total = PruneReport(0, 0)
    while True:
        with conn.transaction():
            row = conn.execute(QUERIES[query], params).fetchone()
        assert row is not None
        batch = PruneReport(jobs=row[0], requests=row[1])
        if batch.jobs == 0:
            return total
        total += batch


def require_idle(conn: psycopg.Connection) -> None:
    """Batches must commit one by one. Inside a caller's transaction they would be savepoints:
    nothing would commit until the caller does, and every lock would be held until then."""
    if conn.info.transaction_status is not TransactionStatus.IDLE:
        raise ValueError(
            f"the connection is {conn.info.transaction_status.name}, not IDLE: commit or roll back first, "
            "or use an autocommit connection (each batch is its own transaction)"
        )


def _positive(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return batch_size
