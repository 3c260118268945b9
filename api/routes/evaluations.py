"""Property evaluations over HTTP: submit one (202 with the job), then watch it through the
shared job routes (`GET /api/jobs/{id}`, its `stream_url`, cancel, resume); its result names the
evaluation snapshot, `GET /api/evaluations/{id}`, which outlives the job."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import Field, StringConstraints, model_validator

from api.dependencies import Conn, IdempotencyKey, replay_response
from api.job_submission import submit_job
from api.problems import COMMON_RESPONSES, CONFLICT_RESPONSES
from api.routes.jobs import JobOut
from api.schemas import DisplayText, StrictModel
from api.security import Client, WatcherCaller
from services import evaluations, property_views

router = APIRouter(prefix="/api/evaluations", tags=["evaluations"], responses=COMMON_RESPONSES)

EvaluationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class EvaluationIn(StrictModel):
    property_id: int | None = Field(default=None, ge=1, le=2**63 - 1,
                                    description="One of your properties; or give `address` instead")
    address: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300),
                       DisplayText] | None = Field(default=None, description="An address not yet onboarded")

    @model_validator(mode="after")
    def _exactly_one(self) -> EvaluationIn:
        if (self.property_id is None) == (self.address is None):
            raise ValueError("give exactly one of property_id and address")
        return self


class EvaluationOut(StrictModel):
    id: int
    job_id: int
    property_id: int | None
    address: str
    summary: dict[str, Any]
    answers: dict[str, Any] = Field(description="What each stage's provider answered, by stage key")
    created_at: datetime


@router.post("", status_code=202, response_model=JobOut, responses={**CONFLICT_RESPONSES, **replay_response(JobOut)})
def submit_evaluation(body: EvaluationIn, caller: Client, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """Starts an evaluation of one of your properties, or of an address: 202 with the job, its
    stages and its `stream_url`. One at a time per property (or address): a second answers 409
    with `active_job_id`, the one to watch."""
    if body.property_id is not None:
        address = property_views.owned_property(conn, caller.client_id, body.property_id).name
    else:
        assert body.address is not None
        address = body.address
    return submit_job(
        conn, request, WatcherCaller(caller.actor, is_admin=False), key, task=evaluations.EVALUATE_TASK,
        lock_key=evaluations.lock_key(caller.client_id, body.property_id, address),
        payload=evaluations.payload_of(caller.client_id, body.property_id, address),
        values=body.model_dump(),
    )


@router.get("/{evaluation_id}", response_model=EvaluationOut)
def read_evaluation(evaluation_id: EvaluationId, caller: Client, conn: Conn) -> Any:
    """What a finished evaluation found (the job's `result.evaluation_id`); it stays after the
    job's own status has expired."""
    found = evaluations.snapshot_of_client(conn, caller.client_id, evaluation_id)
    return EvaluationOut(id=found.id, job_id=found.job_id, property_id=found.property_id, address=found.address,
                         summary=found.summary, answers=found.answers, created_at=found.created_at)
