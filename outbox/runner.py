"""The generic runner: one delivery of any job kind, as a few short, fenced transactions.

1. start:   `outbox_start` counts the attempt, takes a lease and records the attempt's row (its
            own transaction), or says why this delivery must not run (stale, duplicate, busy,
            lost for good).
2. handle:  the job kind's handler does the work through the `Attempt` it is given. Its effects
            commit in the same transaction as `attempt.complete(conn)`, so a second delivery
            finds the job done and a zombie attempt finds itself fenced out. A long handler
            calls `attempt.heartbeat()` to keep its lease.
3. fail:    an error is sorted once, here: a PermanentJobError ends the job DEAD at once;
            InfrastructureUnavailable waits and retries without spending the attempt; any
            other exception is a counted attempt, retried with capped, jittered backoff until
            the job's attempts run out, then DEAD. The failure is recorded in a transaction of
            its own, since the one that failed is gone. A DEAD transition runs the handler's
            `on_dead` in the same transaction (the place for a domain's audit row).

The runner knows nothing of Celery or of any domain: a task adapter hands it deliveries, a
handler does the work.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from outbox import lifecycle
from outbox.attempt import Attempt, ConnectionFactory
from outbox.backoff import RetryPolicy
from outbox.db_errors import translated_db_errors
from outbox.errors import FencedOut, InfrastructureUnavailable, JobCancelled, PermanentJobError, RetryableJobError
from outbox.lifecycle import FailOutcome, StartOutcome
from outbox.outcomes import Cancelled, Completed, Dead, Dropped, Outcome, RetryLater
from outbox.probes import Probe, no_probe
from outbox.queries import QUERIES
from outbox.transactions import pipelined_transaction
from outbox.watched import load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["Attempt", "ConnectionFactory", "DeadJob", "Handler", "JobRunner", "RunnerPolicy"]


@dataclass(frozen=True, slots=True)
class RunnerPolicy:
    retry: RetryPolicy
    infra_retry: RetryPolicy
    busy_retry_seconds: float
    #: None: the task's own lease (outbox_task.lease_seconds), which is what production uses.
    lease_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DeadJob:
    """What `on_dead` is told about a job that just became DEAD."""

    job_id: int
    payload: dict[str, Any] | None
    reason: str
    attempt: int | None


class Handler(Protocol):
    """A job kind: what one attempt does, and what a DEAD job leaves behind. A handler of a
    watched task also has `watched = True`: its attempts get their checkpoint, its result is
    kept for its watchers, and its failures are told to them with the stage they happened in."""

    def run(self, attempt: Attempt) -> Any:
        """Does the work; commits its effects with `attempt.complete(conn)` (or returns, and
        the runner completes the job in a transaction of its own). Returns a small result."""

    def on_dead(self, conn: psycopg.Connection, job: DeadJob) -> None:
        """Runs in the transaction that made the job DEAD."""


class JobRunner:
    def __init__(
        self,
        *,
        handler: Handler,
        connection: ConnectionFactory,
        policy: RunnerPolicy,
        probe: Probe = no_probe,
        rand: Callable[[], float] = random.random,
        heartbeat_every_seconds: float = 30.0,
    ) -> None:
        self._handler = handler
        self._connection = connection
        self._policy = policy
        self._probe = probe
        self._rand = rand
        self._heartbeat_every = heartbeat_every_seconds
        self._watched = bool(getattr(handler, "watched", False))

    def run(
        self,
        job_id: int,
        *,
        redelivered: bool = False,
        resume_attempt: int | None = None,
        infra_failures: int = 0,
        worker: str | None = None,
    ) -> Outcome:
        try:
            start = self._start(job_id, redelivered, resume_attempt, worker)
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, resume_attempt, infra_failures, exc)

        if start.outcome is not StartOutcome.STARTED:
            return self._not_started(job_id, start)
        assert start.attempt is not None
        # A heartbeat writes when a quarter of the lease has passed: three chances before it runs out.
        every = min(self._heartbeat_every, start.lease_s / 4) if start.lease_s else self._heartbeat_every
        attempt = Attempt(job_id, start.attempt, start.payload or {}, start.coalescing_key, self._connection, every,
                          cursor=start.cursor)
        self._probe("runner.after_start")
        try:
            result = self._handler.run(attempt)
            if not attempt.completed:
                if self._watched:
                    attempt.flush_progress()
                with attempt.transaction() as conn:
                    attempt.complete(conn, result if self._watched else None)
        except FencedOut:
            return Dropped(job_id, f"attempt {attempt.attempt} was fenced out by a takeover")
        except JobCancelled:
            return self._cancelled(attempt, infra_failures)
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, attempt.attempt, infra_failures, exc)
        except PermanentJobError as exc:
            return self._fail(attempt, str(exc), retryable=False, infra_failures=infra_failures)
        except RetryableJobError as exc:
            return self._fail(attempt, str(exc), retryable=True, infra_failures=infra_failures)
        except Exception as exc:
            # A bug, unforeseen data or a flaky dependency: a counted attempt like any failure.
            log.exception("job %s attempt %s failed", job_id, attempt.attempt)
            return self._fail(attempt, f"{type(exc).__name__}: {exc}", retryable=True, infra_failures=infra_failures)
        return Completed(job_id, attempt.attempt, result)

    def _start(self, job_id: int, redelivered: bool, resume_attempt: int | None, worker: str | None) -> lifecycle.Start:
        with translated_db_errors(), self._connection() as conn, pipelined_transaction(conn):
            start = lifecycle.start(
                conn,
                job_id,
                redelivered=redelivered,
                lease_seconds=self._policy.lease_seconds,
                resume_attempt=resume_attempt,
                worker=worker,
            )
            if start.outcome is StartOutcome.STARTED and self._watched:
                start = dataclasses.replace(start, cursor=load_checkpoint(conn, job_id))
            if start.outcome is StartOutcome.DEAD:
                self._handler.on_dead(conn, DeadJob(
                    job_id, start.payload,
                    f"attempt {start.attempt} was lost (worker died or lease expired) and no attempt is left",
                    start.attempt,
                ))
            return start

    def _not_started(self, job_id: int, start: lifecycle.Start) -> Outcome:
        match start.outcome:
            case StartOutcome.BUSY:
                delay = start.retry_after_s or self._policy.busy_retry_seconds * (0.8 + 0.4 * self._rand())
                return RetryLater(job_id, delay, counted=False, resume_attempt=None,
                                  reason="another job of this key is running, or not due yet")
            case StartOutcome.DEAD:
                return Dead(job_id, "the last attempt was lost and no attempt is left")
            case StartOutcome.MISSING:
                log.warning("delivery names job %s, which does not exist", job_id)
                return Dropped(job_id, "no such job")
            case StartOutcome.DUPLICATE:
                return Dropped(job_id, "another attempt holds this job")
            case _:
                return Dropped(job_id, "the job already finished")

    def _cancelled(self, attempt: Attempt, infra_failures: int) -> Outcome:
        try:
            with translated_db_errors(), self._connection() as conn, conn.transaction():
                stopped = lifecycle.finish_cancelled(conn, attempt.job_id, attempt.attempt)
        except InfrastructureUnavailable as exc:
            return self._infra_retry(attempt.job_id, attempt.attempt, infra_failures, exc)
        if not stopped:
            return Dropped(attempt.job_id, f"attempt {attempt.attempt} was fenced out before it stopped")
        log.info("job %s cancelled at attempt %s", attempt.job_id, attempt.attempt)
        return Cancelled(attempt.job_id, attempt.attempt)

    def _fail(self, attempt: Attempt, message: str, *, retryable: bool, infra_failures: int) -> Outcome:
        job_id = attempt.job_id
        delay = self._policy.retry.delay(attempt.attempt, rand=self._rand)
        try:
            with translated_db_errors(), self._connection() as conn, conn.transaction():
                if self._watched:
                    # Before the transition: the event it writes carries this error.
                    conn.execute(QUERIES["set_job_error"], {
                        "job_id": job_id, "attempt": attempt.attempt,
                        "error": Jsonb({"stage": attempt.stage, "message": message[:500], "can_resume": retryable})})
                outcome = lifecycle.fail(conn, job_id, attempt.attempt, error=message,
                                         retryable=retryable, retry_in_seconds=delay)
                if outcome is FailOutcome.DEAD:
                    self._handler.on_dead(conn, DeadJob(job_id, attempt.payload, message, attempt.attempt))
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, attempt.attempt, infra_failures, exc)
        match outcome:
            case FailOutcome.RETRYING:
                log.info("job %s attempt %s failed (%s); retrying in %.1fs", job_id, attempt.attempt, message, delay)
                return RetryLater(job_id, delay, counted=True, resume_attempt=None, reason=message)
            case FailOutcome.DEAD:
                log.warning("job %s is DEAD after attempt %s: %s", job_id, attempt.attempt, message)
                return Dead(job_id, message)
            case FailOutcome.CANCELLED:
                log.info("job %s attempt %s failed after its cancel was requested: cancelled", job_id, attempt.attempt)
                return Cancelled(job_id, attempt.attempt)
            case FailOutcome.SUPERSEDED:
                log.info("job %s attempt %s failed (%s); the key's waiting job covers it",
                         job_id, attempt.attempt, message)
                return Dropped(job_id,
                               f"attempt {attempt.attempt} failed and the key's waiting job covers its requests")
            case _:
                return Dropped(job_id, f"attempt {attempt.attempt} was fenced out before its failure was recorded")

    def _infra_retry(
        self, job_id: int, resume_attempt: int | None, infra_failures: int, exc: Exception
    ) -> RetryLater:
        delay = self._policy.infra_retry.delay(infra_failures + 1, rand=self._rand)
        log.warning("job %s: database unavailable (%s); retrying in %.1fs, attempt not counted",
                    job_id, exc, delay)
        return RetryLater(job_id, delay, counted=False, resume_attempt=resume_attempt, reason=str(exc),
                          infrastructure=True)
