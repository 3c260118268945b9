"""Compliance score, formula version 1 (docs/scoring.md), as a pure function of inputs and a date.

No clock, no database: the same inputs and the same as-of date give the same score and the
same breakdown, byte for byte (`breakdown_json`). Credits are kept in tenths and the score is
rounded half up with integer arithmetic, so no float ever decides a score.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

VERSION = 1

#: Requirement weights, in the order the breakdown lists them.
WEIGHTS: dict[str, int] = {
    "gas_safety": 25,
    "eicr": 20,
    "epc": 15,
    "smoke_co_alarms": 15,
    "fire_risk_assessment": 15,
    "legionella": 10,
}
REQUIREMENTS = tuple(WEIGHTS)
#: What a person reads for each requirement (the pages; the API keeps the codes).
REQUIREMENT_NAMES: dict[str, str] = {
    "gas_safety": "Gas safety record",
    "eicr": "Electrical installation report (EICR)",
    "epc": "Energy performance certificate (EPC)",
    "smoke_co_alarms": "Smoke and CO alarms",
    "fire_risk_assessment": "Fire risk assessment",
    "legionella": "Legionella risk assessment",
}
EXPIRING_WINDOW = timedelta(days=30)


class DocumentStatus(StrEnum):
    PENDING_VERIFICATION = "pending_verification"
    VERIFIED = "verified"
    REJECTED = "rejected"


class RequirementState(StrEnum):
    VALID = "valid"
    EXPIRING_SOON = "expiring_soon"
    PENDING_VERIFICATION = "pending_verification"
    EXPIRED = "expired"
    REJECTED = "rejected"
    MISSING = "missing"


#: Credit in tenths, and the preference among documents of equal credit (lower is better).
_CREDIT_TENTHS = {
    RequirementState.VALID: 10,
    RequirementState.EXPIRING_SOON: 7,
    RequirementState.PENDING_VERIFICATION: 5,
    RequirementState.EXPIRED: 0,
    RequirementState.REJECTED: 0,
    RequirementState.MISSING: 0,
}
_STATE_RANK = {state: rank for rank, state in enumerate(RequirementState)}


@dataclass(frozen=True, slots=True)
class Document:
    id: int
    requirement_code: str
    status: DocumentStatus
    expires_at: date | None


@dataclass(frozen=True, slots=True)
class ScoringInputs:
    has_gas_supply: bool
    #: Live (not deleted) documents of the property.
    documents: tuple[Document, ...]

    @classmethod
    def of(cls, has_gas_supply: bool, documents: Iterable[Document]) -> ScoringInputs:
        return cls(has_gas_supply, tuple(sorted(documents, key=lambda d: d.id)))

    def fingerprint(self) -> str:
        """Identifies everything the score depends on except the date (and the formula version).

        Sorted here, not only in `of`, so inputs built in any document order share one fingerprint.
        """
        canonical = {
            "version": VERSION,
            "has_gas_supply": self.has_gas_supply,
            "documents": [
                [d.id, d.requirement_code, str(d.status), _iso(d.expires_at)]
                for d in sorted(self.documents, key=lambda d: d.id)
                if d.requirement_code in WEIGHTS
            ],
        }
        return hashlib.sha256(_canonical_json(canonical).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RequirementResult:
    requirement: str
    state: RequirementState
    weight: int
    document_id: int | None
    expires_at: date | None

    @property
    def credit(self) -> float:
        return _CREDIT_TENTHS[self.state] / 10

    def as_json(self) -> dict[str, Any]:
        return {
            "requirement": self.requirement,
            "state": str(self.state),
            "credit": self.credit,
            "weight": self.weight,
            "document_id": self.document_id,
            "expires_at": _iso(self.expires_at),
        }


@dataclass(frozen=True, slots=True)
class Score:
    score: int
    version: int
    as_of: date
    requirements: tuple[RequirementResult, ...]

    def breakdown(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "as_of": self.as_of.isoformat(),
            "requirements": [r.as_json() for r in self.requirements],
        }

    def breakdown_json(self) -> str:
        return _canonical_json(self.breakdown())


def document_state(document: Document, as_of: date) -> RequirementState:
    if document.status is DocumentStatus.REJECTED:
        return RequirementState.REJECTED
    if document.expires_at is not None and document.expires_at < as_of:
        return RequirementState.EXPIRED
    if document.status is DocumentStatus.PENDING_VERIFICATION:
        return RequirementState.PENDING_VERIFICATION
    if document.expires_at is not None and document.expires_at <= as_of + EXPIRING_WINDOW:
        return RequirementState.EXPIRING_SOON
    return RequirementState.VALID


def score(inputs: ScoringInputs, as_of: date) -> Score:
    results = []
    for requirement, weight in WEIGHTS.items():
        if requirement == "gas_safety" and not inputs.has_gas_supply:
            continue
        candidates = [d for d in inputs.documents if d.requirement_code == requirement]
        results.append(_best(requirement, weight, candidates, as_of))
    total_weight = sum(r.weight for r in results)
    earned_tenths = sum(r.weight * _CREDIT_TENTHS[r.state] for r in results)
    # 100 * earned / (10 * total), rounded half up, in integers.
    numerator, denominator = 100 * earned_tenths, 10 * total_weight
    value = (2 * numerator + denominator) // (2 * denominator)
    return Score(score=value, version=VERSION, as_of=as_of, requirements=tuple(results))


def _best(requirement: str, weight: int, documents: list[Document], as_of: date) -> RequirementResult:
    if not documents:
        return RequirementResult(requirement, RequirementState.MISSING, weight, None, None)

    def preference(d: Document) -> tuple[int, int, date, int]:
        state = document_state(d, as_of)
        # Most credit first; then the more telling state; then the latest expiry (none = never
        # expires = latest); then the newest document.
        return (
            -_CREDIT_TENTHS[state],
            _STATE_RANK[state],
            _negated(d.expires_at),
            -d.id,
        )

    chosen = min(documents, key=preference)
    return RequirementResult(
        requirement, document_state(chosen, as_of), weight, chosen.id, chosen.expires_at
    )


def _negated(expires_at: date | None) -> date:
    """Sorts later dates first, with 'no expiry' before any date."""
    if expires_at is None:
        return date.min
    return date.min + (date.max - expires_at)


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
