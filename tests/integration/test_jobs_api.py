"""The HTTP surface of watched jobs, with the watched toy kind's submission route mounted: who sees
what, ETags, cancel, resume, the kind's lock and cooldown, idempotent submissions, tombstones."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from outbox.backoff import RetryPolicy
from outbox.runner import JobRunner, RunnerPolicy
from tests.harness.api import ADMIN_HEADERS, TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.jobs import property_with_one_job
from tests.harness.toy_api import toy_router
from tests.harness.toy_kind import TOY_UNIT_TABLE, WatchedToyHandler, register_watched_toy

POLICY = RunnerPolicy(retry=RetryPolicy(base_seconds=1, max_seconds=5), infra_retry=RetryPolicy(1, 5),
                      busy_retry_seconds=0.1)


def app_with_toy(settings: Any) -> Any:
    app = create_app(settings)
    app.include_router(toy_router())
    return app


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, max_attempts=1)
        conn.execute(TOY_UNIT_TABLE)
    with TestClient(app_with_toy(api_settings(database_url, tmp_path / "documents")),
                    raise_server_exceptions=False) as client:
        yield client


def submit(api: TestClient, tenant: TenantClient, **body: Any) -> httpx.Response:
    response = api.post("/api/toy-jobs", headers=tenant.headers, json=body)
    assert response.status_code in (200, 202, 409, 429), response.text
    return response


def run(database_url: str, job_id: int) -> Any:
    runner = JobRunner(handler=WatchedToyHandler(), connection=lambda: psycopg.connect(database_url), policy=POLICY)
    return runner.run(job_id)


def test_a_submission_answers_202_with_the_job_its_stages_and_its_urls(api: TestClient, tenant: TenantClient) -> None:
    answer = submit(api, tenant, units=2)

    assert answer.status_code == 202
    job = answer.json()
    assert (job["status"], job["stage"], job["seq"]) == ("queued", None, 1)
    assert [s["display"] for s in job["stages"]] == ["Preparing", "Working through the items", "Saving your results"]
    assert job["status_url"] == f"/api/jobs/{job['id']}"
    assert job["stream_url"].startswith(f"/api/jobs/{job['id']}/events?token=")
    assert tenant.token not in job["stream_url"]


def test_the_owner_sees_the_job_with_an_etag_an_admin_sees_no_result_and_others_get_a_plain_404(
    api: TestClient, tenant: TenantClient, other_tenant: TenantClient, database_url: str
) -> None:
    job_id = submit(api, tenant, units=1).json()["id"]
    run(database_url, job_id)

    mine = api.get(f"/api/jobs/{job_id}", headers=tenant.headers)
    unchanged = api.get(f"/api/jobs/{job_id}", headers=tenant.headers | {"If-None-Match": mine.headers["ETag"]})
    admin = api.get(f"/api/jobs/{job_id}", headers=ADMIN_HEADERS)
    theirs = api.get(f"/api/jobs/{job_id}", headers=other_tenant.headers)
    unknown = api.get("/api/jobs/999999", headers=tenant.headers)

    assert mine.status_code == 200 and mine.json()["status"] == "done" and mine.json()["result"] == {"units": 1}
    assert mine.headers["ETag"] == f'"{mine.json()["seq"]}"'
    assert unchanged.status_code == 304
    assert admin.status_code == 200 and admin.json()["status"] == "done" and admin.json()["result"] is None
    assert (theirs.status_code, theirs.json()["type"]) == (404, "urn:recalq:problem:not-found")
    assert theirs.json()["detail"] == unknown.json()["detail"].replace("999999", str(job_id))


def test_a_caller_lists_its_own_jobs_of_a_kind_newest_first(
    api: TestClient, tenant: TenantClient, other_tenant: TenantClient
) -> None:
    mine = [submit(api, tenant).json()["id"] for _ in range(3)]
    submit(api, other_tenant)

    page = api.get("/api/jobs", params={"kind": "test.toy_watched", "limit": 2}, headers=tenant.headers).json()
    rest = api.get("/api/jobs", params={"kind": "test.toy_watched", "before_id": page["next_before_id"]},
                   headers=tenant.headers).json()

    assert [j["id"] for j in page["items"] + rest["items"]] == sorted(mine, reverse=True)
    assert rest["next_before_id"] is None


def test_cancel_answers_200_for_a_waiting_job_409_once_it_ended_and_409_for_a_recalculation(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    waiting = submit(api, tenant).json()["id"]
    finished = submit(api, tenant, units=1).json()["id"]
    run(database_url, finished)
    _, recalculation = property_with_one_job(database_url)

    cancelled = api.post(f"/api/jobs/{waiting}/cancel", headers=tenant.headers)
    again = api.post(f"/api/jobs/{waiting}/cancel", headers=tenant.headers)
    too_late = api.post(f"/api/jobs/{finished}/cancel", headers=tenant.headers)
    recalc = api.post(f"/api/jobs/{recalculation}/cancel", headers=ADMIN_HEADERS)

    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    assert again.status_code == 200, "cancelling twice is harmless"
    assert (too_late.status_code, too_late.json()["type"]) == (409, "urn:recalq:problem:invalid-transition")
    assert (recalc.status_code, recalc.json()["type"]) == (409, "urn:recalq:problem:not-cancellable")


def test_resume_of_a_failed_job_is_a_new_job_from_its_checkpoint_and_the_same_key_replays_it(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    job_id = submit(api, tenant, units=3).json()["id"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_job SET payload = payload || '{\"fail_at_unit\": 1}' WHERE id = %s", [job_id])
    run(database_url, job_id)
    assert api.get(f"/api/jobs/{job_id}", headers=tenant.headers).json()["status"] == "failed"

    key = {"Idempotency-Key": f"resume-{uuid.uuid4()}"}
    resumed = api.post(f"/api/jobs/{job_id}/resume", headers=tenant.headers | key)
    replay = api.post(f"/api/jobs/{job_id}/resume", headers=tenant.headers | key)

    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["resumed_from"] == job_id and resumed.json()["status"] == "queued"
    assert replay.status_code == 200 and replay.json()["id"] == resumed.json()["id"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_job SET payload = payload - 'fail_at_unit' WHERE id = %s", [resumed.json()["id"]])
        run(database_url, resumed.json()["id"])
        done = conn.execute("SELECT array_agg(unit ORDER BY unit) FROM toy_unit WHERE job_id = %s",
                            [resumed.json()["id"]]).fetchone()[0]
    assert done == [1, 2], "the unit that finished before the failure is not done again"


def test_a_second_submission_under_the_kinds_lock_is_409_naming_the_active_job_and_one_in_the_cooldown_429(
    api: TestClient, tenant: TenantClient, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, mode="unique_active", cooldown_seconds=60, max_attempts=1)

    first = submit(api, tenant, lock="property:1")
    second = submit(api, tenant, lock="property:1")
    assert first.status_code == 202 and second.status_code == 409
    assert second.json()["active_job_id"] == first.json()["id"]
    run(database_url, first.json()["id"])
    cooling = submit(api, tenant, lock="property:1")

    assert cooling.status_code == 429 and int(cooling.headers["Retry-After"]) >= 1


def test_a_resume_inside_the_cooldown_is_accepted(api: TestClient, tenant: TenantClient, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, mode="unique_active", cooldown_seconds=60, max_attempts=1)
    job_id = submit(api, tenant, lock="property:2").json()["id"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_job SET payload = payload || '{\"fail_at_unit\": 0}' WHERE id = %s", [job_id])
    run(database_url, job_id)

    assert submit(api, tenant, lock="property:2").status_code == 429
    assert api.post(f"/api/jobs/{job_id}/resume", headers=tenant.headers).status_code == 202


def test_twenty_submissions_under_one_key_at_once_make_one_job(
    database_url: str, tmp_path: Path
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn)
    tenant = new_tenant(database_url)
    answers: list[httpx.Response] = []
    start = threading.Barrier(20)
    app = app_with_toy(api_settings(database_url, tmp_path / "documents", api_caller_share=1.0,
                                    api_db_pool_size=20))
    with serving(app) as base:
        def send() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                start.wait()
                answers.append(http.post("/api/toy-jobs", json={"units": 1},
                                         headers=tenant.headers | {"Idempotency-Key": "double-click"}))

        threads = [threading.Thread(target=send) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    assert sorted(a.status_code for a in answers) == [200] * 19 + [202], [a.text for a in answers
                                                                          if a.status_code >= 300]
    assert len({a.json()["id"] for a in answers}) == 1
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_job WHERE task = 'test.toy_watched'").fetchone()[0] == 1


def test_an_expired_or_deleted_job_tells_its_owner_which_and_everyone_else_not_found(
    api: TestClient, tenant: TenantClient, other_tenant: TenantClient, database_url: str
) -> None:
    expired = submit(api, tenant, units=1).json()["id"]
    deleted = submit(api, tenant, units=1).json()["id"]
    run(database_url, expired)
    run(database_url, deleted)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox_job SET expires_at = now() - interval '1 second' WHERE id = %s", [expired])
        from outbox.prune import expire_watched
        assert expire_watched(conn).jobs == 1

    assert api.delete(f"/api/jobs/{deleted}", headers=tenant.headers).status_code == 204
    owner = [api.get(f"/api/jobs/{j}", headers=tenant.headers).json()["type"] for j in (expired, deleted)]
    stranger = [api.get(f"/api/jobs/{j}", headers=other_tenant.headers).json()["type"] for j in (expired, deleted)]

    assert owner == ["urn:recalq:problem:expired", "urn:recalq:problem:deleted"]
    assert stranger == ["urn:recalq:problem:not-found"] * 2
