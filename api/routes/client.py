"""Client endpoints (bearer token): a client's own properties and documents.

Every route first proves the property is the caller's (services.property_views.owned_property),
so another client's ids answer the same 404 as ids that do not exist, before anything is read
or changed. Mutations are one service call each (change + outbox row + pending flag in one
transaction); a replayed Idempotency-Key answers 200 with what the first request made.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, StringConstraints
from pydantic_core import PydanticCustomError

from api.dependencies import Conn, IdempotencyKey, Limits, Store, correlation_id, replay_response
from api.idempotency import REPLAYED_HEADER, Record, answer_once, answer_once_within, keyed
from api.problems import COMMON_RESPONSES, PROBLEM_MEDIA_TYPE, UPLOAD_RESPONSES, Problem
from api.schemas import DisplayName, DocumentOut, PropertyOut, RecalculationRef, StrictModel
from api.security import Client, ClientCaller, require_client
from services import property_views
from services.ai_suggestions import apply_suggestion, suggest_holding_no_connection
from services.documents import MAX_DOCUMENTS_PER_REQUEST, DocumentsAdded, DocumentSource, delete_document
from services.errors import InvalidInput, PayloadTooLarge, UnsupportedContent
from services.extraction import Suggestion
from services.file_store import FileStore
from services.properties import NewProperty, create_property
from services.scoring import REQUIREMENTS
from services.uploads import (
    IncomingFile,
    InspectedFile,
    UploadLimits,
    inspect_file,
    store_and_add_documents,
    unpack_zip,
)
from services.vocabulary import TriggerReason

router = APIRouter(prefix="/api", tags=["client"], responses=COMMON_RESPONSES)

#: PostgreSQL bigint: a larger id cannot exist, and must not reach the database as one.
_MAX_ID = 2**63 - 1
PropertyId = Annotated[int, Path(ge=1, le=_MAX_ID, description="A property of the caller")]
DocumentId = Annotated[int, Path(ge=1, le=_MAX_ID, description="A document of that property")]
#: A Literal, not a plain str, so the OpenAPI document and every refusal list the valid values.
RequirementCode = Literal[REQUIREMENTS]  # type: ignore[valid-type]

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso_date_or_empty(value: object) -> object:
    """Form dates are YYYY-MM-DD and nothing else (no timestamps, no datetimes); an empty value
    means "does not expire", which is how a form leaves one file of several without a date."""
    if value == "":
        return None
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise PydanticCustomError("date_format", "Input should be a date as YYYY-MM-DD, got {value!r}",
                                  {"value": value})
    return value


OptionalDate = Annotated[date | None, BeforeValidator(_iso_date_or_empty)]
#: A multipart field is text: "no expiry" is an empty or absent field, never a JSON null.
_DATE_OR_EMPTY_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string", "format": "date"},
                                                   {"type": "string", "maxLength": 0}]}


# -- request and response models -----------------------------------------------------------

class NewPropertyIn(StrictModel):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), DisplayName]
    has_gas_supply: StrictBool = Field(default=True, description="False: the property has no gas_safety requirement")


class PageQuery(StrictModel):
    """Unknown query parameters are refused (a misspelt `limt` is not silently ignored)."""

    limit: int = Field(default=property_views.DEFAULT_PAGE_SIZE, ge=1, le=property_views.MAX_PAGE_SIZE)
    after_id: int | None = Field(default=None, ge=0, le=_MAX_ID, description="`next_after_id` of the page before")


class CreatedPropertyOut(PropertyOut):
    recalculation: RecalculationRef


class PropertyPageOut(BaseModel):
    items: list[PropertyOut]
    next_after_id: int | None = Field(description="Pass as `after_id` for the next page; null on the last page")


class DocumentsAddedOut(BaseModel):
    documents: list[DocumentOut]
    recalculation: RecalculationRef


class DocumentDeletedOut(BaseModel):
    document_id: int
    recalculation: RecalculationRef


class EvidenceOut(BaseModel):
    field: str = Field(description="The suggested field this supports: requirement_code or expires_at")
    text_snippet: str = Field(description="The document's own text the value was read from")
    page: int = Field(description="1-based page of the snippet")
    derivation: str | None = Field(description="How a computed value (not read as such) was derived")


class SuggestionOut(BaseModel):
    requirement_code: str | None
    expires_at: date | None
    evidence: list[EvidenceOut]
    notes: list[str] = Field(description="What the extractor could not find, or had to assume")
    extractor_version: str


class AiAppliedOut(BaseModel):
    suggestion: SuggestionOut
    document: DocumentOut
    recalculation: RecalculationRef


_WRONG_MEDIA_TYPE: dict[int | str, dict[str, Any]] = {
    415: {"model": Problem, "description": "The request body is not of the media type this endpoint reads",
          "content": {PROBLEM_MEDIA_TYPE: {}}},
}


# -- media types ---------------------------------------------------------------------------

def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _json_only(request: Request) -> None:
    media = _media_type(request)
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedContent(f"the body must be JSON; got Content-Type {media or 'none'!r}",
                                 field="header.Content-Type", rule="media_type", valid_values=("application/json",))


def _multipart_only(request: Request) -> None:
    media = _media_type(request)
    if media != "multipart/form-data":
        raise UnsupportedContent(f"the body must be multipart/form-data; got Content-Type {media or 'none'!r}",
                                 field="header.Content-Type", rule="media_type",
                                 valid_values=("multipart/form-data",))


# Authentication comes first: a caller without a token learns nothing about the request.
_JSON_CLIENT = [Depends(require_client), Depends(_json_only)]
_MULTIPART_CLIENT = [Depends(require_client), Depends(_multipart_only)]


# -- properties ----------------------------------------------------------------------------

@router.post("/properties", status_code=201, response_model=CreatedPropertyOut, dependencies=_JSON_CLIENT,
             responses={**replay_response(CreatedPropertyOut), **_WRONG_MEDIA_TYPE, 413: UPLOAD_RESPONSES[413]})
def create_client_property(body: NewPropertyIn, caller: Client, conn: Conn, key: IdempotencyKey,
                           request: Request) -> Any:
    """Creates a property; its first score is computed in the background (`status: updating`)."""

    def change() -> CreatedPropertyOut:
        created = create_property(conn, client_id=caller.client_id, new=NewProperty(body.name, body.has_gas_supply),
                                  actor=caller.actor, correlation_id=correlation_id(caller.actor, key))
        view = property_views.owned_property(conn, caller.client_id, created.property_id)
        return CreatedPropertyOut(**_property_out(view).model_dump(),
                                  recalculation=RecalculationRef(job_id=created.job_id,
                                                                 property_id=created.property_id))

    return answer_once(conn, keyed(request, caller.actor, key, body.model_dump()), change)


@router.get("/properties", response_model=PropertyPageOut)
def list_client_properties(caller: Client, conn: Conn, query: Annotated[PageQuery, Query()]) -> PropertyPageOut:
    """The caller's properties in id order, a page at a time."""
    page = property_views.properties_of_client(conn, caller.client_id, limit=query.limit, after_id=query.after_id)
    return PropertyPageOut(items=[_property_out(p) for p in page.items], next_after_id=page.next_after_id)


