"""GET /metrics: the Prometheus exposition holds what outbox_queue_state and the audit log hold,
and a database that is down or too slow answers `recalq_up 0` instead of an error.

The real app on a fresh database; jobs are made through the services and the outbox lifecycle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from outbox import lifecycle
from services import audit
from services.vocabulary import RECALCULATE_TASK, Actor, AuditAction
from tests.harness.api import api_settings, running_api
from tests.harness.data import provision
from tests.harness.system import wait_until
from tests.harness.tcp_proxy import Address, TcpProxy, with_address

LIVE = ("pending", "published", "running", "retrying", "dead")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(api: TestClient) -> Samples:
    response = api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version="), response.headers["content-type"]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with running_api(api_settings(database_url, tmp_path / "documents")) as client:
        yield client


def test_the_exposition_reports_the_queue_state_view_and_the_drift_audits_of_the_last_24_hours(
    api: TestClient, conn: psycopg.Connection
) -> None:
    first, second, third = provision(conn, n_properties=3)  # one pending job per property
    [(dead_job,)] = conn.execute(
        "SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{third}"]
    ).fetchall()
    start = lifecycle.start(conn, dead_job, redelivered=False, lease_seconds=60)
    assert start.attempt is not None
    lifecycle.fail(conn, dead_job, start.attempt, error="permanent: test", retryable=False, retry_in_seconds=0)
    # The first job has waited 40 s for a relay since it fell due, and exists for 100 s.
    conn.execute(
        "UPDATE outbox_job SET created_at = now() - interval '100 seconds', next_run_at = now() - interval '40 seconds'"
        " WHERE coalescing_key = %s", [f"property:{first}"],
    )
    audit.record(conn, AuditAction.COMPLIANCE_SCORE_DRIFT_DETECTED, Actor.system("test"), property_id=second)
    conn.execute(
        "INSERT INTO audit_log (action, actor_type, property_id, at)"
        " VALUES (%s, 'system', %s, now() - interval '25 hours')",
        [str(AuditAction.COMPLIANCE_SCORE_DRIFT_DETECTED), second],
    )
    conn.commit()

    samples = scrape(api)

    assert value(samples, "recalq_up") == 1
    jobs = {status: value(samples, "recalq_jobs", task=RECALCULATE_TASK, status=status) for status in LIVE}
    assert jobs == {"pending": 2, "published": 0, "running": 0, "retrying": 0, "dead": 1}
    view = conn.execute("SELECT task, status::text, jobs FROM outbox_queue_state WHERE jobs IS NOT NULL").fetchall()
    exposed = {(dict(labels)["task"], dict(labels)["status"]): v
               for (name, labels), v in samples.items() if name == "recalq_jobs"}
    assert exposed == {(task, status): jobs for task, status, jobs in view}, "one sample per task and live status"
    assert 40 <= value(samples, "recalq_relay_lag_seconds", task=RECALCULATE_TASK) < 45
    assert 100 <= value(samples, "recalq_oldest_job_age_seconds", task=RECALCULATE_TASK, status="pending") < 105
    assert value(samples, "recalq_oldest_job_age_seconds", task=RECALCULATE_TASK, status="running") == 0
    rates = {s: value(samples, "recalq_finished_per_second", task=RECALCULATE_TASK, status=s)
             for s in ("done", "dead", "superseded")}
    assert rates == {"done": 0, "dead": 1 / 300, "superseded": 0}, "one dead job in the last five minutes"
    assert value(samples, "recalq_drift_detected_24h") == 1, "the 25-hour-old drift is outside the window"
    assert "/metrics" not in api.get("/openapi.json").json()["paths"]


def test_failed_and_lost_attempts_of_the_last_five_minutes_are_counted_per_task_even_when_their_job_retried(
    api: TestClient, conn: psycopg.Connection
) -> None:
    first, second = provision(conn, n_properties=2)
    [retried, lost] = [conn.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s",
                                    [f"property:{p}"]).fetchone()[0] for p in (first, second)]
    for _ in range(2):  # two failed attempts; the job is retrying, not dead
        start = lifecycle.start(conn, retried, redelivered=False, lease_seconds=60)
        lifecycle.fail(conn, retried, start.attempt, error="provider 503", retryable=True, retry_in_seconds=0)
    lifecycle.start(conn, lost, redelivered=False, lease_seconds=60)
    lifecycle.start(conn, lost, redelivered=True, lease_seconds=60)  # its message came back: the holder is gone
    conn.execute("UPDATE outbox_attempt SET finished_at = now() - interval '6 minutes' "
                 "WHERE job_id = %s AND attempt = 1", [retried])
    conn.commit()

    samples = scrape(api)

    assert value(samples, "recalq_failed_attempts_5m", task=RECALCULATE_TASK, outcome="failed") == 1, (
        "one failure is older than the window")
    assert value(samples, "recalq_failed_attempts_5m", task=RECALCULATE_TASK, outcome="lost") == 1
    assert value(samples, "recalq_jobs", task=RECALCULATE_TASK, status="dead") == 0


def test_a_scrape_while_the_database_is_down_answers_recalq_up_0_and_recovers_when_it_is_back(
    database_url: str, tmp_path: Path
) -> None:
    parts = urlsplit(database_url)
    with TcpProxy(Address(parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy, running_api(
        api_settings(with_address(database_url, proxy.address), tmp_path / "documents")
    ) as api:
        assert value(scrape(api), "recalq_up") == 1

        proxy.cut()
        for _ in range(2):  # the pooled connection that broke, then a pool that cannot connect
            started = time.monotonic()
            assert scrape(api) == {("recalq_up", ()): 0}
            assert time.monotonic() - started < 8, "bounded by the scrape timeout, not the pool's"

        proxy.restore()
        wait_until(lambda: scrape(api).get(("recalq_up", ())) == 1, 30, "recalq_up 1 after the database is back",
                   interval=0.25)


def test_a_scrape_the_database_cannot_answer_within_its_statement_timeout_answers_recalq_up_0(
    api: TestClient, database_url: str
) -> None:
    with psycopg.connect(database_url) as blocker:
        blocker.execute("LOCK TABLE outbox_job IN ACCESS EXCLUSIVE MODE")  # held until the block ends

        started = time.monotonic()
        samples = scrape(api)
        elapsed = time.monotonic() - started

        blocker.rollback()
    assert samples == {("recalq_up", ()): 0}
    assert elapsed < 8, f"the scrape waited {elapsed:.1f} s"
    assert value(scrape(api), "recalq_up") == 1, "the lock gone, the next scrape reads the view again"
