"""The relay: moves committed outbox jobs to the broker.

Each pass claims due pending jobs under a short lease (one short transaction), publishes them
through the `publish` callable it was handed (the relay knows nothing of Celery), then marks
the ones the broker confirmed as published (a second short transaction). No row lock is held
while the broker is slow, so mutations joining those jobs never wait on the broker.

A relay that dies after publishing and before marking leaves rows whose lease runs out; a
later pass publishes them again with the same task id, and the worker's fenced start turns the
second delivery into a no-op. LISTEN/NOTIFY only wakes the relay early; polling is the truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from outbox.errors import PublishFailed
from outbox.probes import Probe, no_probe
from outbox.queries import QUERIES

log = logging.getLogger(__name__)

#: The channel outbox_enqueue notifies when it creates a job.
WAKE_CHANNEL = "outbox_job_pending"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    job_id: int
    task: str
    payload: dict[str, Any]
    #: Fixed when the job was inserted, so every publication of a job carries the same id.
    task_id: UUID
    #: The task's Celery queue (outbox_task.queue); None: the deployment's default queue.
    queue: str | None = None
    #: The task's hard and soft time limits, carried by the message so each kind has its own.
    time_limit: float | None = None
    soft_time_limit: float | None = None


#: Publishes a batch; raises PublishFailed naming the job ids that did get through.
Publish = Callable[[Sequence[OutboxMessage]], None]


@dataclass(frozen=True, slots=True)
class PassResult:
    claimed: int
    published: int


class Relay:
    def __init__(
        self,
        *,
        connect: Callable[[], psycopg.Connection],
        publish: Publish,
        batch_size: int = 500,
        claim_lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        max_error_backoff_seconds: float = 5.0,
        rescue_after_seconds: float = 300.0,
        rescue_interval_seconds: float = 30.0,
        takeover_grace_seconds: float = 60.0,
        probe: Probe = no_probe,
    ) -> None:
        self._connect = connect
        self._publish = publish
        self._batch_size = batch_size
        self._claim_lease_seconds = claim_lease_seconds
        self._poll_seconds = poll_seconds
        self._max_error_backoff = max_error_backoff_seconds
        self._probe = probe
        #: A job is presumed lost this long after it should have started (published or due).
        self._rescue_after_seconds = rescue_after_seconds
        self._rescue_interval_seconds = rescue_interval_seconds
        #: A running job's lease must have run out this long ago before it is presumed lost:
        #: longer than the worker's own retry after a database outage takes to come back.
        self._takeover_grace_seconds = takeover_grace_seconds

    def run_pass(self, conn: psycopg.Connection) -> PassResult:
        """One claim → publish → mark cycle on an open connection (not in a transaction)."""
        return self._cycle(
            conn,
            claim=("claim_due_jobs", {"lease_seconds": self._claim_lease_seconds, "limit": self._batch_size}),
            mark="mark_published",
        )

    def rescue_pass(self, conn: psycopg.Connection) -> PassResult:
        """Re-sends the messages of jobs that look lost (G7), with their fixed task ids.

        A message can vanish after the relay handed it over: a Redis broker that restarted
        without persistence, a purged queue, a worker killed after its retry was recorded but
        before the retry message left. Postgres still knows the job is unfinished, so it is
        sent again; the worker's fenced start makes a needless re-send a no-op.
        """
        return self._cycle(
            conn,
            claim=("claim_lost_jobs", {
                "lease_seconds": self._claim_lease_seconds,
                "grace_seconds": self._rescue_after_seconds,
                "takeover_grace_seconds": self._takeover_grace_seconds,
                "limit": self._batch_size,
            }),
            mark="mark_rescued",
        )

    def _cycle(
        self, conn: psycopg.Connection, *, claim: tuple[str, dict[str, Any]], mark: str
    ) -> PassResult:
        query, params = claim
        with conn.transaction():
            with conn.cursor() as cur:
                cur.execute(QUERIES[query], params)
                rows = cur.fetchall()
        if not rows:
            return PassResult(0, 0)
        messages = [OutboxMessage(job_id=r[0], task=r[1], payload=r[2], task_id=r[3], queue=r[4],
                                  time_limit=r[5], soft_time_limit=r[6]) for r in rows]
        self._probe("relay.after_claim")
        failure: PublishFailed | None = None
        try:
            self._publish(messages)
            published = [m.job_id for m in messages]
        except PublishFailed as exc:
            failure = exc
            published = list(exc.published)
        self._probe("relay.after_publish")
        with conn.transaction():
            with conn.cursor() as cur:
                if published:
                    cur.execute(QUERIES[mark], {"ids": published})
                unpublished = sorted({m.job_id for m in messages} - set(published))
                if unpublished:
                    cur.execute(QUERIES["release_claims"], {"ids": unpublished})
        self._probe("relay.after_mark")
        if failure is not None:
            raise failure
        return PassResult(len(messages), len(published))

    def drain(self, conn: psycopg.Connection) -> int:
        """Passes until nothing due is left; returns how many jobs were published."""
        total = 0
        while True:
            result = self.run_pass(conn)
            total += result.published
            if result.claimed < self._batch_size:
                return total

    def run(self, stop: threading.Event) -> None:
        """Relays until `stop` is set, surviving database and broker outages.

        A broker outage keeps the database connection (nothing is wrong with it) and backs
        off between attempts; a database outage reconnects with the same backoff. The delay
        grows with consecutive failures and resets after the first pass that works.
        """
        backoff = 0.0
        while not stop.is_set():
            try:
                with self._connect() as conn, self._listen() as wakeups:
                    conn.autocommit = False
                    log.info("relay connected; publishing due jobs")
                    next_rescue = time.monotonic()
                    while not stop.is_set():
                        try:
                            self.drain(conn)
                            if time.monotonic() >= next_rescue:
                                rescued = self.rescue_pass(conn)
                                if rescued.published:
                                    log.warning("re-sent %s job(s) whose message looked lost", rescued.published)
                                next_rescue = time.monotonic() + self._rescue_interval_seconds
                        except PublishFailed as exc:
                            backoff = self._next_backoff(backoff)
                            log.warning("broker refused a batch (%s); retrying in %.1fs", exc, backoff)
                            conn.rollback()
                            stop.wait(backoff)
                            continue
                        backoff = 0.0
                        wait = self._seconds_until_next_due(conn)
                        conn.commit()  # end the implicit read transaction before waiting
                        wakeups.wait(wait)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                backoff = self._next_backoff(backoff)
                log.warning("relay lost the database (%s); retrying in %.1fs", exc, backoff)
                stop.wait(backoff)

    def _seconds_until_next_due(self, conn: psycopg.Connection) -> float:
        """The poll interval, or less when a pending job falls due sooner.

        A job held back by its task's minimum interval is created, and its NOTIFY sent, before
        it is due; without this the relay could sleep almost a whole poll past its due time.
        """
        with conn.cursor() as cur:
            cur.execute(QUERIES["seconds_until_next_due"])
            row = cur.fetchone()
        due_in = row[0] if row is not None else None
        if due_in is None:
            return self._poll_seconds
        # A few ms past the due time, so the claim's now() has reached it.
        return min(self._poll_seconds, max(0.0, due_in) + 0.005)

    def _next_backoff(self, current: float) -> float:
        return min(self._max_error_backoff, max(0.1, current * 2))

    def _listen(self) -> AbstractContextManager[_Wakeups]:
        return _Wakeups(self._connect)


class _Wakeups:
    """Waits for a NOTIFY on the wake channel, or for a timeout without one."""

    def __init__(self, connect: Callable[[], psycopg.Connection]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> _Wakeups:
        self._conn = self._connect()
        self._conn.autocommit = True
        self._conn.execute(f"LISTEN {WAKE_CHANNEL}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            self._conn.close()

    def wait(self, timeout: float) -> None:
        assert self._conn is not None
        for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            break
