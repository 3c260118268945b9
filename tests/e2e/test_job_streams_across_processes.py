"""Watched-job streams served by real `recalq api` processes: several processes each fan every
event out to their own watchers (one LISTEN connection each), a stream token made by one process
opens the stream on another, a watcher process that stops reading (SIGSTOP) is dropped without
stalling the rest, and SIGTERM with streams open ends them and exits within the grace period."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest

from recalq.cli import API_GRACEFUL_SHUTDOWN_SECONDS
from tests.harness.api import new_tenant
from tests.harness.sse import stream_in_background, wait_for
from tests.harness.system import System, first_broker_url
from tests.harness.toy_kind import TOY_UNIT_TABLE, register_watched_toy, run_watched_toy, submit_watched_toy

#: A watcher in a process of its own that reads through a tiny receive buffer, so that once it is
#: stopped the server's writes to it back up after a few kilobytes, not megabytes.
STALLING_WATCHER = textwrap.dedent("""
    import socket, sys
    host, port, path, token = sys.argv[1:]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer {token}\\r\\n\\r\\n".encode())
    seen = b""
    while b"event: snapshot" not in seen:
        seen += sock.recv(4096)
    print("watching", flush=True)
    while chunk := sock.recv(1024):
        seen += chunk
    print("complete" if b"event: complete" in seen else "cut off", flush=True)
""")

FLOOD = 4000


@pytest.fixture
def system(database_url: str, tmp_path: Path) -> Iterator[System]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn, max_attempts=2)
        conn.execute(TOY_UNIT_TABLE)
    sut = System(database_url, first_broker_url(), tmp_path,
                 extra_env={"RECALQ_STORAGE_DIR": str(tmp_path / "documents")})
    yield sut
    sut.stop()


def test_three_api_processes_each_give_their_watchers_every_event_in_order_and_a_token_from_one_opens_another(
    system: System,
) -> None:
    tenant = new_tenant(system.database_url)
    job_id = submit_watched_toy(system.database_url, tenant.client_id, units=5)
    urls = [system.start_api({"RECALQ_API_STREAM_POLL_SECONDS": "5"})[1] for _ in range(3)]
    with httpx.Client(base_url=urls[0]) as http:
        stream_url = http.get(f"/api/jobs/{job_id}", headers=tenant.headers).json()["stream_url"]
    assert "token=" in stream_url

    watchers = [stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers) for url in urls]
    watchers.append(stream_in_background(urls[2], stream_url, {}))  # process A's token, on process C
    wait_for(lambda: all(events for _, events, _ in watchers))
    run_watched_toy(system.database_url, job_id)
    for thread, _, _ in watchers:
        thread.join(30)

    ids = [[event["id"] for event in events[1:]] for _, events, _ in watchers]
    assert [status for _, _, status in watchers] == [[200]] * 4
    assert ids[0] and all(seen == ids[0] for seen in ids), ids
    assert [int(i) for i in ids[0]] == sorted(int(i) for i in ids[0])
    assert all(events[-1]["event"] == "complete" for _, events, _ in watchers)


def test_a_watcher_process_that_stops_reading_is_dropped_without_stalling_the_others(system: System) -> None:
    tenant = new_tenant(system.database_url)
    job_id = submit_watched_toy(system.database_url, tenant.client_id, units=1)
    api, url = system.start_api({"RECALQ_API_STREAM_SEND_TIMEOUT_SECONDS": "1"})
    host, port = url.removeprefix("http://").split(":")
    with subprocess.Popen([sys.executable, "-c", STALLING_WATCHER, host, port, f"/api/jobs/{job_id}/events",
                           tenant.token], stdout=subprocess.PIPE, text=True) as stalling:
        assert stalling.stdout is not None
        assert stalling.stdout.readline().strip() == "watching"
        os.kill(stalling.pid, signal.SIGSTOP)
        try:
            thread, events, _ = stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers)
            wait_for(lambda: events)
            # 6 MB: more than the stopped reader's 4 KiB and the server's send buffer (loopback's
            # autotuning stops at 4 MiB) can hold, so the server's writes to it really do block.
            with psycopg.connect(system.database_url) as conn:
                conn.execute("UPDATE outbox_job SET status = 'running', attempts = 1, started_at = now(), "
                             "lease_expires_at = now() + interval '1 minute' WHERE id = %s", [job_id])
                for i in range(FLOOD):
                    conn.execute("SELECT outbox_append_event(%s, 'progress', 1, %s)",
                                 [job_id, json.dumps({"message": "x" * 1500, "current": i})])
                conn.execute("UPDATE outbox_job SET status = 'done', finished_at = now(), lease_expires_at = NULL "
                             "WHERE id = %s", [job_id])
            thread.join(60)
            assert events[-1]["event"] == "complete"
            assert len(events) == FLOOD + 3  # snapshot, the flood, started, complete
        finally:
            os.kill(stalling.pid, signal.SIGCONT)
        # Woken, the stopped watcher drains what its buffers held and finds the stream was cut.
        assert stalling.stdout.readline().strip() == "cut off"
        assert stalling.wait(30) == 0
    # Dropping it is the stream working as meant: one line, not a server error's traceback.
    assert "it stopped reading" in api.output()
    assert "Exception in ASGI application" not in api.output()


def test_sigterm_with_streams_open_ends_them_and_exits_within_the_grace_period(system: System) -> None:
    tenant = new_tenant(system.database_url)
    job_id = submit_watched_toy(system.database_url, tenant.client_id, units=1)  # never run: streams stay open
    api, url = system.start_api()
    watchers = [stream_in_background(url, f"/api/jobs/{job_id}/events", tenant.headers) for _ in range(5)]
    wait_for(lambda: all(events for _, events, _ in watchers))

    os.killpg(api.popen.pid, signal.SIGTERM)

    # uvicorn shuts down cleanly, then re-raises the signal it caught, as a supervisor expects.
    assert api.popen.wait(API_GRACEFUL_SHUTDOWN_SECONDS + 5) == -signal.SIGTERM, api.output()
    api.pump.join(10)
    assert "Application shutdown complete." in api.output()
    for thread, _, _ in watchers:
        thread.join(10)
        assert not thread.is_alive()
    assert all(events[0]["event"] == "snapshot" for _, events, _ in watchers)
