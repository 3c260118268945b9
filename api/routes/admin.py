"""Admin endpoints (X-API-Key): any property's documents, provisioning, recalculation status.

Every mutation runs through a service that writes its change, its outbox request and the
pending flag in one transaction; nothing here computes a score. The Idempotency-Key header
becomes the correlation id, and a replay answers 200 with `Idempotent-Replayed: true` and what
the first request made, looked up from what it left: its outbox requests, or its audit row
for the changes the outbox does not see (tokens, requeues).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, File, Form, Path, Query, Request, Response, UploadFile
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StringConstraints
from pydantic_core import PydanticCustomError

from api.dependencies import Conn, IdempotencyKey, Limits, Store, correlation_id, replay_response
from api.idempotency import KEY_HEADER, Record, answer_once, answer_once_within, keyed
from api.problems import COMMON_RESPONSES, CONFLICT_RESPONSES, UPLOAD_RESPONSES
from api.schemas import (
    BreakdownOut,
    DisplayName,
    DisplayText,
    DocumentOut,
    MultilineText,
    RecalculationRef,
    ScoreStatus,
    StrictModel,
)
from api.security import Admin
from outbox import JobStatus
from services import admin_views, audit, property_views
from services.client_tokens import IssuedToken, issue_token, revoke_token, tokens_of_client
from services.documents import (
    DocumentsAdded,
    DocumentSource,
    delete_document,
    property_of_document,
    reject_document,
    verify_document,
)
from services.errors import ClientNotFound
from services.properties import NewProperty, provision_client
from services.recalc_requests import request_manual_recalculation
from services.scoring import REQUIREMENTS, DocumentStatus
from services.uploads import IncomingFile, inspect_file, store_and_add_documents
from services.vocabulary import AuditAction, TriggerReason

router = APIRouter(prefix="/api/admin", tags=["admin"], responses=COMMON_RESPONSES)

#: Ids are bigints: a larger number is "no such id" (422 here), never a database error.
MAX_ID = 2**63 - 1
TOKEN_SHOWN_ONCE = (
    "a token is shown only when it is issued; this replay does not show it again. "
    "Issue a new one with POST /api/admin/clients/{client_id}/tokens"
)


def _id(what: str) -> Any:
    return Path(ge=1, le=MAX_ID, description=f"The {what}'s id")


ClientId = Annotated[int, _id("client")]
PropertyId = Annotated[int, _id("property")]
DocumentId = Annotated[int, _id("document")]
TokenId = Annotated[int, _id("token")]
JobId = Annotated[int, _id("job")]

#: No NUL characters: PostgreSQL text cannot hold them.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), DisplayName]


def _iso_date_only(value: object) -> object:
    """Pydantic's lax dates also take numbers as Unix times ("0" is 1970-01-01); a form field
    that means a date must look like one."""
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise PydanticCustomError("date_format", "must be a date written YYYY-MM-DD")
    return value


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
IsoDate = Annotated[date, BeforeValidator(_iso_date_only)]


# ---------------------------------------------------------------------------------------------
# Provisioning and tokens
# ---------------------------------------------------------------------------------------------


class NewPropertyIn(StrictModel):
    name: Name
    has_gas_supply: StrictBool = True


class ProvisionIn(StrictModel):
    name: Name = Field(description="The client's name, 1-200 characters")
    properties: list[NewPropertyIn] = Field(default_factory=list, max_length=1000,
                                            description="0 to 1000 properties, each queued for its first score")


class ProvisionedPropertyOut(BaseModel):
    property_id: int
    job_id: int


class IssuedTokenOut(BaseModel):
    token_id: int
    token: str | None = Field(description="The secret, shown only in the response that issues it; "
                              "null when answering a replay")
    label: str
    created_at: datetime
    note: str | None = None


class ProvisionedClientOut(BaseModel):
    client_id: int
    properties: list[ProvisionedPropertyOut]
    token: IssuedTokenOut | None = Field(description="The client's first token; null when answering a replay")
    note: str | None = None


class TokenIn(StrictModel):
    label: Annotated[str, StringConstraints(max_length=100), DisplayText] = ""


class TokenOut(BaseModel):
    token_id: int
    label: str
    created_at: datetime
    revoked_at: datetime | None


def _issued(issued: IssuedToken) -> IssuedTokenOut:
    return IssuedTokenOut(token_id=issued.token_id, token=issued.token, label=issued.label,
                          created_at=issued.created_at)


@router.post("/clients", status_code=201, response_model=ProvisionedClientOut,
             responses=replay_response(ProvisionedClientOut))
def provision(body: ProvisionIn, admin: Admin, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """Creates a client with its properties (each queued for its first score, trigger
    `provisioning`) and its first API token, all in one transaction. The token is shown once."""

    def change() -> ProvisionedClientOut:
        made = provision_client(
            conn, name=body.name,
            properties=[NewProperty(p.name, has_gas_supply=p.has_gas_supply) for p in body.properties],
            actor=admin.actor, correlation_id=correlation_id(admin.actor, key),
        )
        issued = issue_token(conn, client_id=made.client_id, label="issued at provisioning")
        return ProvisionedClientOut(
            client_id=made.client_id,
            properties=[ProvisionedPropertyOut(property_id=p.property_id, job_id=p.job_id) for p in made.properties],
            token=_issued(issued),
        )

    def without_secret(made: ProvisionedClientOut) -> ProvisionedClientOut:
        return made.model_copy(update={"token": None, "note": _shown_once(made.client_id)})

    return answer_once(conn, keyed(request, admin.actor, key, body.model_dump()), change, replay_as=without_secret)


def _shown_once(client_id: int) -> str:
    return TOKEN_SHOWN_ONCE.replace("{client_id}", str(client_id))


@router.post("/clients/{client_id}/tokens", status_code=201, response_model=IssuedTokenOut,
             responses=replay_response(IssuedTokenOut))
def issue_client_token(client_id: ClientId, body: TokenIn, admin: Admin, conn: Conn, key: IdempotencyKey,
                       request: Request) -> Any:
    """Issues another token for the client (rotation: issue, move callers, revoke the old one).
    The secret is in this response only; the server keeps its hash."""

    def change() -> IssuedTokenOut:
        if not admin_views.lock_client(conn, client_id):
            raise ClientNotFound(f"client {client_id} does not exist")
        issued = issue_token(conn, client_id=client_id, label=body.label)
        audit.record(conn, AuditAction.CLIENT_TOKEN_ISSUED, admin.actor, client_id=client_id,
                     correlation_id=correlation_id(admin.actor, key), details={"token_id": issued.token_id})
        return _issued(issued)

    def without_secret(made: IssuedTokenOut) -> IssuedTokenOut:
        return made.model_copy(update={"token": None, "note": _shown_once(client_id)})

    return answer_once(conn, keyed(request, admin.actor, key, body.model_dump()), change, replay_as=without_secret)


@router.get("/clients/{client_id}/tokens", response_model=list[TokenOut])
def list_client_tokens(client_id: ClientId, _: Admin, conn: Conn) -> list[TokenOut]:
    """The client's tokens, live and revoked, oldest first; never their secrets."""
    return [TokenOut(token_id=t.token_id, label=t.label, created_at=t.created_at, revoked_at=t.revoked_at)
            for t in tokens_of_client(conn, client_id=client_id)]


