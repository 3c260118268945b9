"""Shared fixtures: real PostgreSQL databases, real brokers, real recalq processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from tests.harness.api import TenantClient
from recalq.settings import Settings
from tests.harness.databases import DatabaseFactory
from tests.harness.services import brokers, postgres_admin_url
from tests.harness.system import FAST_SETTINGS, System


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Broker tests run once per broker this machine has: both in CI (CI=true fails loudly
    when one is missing); on a fresh machine, the embedded Redis."""
    if "broker_url" in metafunc.fixturenames:
        available = brokers()
        metafunc.parametrize("broker_url", list(available.values()), ids=list(available))


@pytest.fixture(scope="session")
def db_factory() -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_admin_url())
    yield factory
    factory.drop_template()


@pytest.fixture
def database_url(db_factory: DatabaseFactory) -> Iterator[str]:
    """A fresh database at migration head, dropped after the test."""
    url = db_factory.create()
    yield url
    db_factory.drop(url)


@pytest.fixture(scope="module")
def module_database_url(db_factory: DatabaseFactory) -> Iterator[str]:
    """A fresh database at migration head shared by one module's tests, for modules whose tests
    cannot see each other's rows (each uses its own keys or checks it left nothing behind) and
    so need not pay for a database each."""
    url = db_factory.create()
    yield url
    db_factory.drop(url)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url) as connection:
        yield connection


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings for in-process tests: the fresh database, the first broker, fast knobs."""
    broker = next(iter(brokers().values()))
    fast = {key.removeprefix("RECALQ_").lower(): value for key, value in FAST_SETTINGS.items()}
    return Settings(database_url=database_url, broker_url=broker, **fast)


@pytest.fixture
def system(database_url: str, broker_url: str, tmp_path: Path) -> Iterator[System]:
    """Real worker and relay subprocesses against a fresh database and the given broker."""
    sut = System(database_url, broker_url, tmp_path)
    yield sut
    sut.stop()


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """The real app on a fresh database, with admin key tests.harness.api.ADMIN_KEY."""
    from tests.harness.api import api_settings, running_api

    with running_api(api_settings(database_url, tmp_path / "documents")) as client:
        yield client


@pytest.fixture
def tenant(database_url: str) -> TenantClient:
    """A client with one property (gas supply) and its bearer token."""
    from tests.harness.api import new_tenant

    return new_tenant(database_url)


@pytest.fixture
def other_tenant(database_url: str) -> TenantClient:
    from tests.harness.api import new_tenant

    return new_tenant(database_url)
