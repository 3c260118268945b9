"""Builds domain data through the real service functions (so every change enqueues)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import date

import psycopg

from services.documents import NewDocument, add_documents
from services.properties import NewProperty, provision_client
from services.scoring import DocumentStatus
from services.vocabulary import Actor, ActorType, TriggerReason

ADMIN = Actor(ActorType.ADMIN, "admin-1")


def cid() -> str:
    return f"test-{uuid.uuid4()}"


def provision(conn: psycopg.Connection, n_properties: int = 1, gas: bool = True) -> list[int]:
    result = provision_client(
        conn,
        name="Test Client",
        properties=[NewProperty(f"Property {i}", has_gas_supply=gas) for i in range(n_properties)],
        actor=ADMIN,
        correlation_id=cid(),
    )
    conn.commit()
    return [p.property_id for p in result.properties]


def new_document(
    requirement: str = "gas_safety",
    expires_at: date | None = None,
    status: DocumentStatus = DocumentStatus.PENDING_VERIFICATION,
) -> NewDocument:
    content = uuid.uuid4().bytes
    return NewDocument(
        requirement_code=requirement,
        file_name=f"{requirement}.pdf",
        size_bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        expires_at=expires_at,
        status=status,
    )


def upload(
    conn: psycopg.Connection, property_id: int, *documents: NewDocument, correlation_id: str | None = None
) -> int:
    result = add_documents(
        conn,
        property_id=property_id,
        documents=list(documents) or [new_document()],
        source="client",
        actor=Actor(ActorType.CLIENT, "client-1"),
        trigger=TriggerReason.CLIENT_UPLOAD,
        correlation_id=correlation_id or cid(),
    )
    conn.commit()
    return result.job_id