@router.get("/properties/{property_id}", response_model=PropertyOut)
def read_client_property(property_id: PropertyId, caller: Client, conn: Conn) -> PropertyOut:
    """The property with its score, breakdown, `compliance_score_pending` and status."""
    return _property_out(property_views.owned_property(conn, caller.client_id, property_id))


# -- documents -----------------------------------------------------------------------------

@router.get("/properties/{property_id}/documents", response_model=list[DocumentOut])
def list_client_documents(property_id: PropertyId, caller: Client, conn: Conn) -> list[DocumentOut]:
    """The property's live (not deleted) documents, oldest first."""
    property_views.owned_property(conn, caller.client_id, property_id)
    return [_document_out(d) for d in property_views.live_documents(conn, property_id)]


@router.post("/properties/{property_id}/documents", status_code=201, response_model=DocumentsAddedOut,
             dependencies=_MULTIPART_CLIENT,
             responses={**UPLOAD_RESPONSES, **replay_response(DocumentsAddedOut), **_WRONG_MEDIA_TYPE})
def upload_client_document(
    property_id: PropertyId,
    file: Annotated[UploadFile, File(description="A PDF or UTF-8 text file, not empty",
                                     json_schema_extra={"minLength": 1})],
    requirement_code: Annotated[RequirementCode, Form(description="The requirement the document certifies")],
    caller: Client,
    conn: Conn,
    store: Store,
    limits: Limits,
    key: IdempotencyKey,
    request: Request,
    expires_at: Annotated[OptionalDate, Form(description="YYYY-MM-DD; the document is valid through this date; "
                                             "empty or absent: it does not expire",
                                             json_schema_extra=_DATE_OR_EMPTY_SCHEMA)] = None,
) -> Any:
    """Uploads one document; the score is recomputed in the background."""
    property_views.owned_property(conn, caller.client_id, property_id)
    inspected = _inspect(file, limits, "file")
    return _add_documents(request, conn, store, caller, property_id, [(inspected, requirement_code, expires_at)],
                          TriggerReason.CLIENT_UPLOAD, key)


