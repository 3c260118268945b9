"""The domain's closed vocabularies: who acts, why a recalculation is asked for, audit actions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ActorType(StrEnum):
    CLIENT = "client"
    ADMIN = "admin"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Actor:
    type: ActorType
    id: str | None = None

    @classmethod
    def system(cls, name: str) -> Actor:
        return cls(ActorType.SYSTEM, name)


class TriggerReason(StrEnum):
    """Why a recalculation was requested: one per trigger site (R-A5)."""

    CLIENT_UPLOAD = "client_upload"
    CLIENT_BULK_UPLOAD = "client_bulk_upload"
    CLIENT_ZIP_UPLOAD = "client_zip_upload"
    CLIENT_DELETE = "client_delete"
    ADMIN_UPLOAD = "admin_upload"
    ADMIN_DELETE = "admin_delete"
    VERIFY = "verify"
    REJECT = "reject"
    AI_APPLY = "ai_apply"
    PROPERTY_CREATE = "property_create"
    PROPERTY_UPDATE = "property_update"
    PROVISIONING = "provisioning"
    EXPIRY_ROLLOVER = "expiry_rollover"
    MANUAL_RECALCULATION = "manual_recalculation"
    DRIFT_SWEEP = "drift_sweep"


class AuditAction(StrEnum):
    COMPLIANCE_SCORE_UPDATED = "COMPLIANCE_SCORE_UPDATED"
    COMPLIANCE_RECALC_FAILED = "COMPLIANCE_RECALC_FAILED"
    COMPLIANCE_SCORE_DRIFT_DETECTED = "COMPLIANCE_SCORE_DRIFT_DETECTED"
    PROPERTY_CREATED = "PROPERTY_CREATED"
    CLIENT_PROVISIONED = "CLIENT_PROVISIONED"
    DOCUMENT_UPLOADED = "DOCUMENT_UPLOADED"
    DOCUMENT_DELETED = "DOCUMENT_DELETED"
    DOCUMENT_VERIFIED = "DOCUMENT_VERIFIED"
    DOCUMENT_REJECTED = "DOCUMENT_REJECTED"
    AI_SUGGESTION_APPLIED = "AI_SUGGESTION_APPLIED"
    CLIENT_TOKEN_ISSUED = "CLIENT_TOKEN_ISSUED"
    CLIENT_TOKEN_REVOKED = "CLIENT_TOKEN_REVOKED"
    JOB_REQUEUED = "JOB_REQUEUED"


RECALCULATE_TASK = "compliance.recalculate_property"
