"""Running one recalculation job: the three short transactions behind G2, G4, G5 and G6.

1. start:  `outbox_start` counts the attempt and takes a lease (its own transaction), or says
           why this delivery must not run (stale, duplicate, busy, lost for good).
2. apply:  lock the property (every mutation takes the same lock), check the attempt still
           holds its job, read the inputs, score, compare with the stored score for drift,
           store score + history snapshot + audit rows, and mark the job done. One transaction:
           a second delivery finds the job done; a zombie attempt finds itself fenced out.
3. fail:   on a counted error, record the failure (retry later, or DEAD with its audit row)
           in a transaction of its own, since the one that failed is gone.

The generation the apply step read becomes the property's scored generation, so
`compliance_score_pending` stays true exactly when a newer mutation is still unreflected.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox import lifecycle
from outbox.backoff import RetryPolicy
from outbox.lifecycle import FailOutcome, StartOutcome
from services import audit
from services.db_errors import translated_db_errors
from services.errors import (
    InfrastructureUnavailable,
    PermanentRecalculationError,
    TransientRecalculationError,
)
from services.queries import QUERIES
from services.scoring import VERSION, Document, DocumentStatus, ScoringInputs, score
from services.vocabulary import Actor, AuditAction

log = logging.getLogger(__name__)

MAX_BIGINT = 2**63 - 1

WORKER_ACTOR = Actor.system("recalq-worker")

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


@dataclass(frozen=True, slots=True)
class RecalculationPolicy:
    lease_seconds: float
    retry: RetryPolicy
    infra_retry: RetryPolicy
    busy_retry_seconds: float
    lock_timeout_ms: int


@dataclass(frozen=True, slots=True)
class Applied:
    job_id: int
    property_id: int
    score: int
    previous_score: int | None
    drift_detected: bool


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
class Dead:
    job_id: int
    reason: str


Outcome = Applied | Dropped | RetryLater | Dead


class _FencedOut(Exception):
    """The attempt lost its job to a takeover; its transaction must roll back."""


def _nothing(point: str) -> None:
    """The production probe: does nothing."""


class Recalculator:
    def __init__(
        self,
        *,
        connection: ConnectionFactory,
        policy: RecalculationPolicy,
        today: Callable[[], date],
        probe: Callable[[str], None] = _nothing,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._connection = connection
        self._policy = policy
        self._today = today
        self._probe = probe
        self._rand = rand

    def run(
        self,
        job_id: int,
        *,
        redelivered: bool = False,
        resume_attempt: int | None = None,
        infra_failures: int = 0,
    ) -> Outcome:
        try:
            start = self._start(job_id, redelivered, resume_attempt)
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, resume_attempt, infra_failures, exc)

        if start.outcome is not StartOutcome.STARTED:
            return self._not_started(job_id, start)
        attempt = start.attempt
        assert attempt is not None
        property_id = _property_id(start.payload)
        if property_id is None:
            return self._fail(
                job_id, attempt, None,
                PermanentRecalculationError(f"payload {start.payload!r} has no valid property_id"),
                infra_failures,
            )
        try:
            return self._apply(job_id, attempt, property_id)
        except _FencedOut:
            return Dropped(job_id, f"attempt {attempt} was fenced out by a takeover")
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, attempt, infra_failures, exc)
        except (TransientRecalculationError, PermanentRecalculationError) as exc:
            return self._fail(job_id, attempt, property_id, exc, infra_failures)
        except Exception as exc:  # a bug or unforeseen data: recorded as DEAD, never retried
            log.exception("recalculation of job %s failed unexpectedly", job_id)
            error = PermanentRecalculationError(f"unexpected {type(exc).__name__}: {exc}")
            return self._fail(job_id, attempt, property_id, error, infra_failures)

    def _start(self, job_id: int, redelivered: bool, resume_attempt: int | None) -> lifecycle.Start:
        with translated_db_errors(), self._connection() as conn, _pipelined_transaction(conn):
            start = lifecycle.start(
                conn,
                job_id,
                redelivered=redelivered,
                lease_seconds=self._policy.lease_seconds,
                resume_attempt=resume_attempt,
            )
            if start.outcome is StartOutcome.DEAD:
                self._audit_dead(
                    conn, job_id, _property_id(start.payload),
                    f"attempt {start.attempt} was lost (worker died or lease expired) "
                    "and no attempt is left",
                    start.attempt,
                )
            return start

    def _not_started(self, job_id: int, start: lifecycle.Start) -> Outcome:
        match start.outcome:
            case StartOutcome.BUSY:
                delay = start.retry_after_s or self._policy.busy_retry_seconds * (0.8 + 0.4 * self._rand())
                return RetryLater(job_id, delay, counted=False, resume_attempt=None,
                                  reason="another job of this property is running, or not due yet")
            case StartOutcome.DEAD:
                return Dead(job_id, "the last attempt was lost and no attempt is left")
            case StartOutcome.MISSING:
                log.warning("delivery names job %s, which does not exist", job_id)
                return Dropped(job_id, "no such job")
            case StartOutcome.DUPLICATE:
                return Dropped(job_id, "another attempt holds this job")
            case _:
                return Dropped(job_id, "the job already finished")

    def _apply(self, job_id: int, attempt: int, property_id: int) -> Applied:
        """Three round trips: the reads, the writes with the completion, the commit.

        The reads are separate statements sent together, not one query: in READ COMMITTED
        each statement takes a fresh snapshot, so the documents are read after the property
        lock is granted and see every mutation that held it before.
        """
        with translated_db_errors(), self._connection() as conn, _pipelined_transaction(conn):
            if self._policy.lock_timeout_ms:
                conn.execute("SELECT set_config('lock_timeout', %s, true)",
                             [f"{self._policy.lock_timeout_ms}ms"])
            prop_cur = conn.cursor(row_factory=dict_row).execute(
                QUERIES["lock_property_for_scoring"], {"property_id": property_id})
            fence_cur = conn.cursor().execute(
                QUERIES["fence_running_attempt"], {"job_id": job_id, "attempt": attempt})
            documents_cur = conn.cursor(row_factory=dict_row).execute(
                QUERIES["live_documents_of_property"], {"property_id": property_id})
            requests_cur = lifecycle.send_requests_of_job(conn, job_id, limit=20)
            prop = prop_cur.fetchone()
            if prop is None:
                raise PermanentRecalculationError(f"property {property_id} does not exist")
            if fence_cur.fetchone() is None:
                raise _FencedOut()
            documents = documents_cur.fetchall()
            requests = requests_cur.fetchall()
            self._probe("recalculation.after_read_state")

            inputs = ScoringInputs.of(
                prop["has_gas_supply"],
                (Document(d["id"], d["requirement_code"], DocumentStatus(d["status"]), d["expires_at"])
                 for d in documents),
            )
            result = score(inputs, self._today())
            fingerprint = inputs.fingerprint()
            drift = _drift(prop, inputs, fingerprint)
            values = {
                "property_id": property_id,
                "job_id": job_id,
                "score": result.score,
                "breakdown": Jsonb(result.breakdown()),
                "version": result.version,
                "as_of": result.as_of,
                "fingerprint": fingerprint,
                "generation": prop["generation"],
            }
            conn.execute(QUERIES["store_score_with_history"], values)

            correlation_id = requests[0]["correlation_id"] if requests else None
            common = {
                "property_id": property_id,
                "client_id": prop["client_id"],
                "correlation_id": correlation_id,
                "job_id": job_id,
            }
            if drift is not None:
                audit.record(conn, AuditAction.COMPLIANCE_SCORE_DRIFT_DETECTED, WORKER_ACTOR,
                             **common, details=drift | {"applied_score": result.score,
                                                        "applied_as_of": result.as_of.isoformat()})
            audit.record(
                conn, AuditAction.COMPLIANCE_SCORE_UPDATED, WORKER_ACTOR, **common,
                details={
                    "score": result.score,
                    "previous_score": prop["compliance_score"],
                    "version": result.version,
                    "as_of": result.as_of.isoformat(),
                    "generation": prop["generation"],
                    "attempt": attempt,
                    "requests": [
                        {k: r[k] for k in ("correlation_id", "trigger_reason", "actor_type", "actor_id")}
                        for r in requests
                    ],
                },
            )
            if not lifecycle.complete(conn, job_id, attempt):
                raise _FencedOut()
            self._probe("recalculation.before_commit")
        return Applied(job_id, property_id, result.score, prop["compliance_score"], drift is not None)

    def _fail(
        self,
        job_id: int,
        attempt: int,
        property_id: int | None,
        error: Exception,
        infra_failures: int,
    ) -> Outcome:
        retryable = isinstance(error, TransientRecalculationError)
        delay = self._policy.retry.delay(attempt, rand=self._rand)
        message = str(error)
        try:
            with translated_db_errors(), self._connection() as conn, conn.transaction():
                outcome = lifecycle.fail(conn, job_id, attempt, error=message,
                                         retryable=retryable, retry_in_seconds=delay)
                if outcome is FailOutcome.DEAD:
                    self._audit_dead(conn, job_id, property_id, message, attempt)
        except InfrastructureUnavailable as exc:
            return self._infra_retry(job_id, attempt, infra_failures, exc)
        match outcome:
            case FailOutcome.RETRYING:
                log.info("job %s attempt %s failed (%s); retrying in %.1fs", job_id, attempt, message, delay)
                return RetryLater(job_id, delay, counted=True, resume_attempt=None, reason=message)
            case FailOutcome.DEAD:
                log.warning("job %s is DEAD after attempt %s: %s", job_id, attempt, message)
                return Dead(job_id, message)
            case FailOutcome.SUPERSEDED:
                log.info("job %s attempt %s failed (%s); the key's waiting job covers it", job_id, attempt, message)
                return Dropped(job_id, f"attempt {attempt} failed and the key's waiting job covers its requests")
            case _:
                return Dropped(job_id, f"attempt {attempt} was fenced out before its failure was recorded")

    def _audit_dead(
        self, conn: psycopg.Connection, job_id: int, property_id: int | None, reason: str,
        attempt: int | None,
    ) -> None:
        client_id = None
        if property_id is not None:
            row = conn.execute(QUERIES["property_client"], {"property_id": property_id}).fetchone()
            client_id = row[0] if row else None
        requests = lifecycle.requests_of_job(conn, job_id, limit=20)
        audit.record(
            conn, AuditAction.COMPLIANCE_RECALC_FAILED, WORKER_ACTOR,
            property_id=property_id, client_id=client_id,
            correlation_id=requests[0]["correlation_id"] if requests else None,
            job_id=job_id,
            details={"error": reason, "attempts": attempt},
        )

    def _infra_retry(
        self, job_id: int, resume_attempt: int | None, infra_failures: int, exc: Exception
    ) -> RetryLater:
        delay = self._policy.infra_retry.delay(infra_failures + 1, rand=self._rand)
        log.warning("job %s: database unavailable (%s); retrying in %.1fs, attempt not counted",
                    job_id, exc, delay)
        return RetryLater(job_id, delay, counted=False, resume_attempt=resume_attempt, reason=str(exc),
                          infrastructure=True)


@contextmanager
def _pipelined_transaction(conn: psycopg.Connection) -> Iterator[None]:
    """A transaction in pipeline mode: BEGIN travels with the first statements, each fetch
    is one round trip for everything sent before it, and COMMIT is the last one.

    Any error, in Postgres or in between, rolls the transaction back before the connection
    goes back to its pool. A statement whose result is never read still reports its error,
    at the next fetch or at the COMMIT, so nothing fails silently.
    """
    try:
        with conn.pipeline():
            if conn.autocommit:  # otherwise psycopg opens the transaction itself
                conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status in (TransactionStatus.INTRANS,
                                                                TransactionStatus.INERROR):
            with suppress(psycopg.Error):
                conn.rollback()
        raise


def _property_id(payload: dict[str, Any] | None) -> int | None:
    value = (payload or {}).get("property_id")
    # properties.id is a bigint: a larger id cannot exist, and would not fit the audit row
    # that records why the job is DEAD, so it is malformed rather than "not found".
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_BIGINT:
        return None
    return value


def _drift(prop: dict[str, Any], inputs: ScoringInputs, fingerprint: str) -> dict[str, Any] | None:
    """A stored score its own inputs do not explain (G6).

    When the inputs are what they were at the last calculation (same fingerprint, same
    formula), recomputing at the stored as-of date must reproduce the stored score and
    breakdown exactly. New inputs or a new date explain a change; nothing else does.
    """
    if prop["compliance_score"] is None:
        return None
    if prop["compliance_version"] != VERSION or prop["compliance_inputs_fingerprint"] != fingerprint:
        return None
    expected = score(inputs, prop["compliance_as_of"])
    if expected.score == prop["compliance_score"] and expected.breakdown() == prop["compliance_breakdown"]:
        return None
    return {
        "stored_score": prop["compliance_score"],
        "computed_score": expected.score,
        "as_of": prop["compliance_as_of"].isoformat(),
        "breakdown_matches": expected.breakdown() == prop["compliance_breakdown"],
    }