@router.post("/properties/{property_id}/documents/bulk", status_code=201, response_model=DocumentsAddedOut,
             dependencies=_MULTIPART_CLIENT,
             responses={**UPLOAD_RESPONSES, **replay_response(DocumentsAddedOut), **_WRONG_MEDIA_TYPE})
def upload_client_documents(
    property_id: PropertyId,
    files: Annotated[list[UploadFile], File(
        description="PDF or UTF-8 text files, none empty",
        json_schema_extra={"minItems": 1, "maxItems": MAX_DOCUMENTS_PER_REQUEST,
                           "items": {"type": "string", "contentMediaType": "application/octet-stream",
                                     "minLength": 1}})],
    requirement_codes: Annotated[list[RequirementCode], Form(
        description="One per file, in the order of `files`",
        json_schema_extra={"minItems": 1, "maxItems": MAX_DOCUMENTS_PER_REQUEST})],
    caller: Client,
    conn: Conn,
    store: Store,
    limits: Limits,
    key: IdempotencyKey,
    request: Request,
    expires_at: Annotated[list[OptionalDate] | None, Form(
        description="Absent, or one per file in the order of `files` (YYYY-MM-DD; empty: does not expire)",
        json_schema_extra={"anyOf": None, "type": "array", "items": _DATE_OR_EMPTY_SCHEMA,
                           "maxItems": MAX_DOCUMENTS_PER_REQUEST})] = None,
) -> Any:
    """Uploads several documents at once: all of them or none, one recalculation."""
    property_views.owned_property(conn, caller.client_id, property_id)
    if len(files) > limits.max_files:
        raise _invalid(f"at most {limits.max_files} files per request; got {len(files)}", "files", "max_items")
    if len(requirement_codes) != len(files):
        raise _invalid(f"requirement_codes needs one value per file: {len(files)} files, "
                       f"{len(requirement_codes)} values", "requirement_codes", "one_per_file")
    expiries = expires_at if expires_at is not None else [None] * len(files)
    if len(expiries) != len(files):
        raise _invalid(f"expires_at needs one value per file (empty for none): {len(files)} files, "
                       f"{len(expiries)} values", "expires_at", "one_per_file")
    inspected = [_inspect(f, limits, f"files.{i}") for i, f in enumerate(files)]
    return _add_documents(request, conn, store, caller, property_id,
                          list(zip(inspected, requirement_codes, expiries, strict=True)),
                          TriggerReason.CLIENT_BULK_UPLOAD, key)


