"""Property evaluations through HTTP and the real runner, against the provider simulator over real
HTTP and real PostgreSQL: every stage once, a snapshot that outlives its job, scripted provider
failures retried within bounds or failing the attempt with the stage named, a resume that skips
finished stages, a permanent failure, the lock and idempotent submissions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from outbox.runner import JobRunner
from services.evaluations import LOOKUPS, STAGES, EvaluationHandler
from services.providers import ProviderClient
from tests.harness.api import TenantClient, api_settings, new_tenant
from tests.harness.simulator import Simulator, simulator_in_thread
from tests.harness.toy_kind import TOY_POLICY


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with simulator_in_thread() as running:
        yield running


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(database_url, tmp_path / "documents")),
                    raise_server_exceptions=False) as client:
        yield client


def submit(api: TestClient, tenant: TenantClient, key: str | None = None, **body: Any) -> Any:
    headers = {**tenant.headers, "Idempotency-Key": key or uuid.uuid4().hex}
    return api.post("/api/evaluations", headers=headers, json=body or {"property_id": tenant.property_ids[0]})


def run(database_url: str, simulator: Simulator, job_id: int, *, tries: int = 3, timeout: float = 5) -> Any:
    providers = ProviderClient(simulator.url, timeout_seconds=timeout, tries=tries, sleep=lambda _: None)
    runner = JobRunner(handler=EvaluationHandler(providers), connection=lambda: psycopg.connect(database_url),
                       policy=TOY_POLICY)
    try:
        return runner.run(job_id)
    finally:
        providers.close()


def job(api: TestClient, tenant: TenantClient, job_id: int) -> dict[str, Any]:
    answer = api.get(f"/api/jobs/{job_id}", headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def make_due(database_url: str, job_id: int) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])


def test_the_stages_the_task_registers_are_the_ones_the_handler_runs(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        [registered] = conn.execute("SELECT stages FROM outbox_task WHERE name = 'evaluation.evaluate_property'"
                                    ).fetchone()
    assert registered == [s.as_json() for s in STAGES]


def test_an_evaluation_asks_every_stage_once_and_leaves_a_snapshot_that_outlives_its_job(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    submitted = submit(api, tenant)
    assert submitted.status_code == 202, submitted.text
    body = submitted.json()
    assert [s["key"] for s in body["stages"]] == [s.key for s in STAGES]
    assert body["stream_url"] and body["status"] == "queued"

    run(database_url, simulator, body["id"])

    done = job(api, tenant, body["id"])
    assert done["status"] == "done"
    evaluation = api.get(f"/api/evaluations/{done['result']['evaluation_id']}", headers=tenant.headers).json()
    assert set(evaluation["answers"]) == set(LOOKUPS)
    assert evaluation["summary"]["stages_answered"] == len(LOOKUPS)
    assert simulator.calls() == dict.fromkeys(LOOKUPS, 1)

    with psycopg.connect(database_url) as conn:  # the job's status is pruned; the snapshot stays
        conn.execute("DELETE FROM outbox_job WHERE id = %s", [body["id"]])
    again = api.get(f"/api/evaluations/{evaluation['id']}", headers=tenant.headers)
    assert again.status_code == 200 and again.json()["answers"] == evaluation["answers"]


def test_a_provider_that_fails_twice_is_retried_within_the_call_and_the_evaluation_succeeds(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    simulator.script("flood_risk", fail_next=2, status=503)
    job_id = submit(api, tenant).json()["id"]

    run(database_url, simulator, job_id, tries=3)

    assert job(api, tenant, job_id)["status"] == "done"
    assert simulator.calls()["flood_risk"] == 3
    assert job(api, tenant, job_id)["attempt"] == 1


def test_a_provider_failing_past_its_tries_fails_the_attempt_naming_the_stage_and_the_retry_skips_finished_stages(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    simulator.script("licensing", fail_next=3, status=500)
    job_id = submit(api, tenant).json()["id"]

    run(database_url, simulator, job_id, tries=3)
    retrying = job(api, tenant, job_id)
    assert retrying["status"] == "running" and "licensing" in retrying["error"]["message"]
    assert retrying["error"]["stage"] == "licensing"

    make_due(database_url, job_id)
    run(database_url, simulator, job_id, tries=3)

    assert job(api, tenant, job_id)["status"] == "done"
    before = LOOKUPS[:LOOKUPS.index("licensing")]
    calls = simulator.calls()
    assert all(calls[stage] == 1 for stage in before), calls  # answered before: never asked again
    assert calls["licensing"] == 4


def test_a_provider_that_times_out_on_every_attempt_fails_the_job_and_a_resume_carries_on_from_the_checkpoint(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    simulator.script("radon", delay_seconds=2.0)
    job_id = submit(api, tenant).json()["id"]
    for _ in range(3):  # the task's three attempts, each with its per-call tries
        make_due(database_url, job_id)
        run(database_url, simulator, job_id, tries=2, timeout=0.3)
    failed = job(api, tenant, job_id)
    assert failed["status"] == "failed"
    assert failed["error"]["stage"] == "radon" and "no answer within" in failed["error"]["message"]
    assert failed["error"]["can_resume"] is True

    simulator.script("radon", delay_seconds=None)
    resumed = api.post(f"/api/jobs/{job_id}/resume", headers={**tenant.headers, "Idempotency-Key": "resume-1"})
    assert resumed.status_code == 202, resumed.text
    run(database_url, simulator, resumed.json()["id"])

    assert job(api, tenant, resumed.json()["id"])["status"] == "done"
    calls = simulator.calls()
    assert all(calls[stage] == 1 for stage in LOOKUPS[:LOOKUPS.index("radon")]), calls
    assert calls["radon"] == 3 * 2 + 1 and calls["crime"] == 1


def test_an_address_the_providers_do_not_know_fails_at_once_without_a_retry(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    job_id = submit(api, tenant, address="1 Nowhere Lane").json()["id"]

    run(database_url, simulator, job_id)

    failed = job(api, tenant, job_id)
    assert failed["status"] == "failed" and failed["attempt"] == 1
    assert failed["error"]["stage"] == "locate_address"
    assert simulator.calls() == {"locate_address": 1}


def test_one_evaluation_per_property_at_a_time_and_the_same_key_is_the_same_job(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    first = submit(api, tenant, key="eval-key-1")
    replay = submit(api, tenant, key="eval-key-1")
    second = submit(api, tenant, key="eval-key-2")
    other_address = submit(api, tenant, address="2 Church Road")
    same_address = submit(api, tenant, address="  2   church road ")

    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.json()["id"] == first.json()["id"]
    assert second.status_code == 409 and second.json()["active_job_id"] == first.json()["id"]
    assert other_address.status_code == 202
    assert same_address.status_code == 409 and same_address.json()["active_job_id"] == other_address.json()["id"]


@pytest.mark.parametrize("body", [{}, {"property_id": 1, "address": "x"}, {"address": ""}, {"address": "a\u202eb"},
                                  {"property_id": 0}, {"extra": 1, "address": "x"}])
def test_a_bad_submission_is_refused_with_422_and_makes_no_job(
    api: TestClient, tenant: TenantClient, database_url: str, body: dict[str, Any]
) -> None:
    answer = api.post("/api/evaluations", headers={**tenant.headers, "Idempotency-Key": uuid.uuid4().hex}, json=body)
    assert answer.status_code == 422, answer.text
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_job WHERE task = 'evaluation.evaluate_property'"
                            ).fetchone() == (0,)


def test_another_clients_property_or_evaluation_is_not_found(
    api: TestClient, tenant: TenantClient, simulator: Simulator, database_url: str
) -> None:
    stranger = new_tenant(database_url)
    refused = submit(api, stranger, property_id=tenant.property_ids[0])
    job_id = submit(api, tenant).json()["id"]
    run(database_url, simulator, job_id)
    evaluation_id = job(api, tenant, job_id)["result"]["evaluation_id"]

    assert refused.status_code == 404
    assert api.get(f"/api/evaluations/{evaluation_id}", headers=stranger.headers).status_code == 404
    assert api.get(f"/api/jobs/{job_id}", headers=stranger.headers).status_code == 404
