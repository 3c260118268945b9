"""The API under test: the real app (real PostgreSQL, real file store) driven in-process.

Clients and their tokens are made through the services, not the endpoints under test, so a
broken provisioning endpoint fails its own tests and not every other one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from api.app import create_app
from recalq.settings import Settings
from services import client_tokens
from services.properties import NewProperty, provision_client
from services.vocabulary import Actor, ActorType

ADMIN_KEY = "test-admin-key-" + "x" * 24
ADMIN_HEADERS = {"X-API-Key": ADMIN_KEY}


@dataclass(frozen=True)
class TenantClient:
    client_id: int
    token: str
    property_ids: list[int]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


#: In-process tests are one caller sending thousands of requests back to back (schemathesis
#: included): its rate is not under test there. tests/integration/test_admission.py tests it.
UNTHROTTLED = {"api_caller_rate_per_second": 1e6, "api_caller_burst": 1_000_000}


def api_settings(database_url: str, storage_dir: Path, **overrides: object) -> Settings:
    return Settings(database_url=database_url, broker_url="redis://127.0.0.1:6379/15", storage_dir=storage_dir,
                    admin_api_keys=(ADMIN_KEY,), **{**UNTHROTTLED, **overrides})


@contextmanager
def running_api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def new_tenant(database_url: str, n_properties: int = 1, gas: bool = True) -> TenantClient:
    """A provisioned client with `n_properties` properties and a live token."""
    with psycopg.connect(database_url) as conn:
        result = provision_client(
            conn,
            name=f"Tenant {uuid.uuid4().hex[:6]}",
            properties=[NewProperty(f"Property {i}", has_gas_supply=gas) for i in range(n_properties)],
            actor=Actor(ActorType.ADMIN, "harness"),
            correlation_id=f"harness-{uuid.uuid4()}",
        )
        issued = client_tokens.issue_token(conn, client_id=result.client_id, label="tests")
        conn.commit()
    return TenantClient(result.client_id, issued.token, [p.property_id for p in result.properties])


def outbox_request_count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM outbox_request").fetchone()[0]
