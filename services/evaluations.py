"""Property evaluations: a dozen slow external look-ups, one stage each, watched by a person.

The handler asks each stage's provider in turn and commits the answer as the job's checkpoint
in its own unit, so a retry, a takeover after a dead worker, or a resume after a failure carries
on at the first unanswered stage: a finished stage's provider is never called again. The HTTP
call happens between units, never inside one: no transaction stays open while a provider
thinks. The last unit writes the evaluation's snapshot and completes the job in one
transaction, so the snapshot exists exactly when the job is done, and it outlives the job.

A client asks for an evaluation of one of its properties or of an address it has not onboarded;
one evaluation per client and property (or address) is active at a time.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox import watched
from outbox.attempt import Attempt
from outbox.runner import DeadJob
from outbox.watched import Stage
from services.errors import EvaluationNotFound
from services.providers import ProviderClient
from services.queries import QUERIES

EVALUATE_TASK = "evaluation.evaluate_property"
#: The Celery queue the task's row names: evaluations have workers of their own.
EVALUATION_QUEUE = "evaluations"
STAGES = (
    Stage("locate_address", "Locating the address"),
    Stage("energy_register", "Checking the energy performance register"),
    Stage("gas_register", "Checking the gas safety register"),
    Stage("electrical_register", "Checking electrical safety records"),
    Stage("flood_risk", "Assessing flood risk"),
    Stage("licensing", "Checking landlord licensing"),
    Stage("planning", "Checking planning and building control"),
    Stage("council_tax", "Looking up the council tax band"),
    Stage("broadband", "Checking broadband coverage"),
    Stage("radon", "Checking the radon map"),
    Stage("crime", "Reviewing local crime figures"),
    Stage("saving_results", "Saving your results"),
)
#: The stages that ask a provider (all but the last, which saves).
LOOKUPS = tuple(s.key for s in STAGES[:-1])


def lock_key(client_id: int, property_id: int | None, address: str) -> str:
    """One active evaluation per client and property, or per client and address (the same
    address however it is spaced or cased)."""
    if property_id is not None:
        return f"evaluation:{client_id}:property:{property_id}"
    folded = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", address)).strip().casefold()
    return f"evaluation:{client_id}:address:{folded}"


def payload_of(client_id: int, property_id: int | None, address: str) -> dict[str, Any]:
    return {"client_id": client_id, "property_id": property_id, "address": address}


def request_evaluation(conn: psycopg.Connection, *, client_id: int, property_id: int | None, address: str,
                       correlation_id: str) -> int:
    """Submits an evaluation in the caller's transaction (a script's way; HTTP goes through the
    API's idempotent submission); its job id. ActiveJobExists while one is active."""
    return watched.submit(conn, task=EVALUATE_TASK, coalescing_key=lock_key(client_id, property_id, address),
                          payload=payload_of(client_id, property_id, address), correlation_id=correlation_id,
                          trigger_reason="submitted", actor_type="client", actor_id=str(client_id)).job_id


@dataclass(frozen=True, slots=True)
class EvaluationSnapshot:
    id: int
    client_id: int
    property_id: int | None
    address: str
    job_id: int
    answers: dict[str, Any]
    summary: dict[str, Any]
    created_at: datetime


class EvaluationHandler:
    """Payload: {"client_id", "property_id" (or null), "address"}. Checkpoint: {stage: answer}."""

    watched = True

    def __init__(self, providers: ProviderClient) -> None:
        self.providers = providers

    def run(self, attempt: Attempt) -> dict[str, Any]:
        payload = attempt.payload
        address = str(payload["address"])
        answers: dict[str, Any] = dict(attempt.cursor or {})
        for stage in LOOKUPS:
            if stage in answers:
                continue
            attempt.progress(stage=stage, current=len(answers), total=len(LOOKUPS))
            attempt.heartbeat(force=True)  # the lease outlives a slow stage, and a lost job stops here
            answer = self.providers.lookup(stage, address)
            with attempt.unit() as conn:
                answers[stage] = answer
                attempt.checkpoint(conn, answers)
        attempt.progress(stage="saving_results", current=len(LOOKUPS), total=len(LOOKUPS))
        attempt.flush_progress()
        with attempt.unit() as conn:
            evaluation_id = save_snapshot(conn, job_id=attempt.job_id, client_id=int(payload["client_id"]),
                                          property_id=payload.get("property_id"), address=address, answers=answers)
            result = {"evaluation_id": evaluation_id}
            attempt.complete(conn, result)
        return result

    def on_dead(self, conn: psycopg.Connection, job: DeadJob) -> None:
        """Nothing to undo: an evaluation changes nothing until its last unit."""


def summarise(answers: dict[str, Any]) -> dict[str, Any]:
    """The few facts a person reads first."""
    location = answers.get("locate_address", {})
    return {
        "postcode": location.get("postcode"),
        "energy_rating": answers.get("energy_register", {}).get("rating"),
        "flood_risk": answers.get("flood_risk", {}).get("band"),
        "stages_answered": sum(1 for stage in LOOKUPS if stage in answers),
    }


def save_snapshot(conn: psycopg.Connection, *, job_id: int, client_id: int, property_id: int | None, address: str,
                  answers: dict[str, Any]) -> int:
    row = conn.execute(QUERIES["ev_insert_snapshot"], {
        "client_id": client_id, "property_id": property_id, "address": address, "job_id": job_id,
        "answers": Jsonb(answers), "summary": Jsonb(summarise(answers)),
    }).fetchone()
    assert row is not None
    return int(row[0])


def snapshot_of_client(conn: psycopg.Connection, client_id: int, evaluation_id: int) -> EvaluationSnapshot:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(QUERIES["ev_snapshot_of_client"],
                          {"client_id": client_id, "evaluation_id": evaluation_id}).fetchone()
    if row is None:
        raise EvaluationNotFound(f"evaluation {evaluation_id} does not exist")
    return EvaluationSnapshot(**row)


def snapshots_of_client(conn: psycopg.Connection, client_id: int, *, limit: int = 50) -> list[EvaluationSnapshot]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(QUERIES["ev_snapshots_of_client"], {"client_id": client_id, "limit": limit}).fetchall()
    return [EvaluationSnapshot(**row) for row in rows]
