"""A watched job's Server-Sent Events over real sockets (uvicorn in a thread, real PostgreSQL):
order, ids, Last-Event-ID, resync, 204 after the end, tokens, gzip, the cap on streams and the
LISTEN connection's loss. Several real API processes, a stopped client and SIGTERM with open
streams are tests/e2e/test_job_streams_across_processes.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from api.app import create_app
from tests.harness.api import TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.sse import read_stream, stream_in_background, wait_for
from tests.harness.toy_kind import TOY_UNIT_TABLE, register_watched_toy, run_watched_toy, submit_watched_toy


@pytest.fixture
def prepared(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, max_attempts=2)
        conn.execute(TOY_UNIT_TABLE)
    return database_url


@pytest.fixture
def base(prepared: str, tmp_path: Path) -> Iterator[str]:
    with serving(create_app(api_settings(prepared, tmp_path / "documents", api_stream_poll_seconds=0.5))) as url:
        yield url


def submit(database_url: str, owner: TenantClient, **payload: Any) -> int:
    return submit_watched_toy(database_url, owner.client_id, **payload)


def run(database_url: str, job_id: int) -> Any:
    return run_watched_toy(database_url, job_id)


def test_a_watcher_gets_the_snapshot_then_every_change_in_order_then_the_final_event_and_the_stream_closes(
    base: str, prepared: str, tenant: TenantClient
) -> None:
    job_id = submit(prepared, tenant, units=3)
    thread, events, status = stream_in_background(base, f"/api/jobs/{job_id}/events", tenant.headers)
    wait_for(lambda: events)

    run(prepared, job_id)
    thread.join(30)

    assert status == [200]
    assert events[0]["event"] == "snapshot" and events[0]["data"]["status"] == "queued"
    assert events[-1]["event"] == "complete" and events[-1]["data"]["result"] == {"units": 3}
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "every event, in order, once"
    assert {e["event"] for e in events[1:-1]} <= {"started", "progress"}


def test_subscribing_after_the_end_gives_the_snapshot_and_the_final_event_and_a_reconnect_past_it_gets_204(
    base: str, prepared: str, tenant: TenantClient
) -> None:
    job_id = submit(prepared, tenant, units=1)
    run(prepared, job_id)

    status, events = read_stream(base, f"/api/jobs/{job_id}/events", tenant.headers)
    again, _ = read_stream(base, f"/api/jobs/{job_id}/events", tenant.headers | {"Last-Event-ID": events[-1]["id"]})

    assert status == 200 and [e["event"] for e in events] == ["snapshot", "complete"]
    assert "id" not in events[0] and events[0]["data"]["status"] == "done"
    assert again == 204


def test_last_event_id_resumes_with_no_gap_and_no_repeat_and_a_pruned_id_gets_resync(
    base: str, prepared: str, tenant: TenantClient
) -> None:
    job_id = submit(prepared, tenant, units=4)
    run(prepared, job_id)
    _, whole = read_stream(base, f"/api/jobs/{job_id}/events", tenant.headers | {"Last-Event-ID": "0"})
    middle = whole[3]["id"]

    _, rest = read_stream(base, f"/api/jobs/{job_id}/events", tenant.headers | {"Last-Event-ID": middle})
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox_event WHERE job_id = %s AND seq <= 3", [job_id])
    _, after_prune = read_stream(base, f"/api/jobs/{job_id}/events", tenant.headers | {"Last-Event-ID": "1"})

    assert [e.get("id") for e in rest[1:]] == [e["id"] for e in whole[1:] if int(e["id"]) > int(middle)]
    assert rest[0]["event"] == "snapshot"
    assert [e["event"] for e in after_prune] == ["resync", "complete"]


def test_the_stream_url_token_opens_this_job_only_and_a_tampered_or_foreign_token_is_refused(
    base: str, prepared: str, tenant: TenantClient, other_tenant: TenantClient, tmp_path: Path
) -> None:
    mine = submit(prepared, tenant, units=1)
    theirs = submit(prepared, other_tenant, units=1)
    run(prepared, mine)
    with httpx.Client(base_url=base) as http:
        url = http.get(f"/api/jobs/{mine}", headers=tenant.headers).json()["stream_url"]
    token = url.split("token=", 1)[1]

    ok, events = read_stream(base, url, {})
    foreign, _ = read_stream(base, f"/api/jobs/{theirs}/events?token={token}", {})
    tampered, _ = read_stream(base, url[:-2] + ("A" if url[-2] != "A" else "B") + url[-1], {})
    nobody, _ = read_stream(base, f"/api/jobs/{mine}/events", {})
    stranger, _ = read_stream(base, f"/api/jobs/{mine}/events", other_tenant.headers)
    # Another API process (another app on the same database) takes the same token.
    with serving(create_app(api_settings(prepared, tmp_path / "documents"))) as other_process:
        elsewhere, _ = read_stream(other_process, url, {})

    assert ok == 200 and events[-1]["event"] == "complete"
    assert (foreign, tampered, nobody, stranger) == (401, 401, 401, 404)
    assert elsewhere == 200
    assert tenant.token not in url


def test_with_its_listen_connection_killed_a_stream_catches_up_within_the_poll_interval(
    prepared: str, tenant: TenantClient, tmp_path: Path
) -> None:
    job_id = submit(prepared, tenant, units=2)
    settings = api_settings(prepared, tmp_path / "documents", api_stream_poll_seconds=0.5)
    with serving(create_app(settings)) as url:
        thread, events, _ = stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers)
        wait_for(lambda: events)
        with psycopg.connect(prepared, autocommit=True) as conn:
            killed = conn.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND application_name = 'recalq api listen'"
                                  ).fetchone()[0]
        assert killed >= 1
        run(prepared, job_id)
        thread.join(30)

    assert events[-1]["event"] == "complete"


def test_a_stream_is_never_gzipped(base: str, prepared: str, tenant: TenantClient) -> None:
    job_id = submit(prepared, tenant, units=1)
    run(prepared, job_id)
    with httpx.Client(base_url=base) as http, http.stream(
            "GET", f"/api/jobs/{job_id}/events", headers=tenant.headers | {"Accept-Encoding": "gzip"}) as answer:
        headers = answer.headers
        answer.read()

    assert "content-encoding" not in headers
    assert headers["cache-control"] == "no-store" and headers["x-accel-buffering"] == "no"
    assert headers["content-type"].startswith("text/event-stream")


def test_an_owner_has_a_cap_on_open_streams(prepared: str, tmp_path: Path) -> None:
    owner = new_tenant(prepared)
    job_id = submit(prepared, owner, units=1)
    settings = api_settings(prepared, tmp_path / "documents", api_max_streams_per_owner=2)
    with serving(create_app(settings)) as url:
        open_ = [stream_in_background(url, f"/api/jobs/{job_id}/events", owner.headers) for _ in range(2)]
        wait_for(lambda: all(events for _, events, _ in open_))
        third, _ = read_stream(url, f"/api/jobs/{job_id}/events", owner.headers)
        run(prepared, job_id)
        for thread, _, _ in open_:
            thread.join(30)

    assert third == 429
