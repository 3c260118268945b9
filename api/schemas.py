"""Response and request models shared by the client and admin routers.

Request models forbid unknown fields: a misspelt field is an error the caller hears about,
not a value silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from services.display_text import unsafe_characters
from services.scoring import DocumentStatus, RequirementState

RequirementCode = str  # validated against services.scoring.REQUIREMENTS where accepted as input


def _refuse_unsafe(value: str, *, multiline: bool = False) -> str:
    bad = unsafe_characters(value, multiline=multiline)
    if bad:
        raise PydanticCustomError("printable_text", "contains characters that hide or reorder text: {chars}",
                                  {"chars": ", ".join(bad)})
    return value


#: What services.display_text refuses, as a regex character class (for the OpenAPI document, so
#: a client generating requests from it generates acceptable ones): C0 and C1 controls, line and
#: paragraph separators, bidi controls. (An unpaired surrogate, which no UTF-8 body can carry
#: but a JSON escape can, is refused too, though a regex class of them confuses generators.)
_UNSAFE = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_BUT_LINES = _UNSAFE.replace(r"\x00-\x1f", r"\x00-\x08\x0b-\x1f")
LINE_PATTERN = rf"^[^{_UNSAFE}]*$"
NAME_PATTERN = rf"^[^{_UNSAFE}]*[^\s{_UNSAFE}][^{_UNSAFE}]*$"
MULTILINE_PATTERN = rf"^[^{_UNSAFE_BUT_LINES}]*$"


@dataclass(frozen=True)
class _TextRule:
    """Refuses unsafe characters with rule `printable_text` (naming them), and documents the
    rule as the field's `pattern`."""

    pattern: str
    multiline: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            lambda value: _refuse_unsafe(value, multiline=self.multiline), handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        json_schema = handler(schema)
        json_schema["pattern"] = self.pattern
        return json_schema


#: A name a person reads: not blank; no control, separator or bidi characters.
DisplayName = _TextRule(NAME_PATTERN)
#: One line of text (a label; may be empty).
DisplayText = _TextRule(LINE_PATTERN)
#: Text of several lines (a reason), which may also hold line feeds and tabs.
MultilineText = _TextRule(MULTILINE_PATTERN, multiline=True)


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