@router.post("/properties/{property_id}/documents/zip", status_code=201, response_model=DocumentsAddedOut,
             dependencies=_MULTIPART_CLIENT,
             responses={**UPLOAD_RESPONSES, **replay_response(DocumentsAddedOut), **_WRONG_MEDIA_TYPE})
def upload_client_zip(
    property_id: PropertyId,
    archive: Annotated[UploadFile, File(description="A ZIP of PDF or text files. Each file's requirement comes "
                                        "from its folder (`gas_safety/cert.pdf`) or its name (`eicr_2026.pdf`)",
                                        json_schema_extra={"minLength": 1})],
    caller: Client,
    conn: Conn,
    store: Store,
    limits: Limits,
    key: IdempotencyKey,
    request: Request,
) -> Any:
    """Uploads a ZIP archive's documents: all of them or none, one recalculation. Unsafe
    archives (bombs, traversal, links, nested archives, encryption) are refused whole."""
    property_views.owned_property(conn, caller.client_id, property_id)
    content = _read_bounded(archive, limits.max_zip_bytes, "archive")
    entries = unpack_zip(content, limits, field="archive")
    return _add_documents(request, conn, store, caller, property_id,
                          [(e.inspected, e.requirement_code, None) for e in entries],
                          TriggerReason.CLIENT_ZIP_UPLOAD, key)


# `:int`: without it `.../documents/bulk` and `.../documents/zip` would also match this path (as
# a document id that fails validation), and a wrong method there would advertise DELETE.
@router.delete("/properties/{property_id}/documents/{document_id:int}", response_model=DocumentDeletedOut,
               responses={200: {"description": "Deleted, or a replay of an accepted Idempotency-Key (then with "
                                "the header `Idempotent-Replayed: true`)",
                                "headers": {REPLAYED_HEADER: {"description": "`true` on a replay",
                                                              "schema": {"type": "string"}}}}})
def delete_client_document(
    property_id: PropertyId, document_id: DocumentId, caller: Client, conn: Conn, key: IdempotencyKey,
    request: Request,
) -> Any:
    """Deletes a document (it stops counting towards the score)."""

    def change() -> DocumentDeletedOut:
        property_views.owned_property(conn, caller.client_id, property_id)
        property_views.document_of_property(conn, property_id, document_id)
        changed = delete_document(conn, document_id=document_id, actor=caller.actor,
                                  trigger=TriggerReason.CLIENT_DELETE, correlation_id=correlation_id(caller.actor, key))
        return DocumentDeletedOut(document_id=document_id,
                                  recalculation=RecalculationRef(job_id=changed.job_id, property_id=property_id))

    return answer_once(conn, keyed(request, caller.actor, key), change)


@router.get("/properties/{property_id}/documents/{document_id}/ai-suggestion", response_model=SuggestionOut)
def suggest_for_client_document(
    property_id: PropertyId, document_id: DocumentId, caller: Client, store: Store, request: Request
) -> SuggestionOut:
    """What the extractor reads in the document: its requirement type and expiry date, the
    text each was found in, and notes on what it could not find. Changes nothing. Read once
    per file: later calls answer from what the first one found."""
    # No pooled connection for the whole request: the first read of a large file takes a while,
    # and holding a connection through it would take one from every other caller.
    connect = request.app.state.runtime.connection
    with connect() as conn:
        property_views.owned_property(conn, caller.client_id, property_id)
        property_views.document_of_property(conn, property_id, document_id)
    return _suggestion_out(suggest_holding_no_connection(connect, store, document_id=document_id))


