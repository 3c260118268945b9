"""Creating properties and provisioning clients. Each new property gets its first score
asynchronously, requested in the transaction that creates it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from services import audit
from services.display_text import require_display_text
from services.errors import ClientNotFound, DuplicateRequest, InvalidInput
from services.queries import QUERIES
from services.recalc_requests import request_recalculation
from services.vocabulary import Actor, AuditAction, TriggerReason


@dataclass(frozen=True, slots=True)
class NewProperty:
    name: str
    has_gas_supply: bool = True

    def validate(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name.strip()) <= 200:
            raise InvalidInput("property name must be 1 to 200 characters", field="name", rule="length_1_200")
        require_display_text(self.name, field="name")
        if not isinstance(self.has_gas_supply, bool):
            raise InvalidInput("has_gas_supply must be true or false", field="has_gas_supply", rule="boolean")


@dataclass(frozen=True, slots=True)
class CreatedProperty:
    property_id: int
    job_id: int


@dataclass(frozen=True, slots=True)
class ProvisionedClient:
    client_id: int
    properties: tuple[CreatedProperty, ...]


def create_property(
    conn: psycopg.Connection,
    *,
    client_id: int,
    new: NewProperty,
    actor: Actor,
    correlation_id: str,
) -> CreatedProperty:
    """Creates one property; a replayed correlation id creates nothing and raises DuplicateRequest."""
    new.validate()
    with conn.transaction():
        if conn.execute(QUERIES["lock_client_for_create"], {"client_id": client_id}).fetchone() is None:
            raise ClientNotFound(f"client {client_id} does not exist")
        first = conn.execute(
            QUERIES["property_created_by_request"], {"client_id": client_id, "correlation_id": correlation_id}
        ).fetchone()
        if first is not None:
            raise DuplicateRequest(correlation_id, first[0])
        return _insert_property(
            conn, client_id, new, actor, correlation_id, TriggerReason.PROPERTY_CREATE
        )


def provision_client(
    conn: psycopg.Connection,
    *,
    name: str,
    properties: Sequence[NewProperty],
    actor: Actor,
    correlation_id: str,
) -> ProvisionedClient:
    """Creates a client with its properties in one transaction, each property queued for scoring.

    A replayed correlation id creates nothing and raises DuplicateRequest."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 200:
        raise InvalidInput("client name must be 1 to 200 characters", field="name", rule="length_1_200")
    require_display_text(name, field="name")
    if len(properties) > 1000:
        raise InvalidInput(
            "a client is provisioned with at most 1000 properties at once", field="properties", rule="max_items"
        )
    for new in properties:
        new.validate()
    with conn.transaction():
        conn.execute(QUERIES["lock_clients_for_provisioning"])
        first = conn.execute(
            QUERIES["client_provisioned_by_request"], {"correlation_id": correlation_id}
        ).fetchone()
        if first is not None:
            raise DuplicateRequest(correlation_id, first[1])
        row = conn.execute(QUERIES["insert_client"], {"name": name.strip()}).fetchone()
        assert row is not None
        client_id = row[0]
        created = tuple(
            _insert_property(conn, client_id, new, actor, correlation_id, TriggerReason.PROVISIONING)
            for new in properties
        )
        audit.record(
            conn,
            AuditAction.CLIENT_PROVISIONED,
            actor,
            client_id=client_id,
            correlation_id=correlation_id,
            details={"property_ids": [c.property_id for c in created]},
        )
        return ProvisionedClient(client_id=client_id, properties=created)


def _insert_property(
    conn: psycopg.Connection,
    client_id: int,
    new: NewProperty,
    actor: Actor,
    correlation_id: str,
    trigger: TriggerReason,
) -> CreatedProperty:
    row = conn.execute(
        QUERIES["insert_property"],
        {"client_id": client_id, "name": new.name.strip(), "has_gas_supply": new.has_gas_supply},
    ).fetchone()
    assert row is not None
    property_id = row[0]
    audit.record(
        conn,
        AuditAction.PROPERTY_CREATED,
        actor,
        property_id=property_id,
        client_id=client_id,
        correlation_id=correlation_id,
    )
    job_id = request_recalculation(
        conn, property_id, trigger=trigger, actor=actor, correlation_id=correlation_id
    )
    return CreatedProperty(property_id=property_id, job_id=job_id)
