"""One running attempt, as its handler sees it: its transactions, its lease, and for a watched
job its progress, its units (fenced, cancellable, checkpointed) and its result.

A watched handler works in units:

    for i in range(attempt.cursor or 0, len(items)):      # the checkpoint of an earlier attempt
        with attempt.unit() as conn:                       # JobCancelled here if a cancel came in
            do(items[i], conn)
            attempt.checkpoint(conn, i + 1)                # commits with the unit's own work
        attempt.progress(stage="copy", current=i + 1, total=len(items))

so a retry, a takeover or a resume repeats at most the unit that was in flight, and a cancel
stops the job between two units, never in the middle of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox import lifecycle
from outbox.db_errors import translated_db_errors
from outbox.errors import FencedOut, JobCancelled
from outbox.queries import QUERIES
from outbox.transactions import pipelined_transaction
from outbox.watched import ProgressWriter

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


@dataclass(slots=True)
class Attempt:
    """One running attempt, as its handler sees it."""

    job_id: int
    attempt: int
    payload: dict[str, Any]
    coalescing_key: str | None
    _connection: ConnectionFactory = field(repr=False)
    #: Seconds between heartbeats that actually write (the rest return at once).
    _heartbeat_every: float = field(default=5.0, repr=False)
    _last_heartbeat: float = field(default_factory=time.monotonic, repr=False)
    completed: bool = False
    #: A watched job's checkpoint when the attempt started (an earlier attempt's, or the job it
    #: resumes): where to carry on. None: from the beginning.
    cursor: Any = None
    _progress: ProgressWriter | None = field(default=None, repr=False)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in a pipelined transaction; database errors come out sorted
        (InfrastructureUnavailable, RetryableJobError) and the transaction rolls back on any error."""
        with translated_db_errors(), self._connection() as conn, pipelined_transaction(conn):
            yield conn

    def send_fence(self, conn: psycopg.Connection) -> Callable[[], None]:
        """Locks the job row if this attempt still holds it. Returns the check: call it after
        the next fetch (the result travels with the statements sent around it) and it raises
        FencedOut if the job was taken over."""
        cur = conn.cursor().execute(QUERIES["fence_attempt"], {"job_id": self.job_id, "attempt": self.attempt})

        def confirm() -> None:
            if cur.fetchone() is None:
                raise FencedOut(f"attempt {self.attempt} of job {self.job_id} no longer holds it")

        return confirm

    def complete(self, conn: psycopg.Connection, result: Any = None) -> None:
        """Marks the job done in the caller's transaction, the one holding the job's effects;
        raises FencedOut (so that transaction rolls back) if the attempt lost its job. `result`
        is what a watched job's watchers are told it made (small JSON)."""
        if not lifecycle.complete(conn, self.job_id, self.attempt, result):
            raise FencedOut(f"attempt {self.attempt} of job {self.job_id} was fenced out before completing")
        self.completed = True

    def heartbeat(self, *, force: bool = False) -> None:
        """Extends the lease (at most every few seconds, unless forced); raises FencedOut when the
        attempt lost its job, so a handler stops at its next unit instead of working for nothing."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self._heartbeat_every:
            return
        with translated_db_errors(), self._connection() as conn, conn.transaction():
            alive = lifecycle.heartbeat(conn, self.job_id, self.attempt)
        self._last_heartbeat = now
        if not alive:
            raise FencedOut(f"attempt {self.attempt} of job {self.job_id} lost its lease")



    # -- watched jobs ---------------------------------------------------------------------------
    @contextmanager
    def unit(self) -> Iterator[psycopg.Connection]:
        """One unit of work in one transaction that holds the job: FencedOut if the attempt lost
        it, JobCancelled (before any work) if a cancel was requested."""
        with self.transaction() as conn:
            row = conn.execute(QUERIES["fence_unit"], {"job_id": self.job_id, "attempt": self.attempt}).fetchone()
            if row is None:
                raise FencedOut(f"attempt {self.attempt} of job {self.job_id} no longer holds it")
            if row[0]:
                raise JobCancelled(f"job {self.job_id} was asked to stop")
            yield conn

    def checkpoint(self, conn: psycopg.Connection, cursor: Any) -> None:
        """Records where the next unit starts, in the transaction of the unit it follows."""
        conn.execute(QUERIES["save_checkpoint"],
                     {"job_id": self.job_id, "attempt": self.attempt, "cursor": Jsonb(cursor)})
        self.cursor = cursor

    def progress(self, *, stage: str | None = None, fraction: float | None = None, message: str | None = None,
                 current: int | None = None, total: int | None = None) -> None:
        """Tells the job's watchers where it is (throttled: call it as often as you like)."""
        if self._progress is None:
            self._progress = ProgressWriter(self.job_id, self.attempt)
        with translated_db_errors():
            self._progress.report(self._connection, stage=stage, fraction=fraction, message=message,
                                  current=current, total=total)

    @property
    def stage(self) -> str | None:
        """The stage last reported (a failure's error names it)."""
        return self._progress.stage if self._progress is not None else None

    def flush_progress(self) -> None:
        if self._progress is not None:
            with translated_db_errors():
                self._progress.flush(self._connection)
