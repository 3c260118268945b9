"""A page's live scores over a real socket (uvicorn in a thread, real PostgreSQL): a score that
lands reaches the page's stream, and so does a recalculation that dies (no column of the
property changes then), each ending with `settled`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest

from outbox import lifecycle
from outbox.backoff import RetryPolicy
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from tests.harness.api import TenantClient, api_settings
from tests.harness.api_server import serving
from tests.harness.sse import stream_in_background, wait_for

POLICY = RecalculationPolicy(lease_seconds=30, retry=RetryPolicy(base_seconds=10, max_seconds=600),
                             infra_retry=RetryPolicy(base_seconds=1, max_seconds=30), busy_retry_seconds=0.25,
                             lock_timeout_ms=2000)


def recalculate(database_url: str, job_id: int) -> None:
    """The property's recalculation, run in this process by the real service."""
    recalculator = Recalculator(connection=lambda: psycopg.connect(database_url), policy=POLICY,
                                today=lambda: datetime.now(UTC).date())
    assert isinstance(recalculator.run(job_id), Applied)


@pytest.fixture
def base(database_url: str, tmp_path: Path) -> Iterator[str]:
    with serving(api_settings(database_url, tmp_path / "documents")) as url:
        yield url


def session_cookie(base: str, token: str) -> dict[str, str]:
    with httpx.Client(base_url=base) as http:
        form = http.get("/sign-in").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)  # type: ignore[union-attr]
        http.post("/sign-in", data={"secret": token, "csrf_token": csrf, "next": ""})
        return {"Cookie": f"recalq_session={http.cookies['recalq_session']}"}


def first_job(database_url: str, property_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s ORDER BY id LIMIT 1",
                            [f"property:{property_id}"]).fetchone()[0]


def test_a_recalculation_that_dies_reaches_the_page_as_failed_and_the_stream_settles(
    base: str, tenant: TenantClient, database_url: str
) -> None:
    headers = session_cookie(base, tenant.token)
    thread, events, status = stream_in_background(base, f"/properties/{tenant.property_ids[0]}/events", headers)
    wait_for(lambda: events)
    assert events[0]["data"]["status"] == "updating"

    job_id = first_job(database_url, tenant.property_ids[0])
    with psycopg.connect(database_url, autocommit=True) as conn:
        started = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
        lifecycle.fail(conn, job_id, started.attempt, error="boom", retryable=False, retry_in_seconds=1)
    thread.join(20)

    assert status == [200]
    assert [e["event"] for e in events] == ["property", "property", "settled"]
    assert events[1]["data"]["status"] == "failed"


def test_a_score_that_lands_reaches_the_portfolio_stream_which_then_settles(
    base: str, tenant: TenantClient, database_url: str
) -> None:
    headers = session_cookie(base, tenant.token)
    thread, events, _ = stream_in_background(base, "/portfolio/events", headers)
    wait_for(lambda: events)
    recalculate(database_url, first_job(database_url, tenant.property_ids[0]))
    thread.join(20)

    assert events[-1]["event"] == "settled"
    landed = [e["data"] for e in events if e["event"] == "property" and e["data"]["status"] == "up_to_date"]
    assert landed and landed[-1]["score"] is not None


def test_the_page_stream_needs_a_signed_in_client(base: str) -> None:
    assert httpx.get(f"{base}/portfolio/events").status_code == 401
    assert httpx.get(f"{base}/portfolio/events", headers={"Cookie": "recalq_session=junk.x"}).status_code == 401
