"""PostgreSQL restarted, cleanly and by a crash, while recalculations are in the middle of their
transactions: infrastructure errors must not count as attempts (docs/retries.md), so no job
goes DEAD, every job finishes on its first attempt, and each applies its effects once.

The database is a private cluster (tests/harness/private_services.py) because the shared one
serves everyone else. Two recalculations are held inside their apply transaction (the
`recalculation.after_read_state` wait probe) when the server goes down; they are let go while
it is still down, so they fail mid-transaction, and their Celery retries then fail again at
their start, unable to connect, before the server comes back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import psycopg
import pytest

from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.databases import DatabaseFactory
from tests.harness.flow import assert_converged, lines_with, start_pipeline, wait_for
from tests.harness.jobs import effects_of, job_row
from tests.harness.private_services import PrivatePostgres
from tests.harness.system import System, first_broker_url, kill_all

INFRA_RETRY = "database unavailable"
N_PROPERTIES = 6
HELD = 2  # the worker's concurrency: both pool children are mid-transaction at the restart


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def private_db_factory(private_postgres: PrivatePostgres) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(private_postgres.admin_url)
    yield factory
    if private_postgres.answers():
        factory.drop_template()


@pytest.fixture
def private_database_url(private_db_factory: DatabaseFactory, private_postgres: PrivatePostgres) -> Iterator[str]:
    url = private_db_factory.create()
    yield url
    if not private_postgres.answers():  # a failed test may leave it down
        private_postgres.start()
    private_db_factory.drop(url)


@pytest.fixture
def system(private_database_url: str, tmp_path: Path) -> Iterator[System]:
    """One broker: the fault is PostgreSQL's. A short pool timeout makes a task that cannot
    get a connection report the outage in seconds instead of holding its worker."""
    sut = System(private_database_url, first_broker_url(), tmp_path,
                 extra_env={"RECALQ_DB_POOL_TIMEOUT_SECONDS": "2"})
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()


def infra_retries(system: System) -> int:
    return lines_with(system.processes, INFRA_RETRY)


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean-restart", "crash-restart"])
def test_a_postgres_restart_under_running_recalculations_costs_no_attempt_and_every_job_converges(
    system: System, private_postgres: PrivatePostgres, private_database_url: str, tmp_path: Path, mode: str
) -> None:
    gate = tmp_path / "let-go"
    with psycopg.connect(private_database_url) as producer:
        property_ids = provision(producer, n_properties=N_PROPERTIES)
    worker, relay = start_pipeline(
        system, worker_env={"RECALQ_FAULT": f"recalculation.after_read_state=wait:{gate}"}, concurrency=HELD)

    with psycopg.connect(private_database_url, autocommit=True) as db:
        def running() -> list[int]:
            return [r[0] for r in db.execute("SELECT id FROM outbox_job WHERE status = 'running' ORDER BY id")]

        wait_for(system, lambda: len(running()) == HELD, 30, f"{HELD} recalculations mid-transaction")
        held = running()
    before = infra_retries(system)

    down_at = time.monotonic()
    private_postgres.stop(mode)
    gate.touch()
    wait_for(system, lambda: infra_retries(system) >= before + HELD + 1, 30,
             "the held tasks and a retry to meet the outage")
    outage_s = time.monotonic() - down_at
    private_postgres.start()
    up_at = time.monotonic()

    with psycopg.connect(private_database_url) as producer:
        after_restart = [
            upload(producer, pid, new_document("eicr", date(2031, 1, 1), DocumentStatus.VERIFIED))
            for pid in property_ids
        ]
    system.wait_idle(timeout=60)
    print(f"{mode}: down {outage_s:.1f}s, {infra_retries(system) - before} uncounted infrastructure retries, "
          f"idle {time.monotonic() - up_at:.1f}s after the restart")

    assert worker.popen.poll() is None and relay.popen.poll() is None, system.logs()
    assert any("relay lost the database" in line for line in list(relay.lines)), relay.output()
    with psycopg.connect(private_database_url, autocommit=True) as db:
        for job_id in held:
            assert any(f"job {job_id}: {INFRA_RETRY}" in line for line in list(worker.lines)), (
                f"held job {job_id} never met the outage:\n{worker.output()}")
            row = job_row(db, job_id)
            assert (row["status"], row["attempts"]) == ("done", 1), f"held job {job_id}: {row}"
            assert effects_of(db, job_id) == {"snapshots": 1, "audits": 1, "applied_by_attempts": [1]}
        for job_id in after_restart:
            assert job_row(db, job_id)["status"] == "done"
        histogram = assert_converged(db, max_attempts_seen=1)
        print(f"{mode}: done jobs by attempts {histogram}")


#: A lease shorter than the outage (kept above the task time limits, as the settings demand),
#: Celery's retries of the interrupted tasks spaced wider than the relay's reconnect backoff
#: (5 s) as they are in production (30 s), and a rescue that looks at once.
LONG_OUTAGE = {
    "RECALQ_TASK_SOFT_TIME_LIMIT": "3",
    "RECALQ_TASK_TIME_LIMIT": "4",
    "RECALQ_JOB_LEASE_SECONDS": "5",
    "RECALQ_INFRA_RETRY_MAX_SECONDS": "8",
    "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5",
}


@pytest.mark.slow
def test_a_postgres_outage_longer_than_the_job_lease_costs_no_attempt(
    system: System, private_postgres: PrivatePostgres, private_database_url: str, tmp_path: Path
) -> None:
    """docs/retries.md: an infrastructure error is never counted and the next delivery resumes
    the same attempt. When the outage outlasts the job lease, every interrupted job looks lost
    the moment the relay reconnects; its rescue must not count an attempt either."""
    gate = tmp_path / "let-go"
    system.apply_task_policy(LONG_OUTAGE)
    with psycopg.connect(private_database_url) as producer:
        provision(producer, n_properties=N_PROPERTIES)
    _, relay = start_pipeline(
        system, worker_env={**LONG_OUTAGE, "RECALQ_FAULT": f"recalculation.after_read_state=wait:{gate}"},
        relay_env=LONG_OUTAGE, concurrency=HELD)
    with psycopg.connect(private_database_url, autocommit=True) as db:
        def running() -> list[int]:
            return [r[0] for r in db.execute("SELECT id FROM outbox_job WHERE status = 'running' ORDER BY id")]

        wait_for(system, lambda: len(running()) == HELD, 30, f"{HELD} recalculations mid-transaction")
        held = running()
    before = infra_retries(system)

    down_at = time.monotonic()
    private_postgres.stop("fast")
    gate.touch()
    lease = float(LONG_OUTAGE["RECALQ_JOB_LEASE_SECONDS"])
    wait_for(system, lambda: infra_retries(system) >= before + HELD + 1 and time.monotonic() - down_at > lease + 1,
             30, "the outage to outlast the held jobs' lease")
    private_postgres.start()
    system.wait_idle(timeout=60)
    print(f"down {time.monotonic() - down_at:.1f}s (lease {lease}s)")

    assert relay.popen.poll() is None, relay.output()
    with psycopg.connect(private_database_url, autocommit=True) as db:
        rows = {job_id: job_row(db, job_id) for job_id in held}
        print({job_id: (r["status"], r["attempts"], r["rescue_count"], r["last_error"]) for job_id, r in rows.items()})
        for job_id, row in rows.items():
            assert (row["status"], row["attempts"]) == ("done", 1), f"held job {job_id}: {row}"
        assert_converged(db, max_attempts_seen=1)
