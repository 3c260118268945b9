"""Uploads on every route while the API's database sessions are killed over and over.

What must hold afterwards: no answer is a 500; every 503 carries a key under which a retry is
either a replay of a change that committed or the change made once; no request's documents
exist twice; and once the orphan sweep has run, every stored file has a row and every row its
file.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg

from services.file_store import FileStore
from services.uploads import remove_orphans
from tests.harness.api import ADMIN_HEADERS, TenantClient, api_settings, new_tenant
from tests.harness.api_server import serving
from tests.harness.archives import zip_of

REQUESTS_PER_SENDER = 20
SENDERS = 4


@dataclass
class Sent:
    """One upload request, kept whole so it can be sent again byte for byte."""

    route: str
    send: Callable[[httpx.Client, dict[str, str]], httpx.Response]
    hashes: list[str]
    first: httpx.Response | None = None


def _text(tag: str) -> bytes:
    return f"Electrical Installation Condition Report {tag}\n".encode()


def _request(route: str, tenant: TenantClient) -> Sent:
    pid = tenant.property_ids[0]
    a, b = _text(uuid.uuid4().hex), _text(uuid.uuid4().hex)
    sha = [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()]
    if route == "client upload":
        return Sent(route, lambda h, k: h.post(f"/api/properties/{pid}/documents", headers=tenant.headers | k,
                                               files={"file": ("a.txt", a)}, data={"requirement_code": "eicr"}),
                    sha[:1])
    if route == "client bulk":
        return Sent(route, lambda h, k: h.post(f"/api/properties/{pid}/documents/bulk", headers=tenant.headers | k,
                                               files=[("files", ("a.txt", a)), ("files", ("b.txt", b))],
                                               data={"requirement_codes": ["eicr", "epc"]}), sha)
    if route == "client zip":
        archive = zip_of([("eicr/a.txt", a), ("epc/b.txt", b)])
        return Sent(route, lambda h, k: h.post(f"/api/properties/{pid}/documents/zip", headers=tenant.headers | k,
                                               files={"archive": ("a.zip", archive)}), sha)
    return Sent(route, lambda h, k: h.post(f"/api/admin/properties/{pid}/documents", headers=ADMIN_HEADERS | k,
                                           files={"file": ("a.txt", a)}, data={"requirement_code": "eicr"}),
                sha[:1])


ROUTES = ("client upload", "client bulk", "client zip", "admin upload")


def _kill_api_sessions(database_url: str, stop: threading.Event, kills: list[int]) -> None:
    with psycopg.connect(database_url, autocommit=True, application_name="backend-killer") as conn:
        while not stop.is_set():
            killed = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()
            kills.append(int(killed[0]) if killed else 0)
            stop.wait(0.15)  # a kill every 150 ms: uploads in flight die, new sessions get a window


def _until_served(request: Sent, http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    """What a client does with a 503: retry (the pool may still be reconnecting), within bounds."""
    deadline = time.monotonic() + 60
    answer = request.send(http, headers)
    while answer.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)  # Retry-After's role, shortened for a test
        answer = request.send(http, headers)
    return answer


def _rows(database_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT id, sha256 FROM documents").fetchall()


def test_uploads_on_every_route_through_backend_kills_leave_no_orphan_no_duplicate_and_no_unanswerable_503(
    database_url: str, tmp_path: Path
) -> None:
    tenant = new_tenant(database_url)
    store_dir = tmp_path / "documents"
    settings = api_settings(database_url, store_dir, api_caller_share=1.0, api_max_waiting=256,
                            api_max_wait_seconds=30, db_pool_timeout_seconds=2)
    sent: list[Sent] = []
    lock = threading.Lock()
    stop, kills = threading.Event(), []

    with serving(settings) as base:
        def sender(n: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                for i in range(REQUESTS_PER_SENDER):
                    request = _request(ROUTES[(n + i) % len(ROUTES)], tenant)
                    request.first = request.send(http, {})
                    with lock:
                        sent.append(request)

        killer = threading.Thread(target=_kill_api_sessions, args=(database_url, stop, kills))
        killer.start()
        senders = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(300)
        stop.set()
        killer.join(30)

        statuses = sorted({r.first.status_code for r in sent if r.first is not None})
        unavailable = [r for r in sent if r.first is not None and r.first.status_code == 503]
        assert sum(kills) > 0 and unavailable, f"the faults never hit an upload: {statuses}, {sum(kills)} kills"
        assert set(statuses) <= {201, 503}, [r.first.text for r in sent if r.first and r.first.status_code
                                             not in (201, 503)][:3]

        # Every 503 is answerable. One with a key may have committed: a retry under the key is a
        # replay or the change made now. One without came before the change began (while the
        # caller was authenticated) and says nothing changed: a plain retry is a new request.
        with httpx.Client(base_url=base, timeout=60) as http:
            retried = []
            for request in unavailable:
                assert request.first is not None
                key = request.first.headers.get("Idempotency-Key")
                if key is None:
                    assert "nothing was changed" in request.first.json()["detail"], request.first.text
                    assert all(sha not in {r["sha256"] for r in _rows(database_url)} for sha in request.hashes)
                retried.append(_until_served(request, http, {"Idempotency-Key": key} if key else {}))
    assert {a.status_code for a in retried} <= {200, 201}, [a.text for a in retried if a.status_code >= 300][:3]

    rows = _rows(database_url)
    by_hash: dict[str, int] = {}
    for row in rows:
        by_hash[row["sha256"]] = by_hash.get(row["sha256"], 0) + 1
    for request in sent:
        # Each request's files are its own: they exist once (it, or its retry, committed once).
        assert [by_hash.get(sha, 0) for sha in request.hashes] == [1] * len(request.hashes), request.route

    store = FileStore(store_dir)
    with psycopg.connect(database_url, autocommit=True) as conn:
        remove_orphans(conn, store, timedelta(0))
    stored = {sha for sha, _ in store.stored()}
    referenced = {row["sha256"] for row in rows}
    assert stored == referenced, (f"orphans: {len(stored - referenced)}, rows without a file: "
                                  f"{len(referenced - stored)}")
