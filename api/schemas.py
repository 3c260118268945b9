"""Response and request models shared by the client and admin routers.

Request models forbid unknown fields: a misspelt field is an error the caller hears about,
not a value silently ignored.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from services.display_text import unsafe_characters
from services.scoring import DocumentStatus, RequirementState

RequirementCode = str  # validated against services.scoring.REQUIREMENTS where accepted as input


def _refuse_unsafe(value: str, *, multiline: bool = False) -> str:
    bad = unsafe_characters(value, multiline=multiline)
    if bad:
        raise PydanticCustomError("printable_text", "contains characters that hide or reorder text: {chars}",
                                  {"chars": ", ".join(bad)})
    return value


#: Text a person reads on one line (a name, a label): no control, separator or bidi characters.
DisplayText = AfterValidator(_refuse_unsafe)
#: The same for text of several lines (a reason), which may also hold line feeds and tabs.
MultilineText = AfterValidator(lambda value: _refuse_unsafe(value, multiline=True))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreStatus(StrEnum):
    """What a client shows: the score is current, being recomputed ("Updating…"), or its
    recalculation failed for good and an operator has to look (DEAD job)."""

    UP_TO_DATE = "up_to_date"
    UPDATING = "updating"
    FAILED = "failed"


class RequirementResultOut(BaseModel):
    requirement: str
    state: RequirementState
    credit: float
    weight: int
    document_id: int | None
    expires_at: date | None


class BreakdownOut(BaseModel):
    version: int
    as_of: date
    requirements: list[RequirementResultOut]


class PropertyOut(BaseModel):
    id: int
    client_id: int
    name: str
    has_gas_supply: bool
    compliance_score: int | None = Field(description="0-100; null until the first recalculation lands")
    compliance_breakdown: BreakdownOut | None
    compliance_version: int | None
    compliance_last_calculated_at: datetime | None
    compliance_score_pending: bool = Field(description="True while a recalculation is queued or running")
    status: ScoreStatus
    created_at: datetime


class DocumentOut(BaseModel):
    id: int
    property_id: int
    requirement_code: str
    status: DocumentStatus
    expires_at: date | None
    file_name: str
    size_bytes: int
    sha256: str
    source: str
    rejection_reason: str | None
    created_at: datetime
    updated_at: datetime


class RecalculationRef(BaseModel):
    """The recalculation a change asked for. Several changes may share one job (coalescing)."""

    job_id: int
    property_id: int
