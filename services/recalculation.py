"""The recalculation: the coalesced, invisible job that keeps a property's score fresh.

It is one handler of the generic runner (outbox.runner), which starts each attempt fenced and
sorts its errors. The attempt itself is one transaction: lock the property (every mutation takes
the same lock), check the attempt still holds its job, read the inputs, score, compare with the
stored score for drift (G6), store score + history snapshot + audit rows, and mark the job done.
A second delivery finds the job done; a zombie attempt finds itself fenced out (G4).

The generation the attempt read becomes the property's scored generation, so
`compliance_score_pending` stays true exactly when a newer mutation is still unreflected (G2).
A job that ends DEAD writes COMPLIANCE_RECALC_FAILED in the transaction that made it DEAD (G5).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox import lifecycle
from outbox.backoff import RetryPolicy
from outbox.outcomes import Completed, Dead, Dropped, Outcome, RetryLater
from outbox.runner import Attempt, ConnectionFactory, DeadJob, JobRunner, RunnerPolicy
from services import audit
from services.errors import PermanentRecalculationError
from services.queries import QUERIES
from services.scoring import VERSION, Document, DocumentStatus, ScoringInputs, score
from services.vocabulary import Actor, AuditAction

__all__ = ["Applied", "Dead", "Dropped", "RecalculationHandler", "RecalculationPolicy", "Recalculator",
           "RetryLater"]

log = logging.getLogger(__name__)

MAX_BIGINT = 2**63 - 1

WORKER_ACTOR = Actor.system("recalq-worker")


@dataclass(frozen=True, slots=True)
class RecalculationPolicy:
    lease_seconds: float | None
    retry: RetryPolicy
    infra_retry: RetryPolicy
    busy_retry_seconds: float
    lock_timeout_ms: int

    def runner_policy(self) -> RunnerPolicy:
        return RunnerPolicy(retry=self.retry, infra_retry=self.infra_retry,
                            busy_retry_seconds=self.busy_retry_seconds, lease_seconds=self.lease_seconds)


@dataclass(frozen=True, slots=True)
class Applied:
    job_id: int
    property_id: int
    score: int
    previous_score: int | None
    drift_detected: bool


def _nothing(point: str) -> None:
    """The production probe: does nothing."""


class RecalculationHandler:
    """The runner's handler for RECALCULATE_TASK."""

    def __init__(
        self,
        *,
        today: Callable[[], date],
        lock_timeout_ms: int,
        probe: Callable[[str], None] = _nothing,
    ) -> None:
        self._today = today
        self._lock_timeout_ms = lock_timeout_ms
        self._probe = probe

    def run(self, attempt: Attempt) -> Applied:
        property_id = _property_id(attempt.payload)
        if property_id is None:
            raise PermanentRecalculationError(f"payload {attempt.payload!r} has no valid property_id")
        return self._apply(attempt, property_id)

    def on_dead(self, conn: psycopg.Connection, job: DeadJob) -> None:
        self._audit_dead(conn, job.job_id, _property_id(job.payload), job.reason, job.attempt)

    def _apply(self, attempt: Attempt, property_id: int) -> Applied:
        """Three round trips: the reads, the writes with the completion, the commit.

        The reads are separate statements sent together, not one query: in READ COMMITTED
        each statement takes a fresh snapshot, so the documents are read after the property
        lock is granted and see every mutation that held it before.
        """
        job_id = attempt.job_id
        with attempt.transaction() as conn:
            if self._lock_timeout_ms:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{self._lock_timeout_ms}ms"])
            prop_cur = conn.cursor(row_factory=dict_row).execute(
                QUERIES["lock_property_for_scoring"], {"property_id": property_id})
            confirm_fence = attempt.send_fence(conn)
            documents_cur = conn.cursor(row_factory=dict_row).execute(
                QUERIES["live_documents_of_property"], {"property_id": property_id})
            requests_cur = lifecycle.send_requests_of_job(conn, job_id, limit=20)
            prop = prop_cur.fetchone()
            if prop is None:
                raise PermanentRecalculationError(f"property {property_id} does not exist")
            confirm_fence()
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
                    "attempt": attempt.attempt,
                    "requests": [
                        {k: r[k] for k in ("correlation_id", "trigger_reason", "actor_type", "actor_id")}
                        for r in requests
                    ],
                },
            )
            attempt.complete(conn)
            self._probe("recalculation.before_commit")
        return Applied(job_id, property_id, result.score, prop["compliance_score"], drift is not None)

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


class Recalculator:
    """The runner with the recalculation handler, answering Applied for a completed job: what
    the worker runs for RECALCULATE_TASK, and what tests and models drive directly."""

    def __init__(
        self,
        *,
        connection: ConnectionFactory,
        policy: RecalculationPolicy,
        today: Callable[[], date],
        probe: Callable[[str], None] = _nothing,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.handler = RecalculationHandler(today=today, lock_timeout_ms=policy.lock_timeout_ms, probe=probe)
        self.runner = JobRunner(handler=self.handler, connection=connection, policy=policy.runner_policy(),
                                probe=probe, rand=rand)

    def run(
        self,
        job_id: int,
        *,
        redelivered: bool = False,
        resume_attempt: int | None = None,
        infra_failures: int = 0,
        worker: str | None = None,
    ) -> Applied | Dropped | RetryLater | Dead:
        outcome: Outcome = self.runner.run(job_id, redelivered=redelivered, resume_attempt=resume_attempt,
                                           infra_failures=infra_failures, worker=worker)
        return outcome.result if isinstance(outcome, Completed) else outcome


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