@router.post("/properties/{property_id}/documents/{document_id}/ai-apply", response_model=AiAppliedOut,
             responses={200: {"description": "Applied, or a replay of an accepted Idempotency-Key (then with the "
                              "header `Idempotent-Replayed: true`)",
                              "headers": {REPLAYED_HEADER: {"description": "`true` on a replay",
                                                            "schema": {"type": "string"}}}}})
def apply_client_suggestion(
    property_id: PropertyId, document_id: DocumentId, caller: Client, conn: Conn, store: Store, key: IdempotencyKey,
    request: Request,
) -> Any:
    """Applies the extractor's suggestion (recomputed from the stored file) to the document; a
    field it did not find keeps its value. Nothing found: 422 `nothing_to_apply`."""

    def change() -> AiAppliedOut:
        property_views.owned_property(conn, caller.client_id, property_id)
        property_views.document_of_property(conn, property_id, document_id)
        suggestion, changed = apply_suggestion(conn, store, document_id=document_id, actor=caller.actor,
                                               correlation_id=correlation_id(caller.actor, key))
        document = property_views.document_of_property(conn, property_id, document_id)
        return AiAppliedOut(suggestion=_suggestion_out(suggestion), document=_document_out(document),
                            recalculation=RecalculationRef(job_id=changed.job_id, property_id=property_id))

    return answer_once(conn, keyed(request, caller.actor, key), change)


# -- helpers -------------------------------------------------------------------------------

def _read_bounded(upload: UploadFile, limit: int, field: str) -> bytes:
    """Reads at most one byte past the limit, so an oversize file is refused without being
    held in memory whole."""
    content = upload.file.read(limit + 1)
    if len(content) > limit:
        raise PayloadTooLarge(f"{upload.filename or field!r} is over the limit of {limit} bytes",
                              field=field, rule="max_size")
    return content


def _inspect(upload: UploadFile, limits: UploadLimits, field: str) -> InspectedFile:
    content = _read_bounded(upload, limits.max_file_bytes, field)
    return inspect_file(IncomingFile(upload.filename or "", content, upload.content_type), limits, field=field)


def _add_documents(
    request: Request,
    conn: psycopg.Connection,
    store: FileStore,
    caller: ClientCaller,
    property_id: int,
    files: list[tuple[InspectedFile, str, date | None]],
    trigger: TriggerReason,
    key: str,
) -> Any:
    sent = [[file.sha256, file.file_name, code, expires_at] for file, code, expires_at in files]

    def change(record: Record) -> DocumentsAddedOut:
        answer: list[DocumentsAddedOut] = []

        def before_commit(tx: psycopg.Connection, added: DocumentsAdded) -> None:
            answer.append(added_documents_out(tx, property_id, added))
            record(tx, answer[0])

        store_and_add_documents(conn, store, property_id=property_id, files=files, source=DocumentSource.CLIENT,
                                actor=caller.actor, trigger=trigger, correlation_id=correlation_id(caller.actor, key),
                                reconnect=request.app.state.runtime.connection, before_commit=before_commit)
        return answer[0]

    return answer_once_within(conn, keyed(request, caller.actor, key, sent), change)


def added_documents_out(conn: psycopg.Connection, property_id: int, added: DocumentsAdded) -> DocumentsAddedOut:
    documents = property_views.documents_by_ids(conn, property_id, list(added.document_ids))
    return DocumentsAddedOut(documents=[_document_out(d) for d in documents],
                             recalculation=RecalculationRef(job_id=added.job_id, property_id=property_id))


def _invalid(message: str, field: str, rule: str) -> InvalidInput:
    return InvalidInput(message, field=field, rule=rule)


def _property_out(view: property_views.PropertyView) -> PropertyOut:
    return PropertyOut.model_validate(view, from_attributes=True)


def _document_out(view: property_views.DocumentView) -> DocumentOut:
    return DocumentOut.model_validate(view, from_attributes=True)


def _suggestion_out(suggestion: Suggestion) -> SuggestionOut:
    return SuggestionOut.model_validate(suggestion, from_attributes=True)