@router.delete("/clients/{client_id}/tokens/{token_id}", status_code=204, response_class=Response,
               responses=replay_response(TokenOut))
def revoke_client_token(client_id: ClientId, token_id: TokenId, admin: Admin, conn: Conn,
                        key: IdempotencyKey, request: Request) -> Response:
    """Revokes a token: the next request that presents it is refused. A replay answers 200 with
    the revoked token."""

    def change() -> TokenOut:
        if not admin_views.lock_client(conn, client_id):
            raise ClientNotFound(f"client {client_id} does not exist")
        revoke_token(conn, client_id=client_id, token_id=token_id)
        audit.record(conn, AuditAction.CLIENT_TOKEN_REVOKED, admin.actor, client_id=client_id,
                     correlation_id=correlation_id(admin.actor, key), details={"token_id": token_id})
        token = admin_views.token(conn, client_id, token_id)
        assert token is not None
        return TokenOut(**token)

    answer = answer_once(conn, keyed(request, admin.actor, key), change)
    return answer if isinstance(answer, Response) else Response(status_code=204, headers={KEY_HEADER: key})


# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


class DocumentsAddedOut(BaseModel):
    documents: list[DocumentOut]
    recalculation: RecalculationRef


class DocumentDeletedOut(BaseModel):
    document_id: int
    property_id: int
    recalculation: RecalculationRef


