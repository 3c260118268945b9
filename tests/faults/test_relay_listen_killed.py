"""The relay's LISTEN connection terminated by the server (pg_terminate_backend).

LISTEN/NOTIFY is how a commit wakes the relay at once; polling is the truth. A relay that
lost its LISTEN session without noticing would still publish, but only on its poll interval,
and every commit would silently pay that latency. So the relay here polls only every 30 s:
a commit published within a few seconds of the termination proves the relay noticed, listened
again on a new session, and was woken by the commit's NOTIFY.

Terminating one backend of the test's own database touches nobody else on the shared server.
"""

from __future__ import annotations

import time
from datetime import date

import psycopg

from outbox.relay import WAKE_CHANNEL
from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.flow import assert_converged, start_pipeline, wait_for
from tests.harness.jobs import job_row
from tests.harness.system import System, wait_until

#: Far longer than any wait below: only a NOTIFY can wake the relay in time.
POLL_SECONDS = "30"
#: A woken relay publishes in milliseconds; seconds of slack for a loaded machine.
PROMPT_S = 5.0


def listening_backends(conn: psycopg.Connection) -> list[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
        [f"LISTEN {WAKE_CHANNEL}"],
    ).fetchall()
    return [pid for (pid,) in rows]


def published_within(conn: psycopg.Connection, job_id: int, seconds: float) -> float:
    """Seconds from now until the job is published; fails after `seconds`."""
    started = time.monotonic()
    wait_until(lambda: job_row(conn, job_id)["status"] != "pending", seconds,
               f"job {job_id} to be published (the relay polls only every {POLL_SECONDS}s)")
    return time.monotonic() - started


def test_a_relay_whose_listen_session_is_terminated_listens_again_and_is_woken_by_the_next_commit(
    system_on_one_broker: System, database_url: str
) -> None:
    """One broker is enough: the fault is between the relay and PostgreSQL."""
    system = system_on_one_broker
    _, relay = start_pipeline(system, relay_env={"RECALQ_RELAY_POLL_SECONDS": POLL_SECONDS})
    with psycopg.connect(database_url, autocommit=True) as db, psycopg.connect(database_url) as producer:
        [property_id] = provision(producer)
        system.wait_idle(timeout=PROMPT_S + 30)  # the first job, woken by its NOTIFY
        [old] = listening_backends(db)

        assert db.execute("SELECT pg_terminate_backend(%s)", [old]).fetchone() == (True,)
        terminated_at = time.monotonic()
        wait_for(system, lambda: any(pid != old for pid in listening_backends(db)), PROMPT_S,
                 "the relay to LISTEN on a new session")
        relisten_s = time.monotonic() - terminated_at
        [new] = listening_backends(db)
        assert new != old and old not in listening_backends(db)
        assert any("relay lost the database" in line for line in list(relay.lines)), relay.output()

        job_id = upload(producer, property_id, new_document("gas_safety", date(2031, 1, 1), DocumentStatus.VERIFIED))
        latency_s = published_within(db, job_id, PROMPT_S)
        print(f"re-LISTEN {relisten_s:.2f}s after the termination; next commit published in {latency_s:.2f}s")

        system.wait_idle(timeout=30)
        assert relay.popen.poll() is None, f"the relay died:\n{relay.output()}"
        assert job_row(db, job_id)["status"] == "done"
        assert_converged(db, max_attempts_seen=1)
