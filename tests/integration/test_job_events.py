"""A watched job's Server-Sent Events over real sockets (uvicorn in a thread, real PostgreSQL):
order, ids, Last-Event-ID, resync, 204 after the end, tokens, the LISTEN connection's loss,
several API processes, and a client that stops reading."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from api.app import create_app
from outbox import watched
from outbox.backoff import RetryPolicy
from outbox.runner import JobRunner, RunnerPolicy
from tests.harness.api import TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.toy_kind import TOY_UNIT_TABLE, WATCHED_TASK, WatchedToyHandler, register_watched_toy

POLICY = RunnerPolicy(retry=RetryPolicy(base_seconds=1, max_seconds=5), infra_retry=RetryPolicy(1, 5),
                      busy_retry_seconds=0.1)


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
    with psycopg.connect(database_url) as conn:
        return watched.submit(conn, task=WATCHED_TASK, coalescing_key=f"toy:{uuid.uuid4().hex}", payload=payload,
                              correlation_id=uuid.uuid4().hex, trigger_reason="test", actor_type="client",
                              actor_id=str(owner.client_id)).job_id


def run(database_url: str, job_id: int) -> Any:
    return JobRunner(handler=WatchedToyHandler(), connection=lambda: psycopg.connect(database_url),
                     policy=POLICY).run(job_id)


def read_stream(base: str, path: str, headers: dict[str, str], *, into: list[dict[str, Any]] | None = None,
                timeout: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """The stream's status and its events (event, id, data), read until the server closes it."""
    found: list[dict[str, Any]] = into if into is not None else []
    with httpx.Client(base_url=base, timeout=timeout) as http, http.stream("GET", path, headers=headers) as answer:
        if answer.status_code != 200:
            return answer.status_code, found
        current: dict[str, Any] = {}
        for line in answer.iter_lines():
            if line == "":
                if "event" in current:
                    found.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                current[name] = json.loads(value) if name == "data" else value
        return 200, found


def stream_in_background(base: str, path: str, headers: dict[str, str]) -> tuple[threading.Thread,
                                                                                  list[dict[str, Any]], list[int]]:
    events: list[dict[str, Any]] = []
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(read_stream(base, path, headers, into=events)[0]))
    thread.start()
    return thread, events, status


def wait_for(predicate: Any, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


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


def test_three_api_processes_each_fan_every_event_out_to_their_own_watchers(
    prepared: str, tenant: TenantClient, tmp_path: Path
) -> None:
    job_id = submit(prepared, tenant, units=5)
    settings = api_settings(prepared, tmp_path / "documents", api_stream_poll_seconds=5)
    with serving(create_app(settings)) as a, serving(create_app(settings)) as b, serving(create_app(settings)) as c:
        # One at a time: three apps answering their very first requests at once in one test
        # process trip over pydantic's lazy schema building (an AttributeError from its
        # TypeAdapter); separate API processes do not share it. The fan-out is what is tested.
        watchers = []
        for url in (a, b, c):
            watchers.append(stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers))
            wait_for(lambda: bool(watchers[-1][1]))
        run(prepared, job_id)
        for thread, _, _ in watchers:
            thread.join(30)

    seen = [[e.get("id") for e in events[1:]] for _, events, _ in watchers]
    assert seen[0] == seen[1] == seen[2] and seen[0], seen
    assert all(events[-1]["event"] == "complete" for _, events, _ in watchers)


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


def test_a_client_that_stops_reading_is_dropped_without_stalling_another(
    prepared: str, tenant: TenantClient, tmp_path: Path
) -> None:
    import socket

    job_id = submit(prepared, tenant, units=1)
    settings = api_settings(prepared, tmp_path / "documents", api_stream_send_timeout_seconds=1)
    with serving(create_app(settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tenant.token}"
                        "\r\n\r\n".encode())  # and never reads
        thread, events, _ = stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers)
        wait_for(lambda: events)
        with psycopg.connect(prepared) as conn:  # a flood of events, far more than a socket buffer
            conn.execute("UPDATE outbox_job SET status = 'running', attempts = 1, started_at = now(), "
                         "lease_expires_at = now() + interval '1 minute' WHERE id = %s", [job_id])
            for i in range(3000):
                conn.execute("SELECT outbox_append_event(%s, 'progress', 1, %s)",
                             [job_id, json.dumps({"message": "x" * 200, "current": i})])
            conn.execute("UPDATE outbox_job SET status = 'done', finished_at = now(), lease_expires_at = NULL "
                         "WHERE id = %s", [job_id])
        thread.join(60)
        stalled.close()

    assert events[-1]["event"] == "complete"
    assert len(events) == 3000 + 3  # snapshot, 3000 progress, started, complete


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
