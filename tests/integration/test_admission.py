"""Admission control over real sockets: a loaded API answers fast 503s instead of hanging, a
greedy caller gets 429 while another caller is served, and /healthz answers whatever the load.

Requests are held in progress the honest way: the test locks a property's row, so uploads to it
wait inside the database, holding their slot and their pooled connection, until it lets go.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from tests.harness.api import TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.system import wait_until

CERTIFICATE = b"Landlord gas safety record (CP12). Date of inspection: 1 March 2026."


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def upload(base: str, tenant: TenantClient, property_id: int) -> httpx.Response:
    return httpx.post(f"{base}/api/properties/{property_id}/documents", headers=tenant.headers, timeout=30,
                      files={"file": ("gas.txt", CERTIFICATE, "text/plain")}, data={"requirement_code": "gas_safety"})


def waiting_on_lock(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0]


def hold_uploads(pool: ThreadPoolExecutor, base: str, tenant: TenantClient, database_url: str,
                 n: int) -> list[Future[httpx.Response]]:
    """`n` uploads in progress, each waiting on the property lock the caller holds."""
    held = [pool.submit(upload, base, tenant, tenant.property_ids[0]) for _ in range(n)]
    wait_until(lambda: waiting_on_lock(database_url) == n, 20, f"{n} uploads waiting on the property lock")
    return held


def locked(database_url: str, property_id: int) -> psycopg.Connection:
    conn = psycopg.connect(database_url)
    conn.execute("SELECT 1 FROM properties WHERE id = %s FOR UPDATE", [property_id])
    return conn


def test_a_full_api_refuses_the_next_request_at_once_with_503_and_retry_after_and_still_answers_healthz(
    database_url: str, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    settings = api_settings(database_url, tmp_path / "docs", api_db_pool_size=2, api_max_waiting=1,
                            api_max_wait_seconds=0.3, api_caller_share=1.0)
    tenant, other = new_tenant(database_url), new_tenant(database_url)
    with serving(settings) as base, locked(database_url, tenant.property_ids[0]) as lock:
        held = hold_uploads(pool, base, tenant, database_url, 2)

        waited = httpx.get(f"{base}/api/properties", headers=other.headers, timeout=10)  # waits its turn, in vain
        queue_full = [pool.submit(httpx.get, f"{base}/api/properties", headers=other.headers, timeout=10)
                      for _ in range(3)]
        health = httpx.get(f"{base}/healthz", timeout=2)
        asset = httpx.get(f"{base}/static/web/site.css", timeout=2)  # static files take no slot either
        lock.rollback()
        statuses = sorted(r.result(30).status_code for r in held)
        answers = [f.result(30) for f in queue_full]

        assert (waited.status_code, waited.headers["retry-after"]) == (503, "2")
        assert waited.json()["type"] == "urn:recalq:problem:overloaded"
        assert {r.status_code for r in answers} <= {200, 503}
        assert any(r.status_code == 503 for r in answers), "with the queue full, a request is refused at once"
        assert health.status_code == 200
        assert asset.status_code == 200
        assert statuses == [201, 201], "the admitted requests finish normally"
        after = httpx.get(f"{base}/api/properties", headers=other.headers, timeout=10)
        assert after.status_code == 200, "capacity comes back as soon as the slots free up"


def test_a_caller_holding_its_share_waits_then_gets_429_while_another_caller_is_served_at_once(
    database_url: str, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    settings = api_settings(database_url, tmp_path / "docs", api_db_pool_size=4, api_caller_share=0.5,
                            api_max_wait_seconds=0.5)
    greedy, other = new_tenant(database_url), new_tenant(database_url)
    with serving(settings) as base, locked(database_url, greedy.property_ids[0]) as lock:
        held = hold_uploads(pool, base, greedy, database_url, 2)

        refused = httpx.get(f"{base}/api/properties", headers=greedy.headers, timeout=10)
        served = httpx.get(f"{base}/api/properties/{other.property_ids[0]}", headers=other.headers, timeout=10)
        lock.rollback()
        assert sorted(r.result(30).status_code for r in held) == [201, 201]

    assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")
    assert refused.json()["type"] == "urn:recalq:problem:rate-limited"
    assert served.status_code == 200, served.text


def test_a_caller_over_its_rate_gets_429_with_retry_after_and_other_callers_are_not_slowed(
    database_url: str, tmp_path: Path
) -> None:
    settings = api_settings(database_url, tmp_path / "docs", api_caller_rate_per_second=0.5, api_caller_burst=3)
    greedy, other = new_tenant(database_url), new_tenant(database_url)
    with serving(settings) as base:
        answers: list[Any] = [httpx.get(f"{base}/api/properties", headers=greedy.headers, timeout=10)
                              for _ in range(4)]
        served = httpx.get(f"{base}/api/properties", headers=other.headers, timeout=10)

    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert int(answers[-1].headers["retry-after"]) == 2, "one request's worth of tokens at 0.5/s"
    assert served.status_code == 200