class DocumentChangedOut(BaseModel):
    document: DocumentOut
    recalculation: RecalculationRef


class RejectIn(StrictModel):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
                      MultilineText] = Field(description="Why, 1-500 characters")


def _document(view: property_views.DocumentView) -> DocumentOut:
    return DocumentOut.model_validate(view, from_attributes=True)


@router.post("/properties/{property_id}/documents", status_code=201, response_model=DocumentsAddedOut,
             responses={**UPLOAD_RESPONSES, **replay_response(DocumentsAddedOut)})
def upload_document(
    property_id: PropertyId,
    admin: Admin,
    conn: Conn,
    store: Store,
    limits: Limits,
    key: IdempotencyKey,
    request: Request,
    file: Annotated[UploadFile, File(description="A PDF or UTF-8 text file, not empty",
                                     json_schema_extra={"minLength": 1})],
    requirement_code: Annotated[Literal[REQUIREMENTS], Form(description="The requirement it evidences")],  # type: ignore[valid-type]
    expires_at: Annotated[IsoDate | None, Form(
        description="Valid through this date (YYYY-MM-DD); empty or absent: it does not expire",
        # A multipart field is text: "no expiry" is an absent or empty field, never a JSON null.
        json_schema_extra={"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "maxLength": 0}]},
    )] = None,
    status: Annotated[Literal["pending_verification", "verified"],
                      Form(description="An admin may add a document already verified")] = "pending_verification",
) -> Any:
    """Adds a document to any property (trigger `admin_upload`); an admin may add it verified."""
    # One byte past the limit is enough for inspect_file to refuse an oversize file.
    content = file.file.read(limits.max_file_bytes + 1)
    inspected = inspect_file(IncomingFile(file.filename or "", content, file.content_type), limits)
    sent = [inspected.sha256, inspected.file_name, requirement_code, expires_at, status]

    def change(record: Record) -> DocumentsAddedOut:
        answer: list[DocumentsAddedOut] = []

        def before_commit(tx: psycopg.Connection, added: DocumentsAdded) -> None:
            documents = property_views.documents_by_ids(tx, property_id, list(added.document_ids))
            answer.append(DocumentsAddedOut(
                documents=[_document(d) for d in documents],
                recalculation=RecalculationRef(job_id=added.job_id, property_id=property_id)))
            record(tx, answer[0])

        store_and_add_documents(
            conn, store, property_id=property_id, files=[(inspected, requirement_code, expires_at)],
            status=DocumentStatus(status), source=DocumentSource.ADMIN, actor=admin.actor,
            trigger=TriggerReason.ADMIN_UPLOAD, correlation_id=correlation_id(admin.actor, key),
            reconnect=request.app.state.runtime.connection, before_commit=before_commit,
        )
        return answer[0]

    return answer_once_within(conn, keyed(request, admin.actor, key, sent), change)


@router.delete("/documents/{document_id}", response_model=DocumentDeletedOut,
               responses=replay_response(DocumentDeletedOut))
def delete_any_document(document_id: DocumentId, admin: Admin, conn: Conn, key: IdempotencyKey,
                        request: Request) -> Any:
    """Soft-deletes a document of any property (trigger `admin_delete`); its file is kept."""

    def change() -> DocumentDeletedOut:
        changed = delete_document(conn, document_id=document_id, actor=admin.actor,
                                  trigger=TriggerReason.ADMIN_DELETE, correlation_id=correlation_id(admin.actor, key))
        return DocumentDeletedOut(document_id=document_id, property_id=changed.property_id,
                                  recalculation=RecalculationRef(job_id=changed.job_id,
                                                                 property_id=changed.property_id))

    return answer_once(conn, keyed(request, admin.actor, key), change)


def _changed(conn: psycopg.Connection, document_id: int, job_id: int | None) -> DocumentChangedOut:
    property_id = property_of_document(conn, document_id)
    document = property_views.document_of_property(conn, property_id, document_id, include_deleted=True)
    assert job_id is not None
    return DocumentChangedOut(document=_document(document),
                              recalculation=RecalculationRef(job_id=job_id, property_id=property_id))


@router.post("/documents/{document_id}/verify", response_model=DocumentChangedOut,
             responses={**CONFLICT_RESPONSES, **replay_response(DocumentChangedOut)})
def verify(document_id: DocumentId, admin: Admin, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """Marks a document verified (trigger `verify`); 409 if it already is."""

    def change() -> DocumentChangedOut:
        changed = verify_document(conn, document_id=document_id, actor=admin.actor,
                                  correlation_id=correlation_id(admin.actor, key))
        return _changed(conn, document_id, changed.job_id)

    return answer_once(conn, keyed(request, admin.actor, key), change)


@router.post("/documents/{document_id}/reject", response_model=DocumentChangedOut,
             responses={**CONFLICT_RESPONSES, **replay_response(DocumentChangedOut)})
def reject(document_id: DocumentId, body: RejectIn, admin: Admin, conn: Conn, key: IdempotencyKey,
           request: Request) -> Any:
    """Marks a document rejected with a reason (trigger `reject`); 409 if it already is."""

    def change() -> DocumentChangedOut:
        changed = reject_document(conn, document_id=document_id, reason=body.reason, actor=admin.actor,
                                  correlation_id=correlation_id(admin.actor, key))
        return _changed(conn, document_id, changed.job_id)

    return answer_once(conn, keyed(request, admin.actor, key, body.model_dump()), change)


# ---------------------------------------------------------------------------------------------
# Recalculation: request, status, history
# ---------------------------------------------------------------------------------------------


class CurrentScoreOut(BaseModel):
    score: int | None = Field(description="0-100; null until the first recalculation lands")
    breakdown: BreakdownOut | None
    version: int | None
    calculated_at: datetime | None
    pending: bool = Field(description="True while a recalculation is queued or running")
    status: ScoreStatus


class SnapshotOut(BaseModel):
    job_id: int
    score: int
    breakdown: BreakdownOut
    version: int
    as_of: date
    calculated_at: datetime


class ScoreHistoryOut(BaseModel):
    property_id: int
    current: CurrentScoreOut
    snapshots: list[SnapshotOut] = Field(description="One per applied recalculation, newest first")


class JobRequestOut(BaseModel):
    trigger_reason: str
    actor_type: str
    actor_id: str | None
    correlation_id: str
    created_at: datetime


class KeyJobOut(BaseModel):
    job_id: int
    status: JobStatus
    attempts: int
    max_attempts: int
    last_error: str | None
    next_run_at: datetime
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    celery_task_id: str
    requests: list[JobRequestOut] = Field(description=f"Who asked for this job, oldest first, at most "
                                          f"{admin_views.REQUESTS_PER_JOB}")
    requests_total: int = Field(description="How many requests the job carries in all")


class RecalcStatusOut(BaseModel):
    property_id: int
    pending: bool
    status: ScoreStatus
    last_calculated_at: datetime | None
    score: int | None
    jobs: list[KeyJobOut] = Field(description=f"The property's latest {admin_views.STATUS_JOBS} jobs, newest first")


@router.post("/properties/{property_id}/recalculate", status_code=202, response_model=RecalculationRef,
             responses=replay_response(RecalculationRef))
def recalculate(property_id: PropertyId, admin: Admin, conn: Conn, key: IdempotencyKey, request: Request) -> Any:
    """Queues a fresh recalculation (trigger `manual_recalculation`); it also checks for drift."""

    def change() -> RecalculationRef:
        job_id = request_manual_recalculation(conn, property_id, actor=admin.actor,
                                              correlation_id=correlation_id(admin.actor, key))
        return RecalculationRef(job_id=job_id, property_id=property_id)

    return answer_once(conn, keyed(request, admin.actor, key), change)


@router.get("/properties/{property_id}/compliance-score-history", response_model=ScoreHistoryOut)
def score_history(property_id: PropertyId, _: Admin, conn: Conn,
                  limit: Annotated[int, Query(ge=1, le=admin_views.MAX_PAGE_SIZE)] = 50) -> Any:
    """The current score and the latest `limit` snapshots, newest first."""
    return admin_views.score_history(conn, property_id, limit=limit)


@router.get("/properties/{property_id}/compliance-recalc-status", response_model=RecalcStatusOut)
def recalc_status(property_id: PropertyId, _: Admin, conn: Conn) -> Any:
    """Whether a recalculation is pending, when the score was last calculated, and the latest
    jobs with their status, attempts, last error and who asked for them."""
    return admin_views.recalc_status(conn, property_id)
