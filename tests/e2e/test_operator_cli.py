"""The operator commands as ops run them: the installed `recalq` console script in a
subprocess, against a real database (and, for requeue, a real relay and worker).

Jobs are put into the states a test needs through the outbox's own functions (a worker's
start and permanent failure make a DEAD job), so what the commands print can be checked
against what the database holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import lifecycle
from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import provision
from tests.harness.observe import assert_fresh_score, connect, history_count, job, job_status
from tests.harness.services import ROOT, brokers
from tests.harness.system import System, wait_until

RECALQ = Path(sys.executable).with_name("recalq")
STATUS_COLUMNS = ("task", "status", "jobs", "oldest", "relay_lag", "finished_1m", "finished_5m", "rate")


def recalq(*args: str, database_url: str, stdin: str = "", timeout: float = 60,
           extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One run of the console script with only DATABASE_URL / BROKER_URL from the test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECALQ_") and k not in {"DATABASE_URL", "BROKER_URL"}}
    env.update(DATABASE_URL=database_url, BROKER_URL=next(iter(brokers().values())), PYTHONPATH=str(ROOT),
               **(extra_env or {}))
    assert RECALQ.exists(), f"the recalq console script is not installed next to {sys.executable}"
    return subprocess.run([str(RECALQ), *args], env=env, cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


def kill_job(conn: psycopg.Connection, job_id: int, error: str) -> None:
    """What a worker does with a permanent failure: start the attempt, fail it for good."""
    with conn.transaction():
        start = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
        assert start.attempt is not None, start
        assert lifecycle.fail(conn, job_id, start.attempt, error=error, retryable=False,
                              retry_in_seconds=1) == lifecycle.FailOutcome.DEAD


def jobs_of(conn: psycopg.Connection, property_ids: list[int]) -> list[int]:
    return [conn.execute("SELECT id FROM outbox_job WHERE coalescing_key = %s", [f"property:{p}"]).fetchone()[0]
            for p in property_ids]


def requeue_audits(conn: psycopg.Connection) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT actor_type, actor_id, job_id, correlation_id, details FROM audit_log "
                           "WHERE action = 'JOB_REQUEUED' ORDER BY id").fetchall()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with connect(database_url) as conn:
        yield conn


@pytest.fixture
def three_pending_one_dead(db: psycopg.Connection) -> tuple[list[int], int]:
    """Four provisioned properties: three pending jobs and one DEAD job."""
    *pending, dead = jobs_of(db, provision(db, n_properties=4))
    kill_job(db, dead, "property data is corrupt: no such requirement 'gas_safty'")
    return pending, dead


def status_table(stdout: str, task: str = RECALCULATE_TASK) -> dict[str, dict[str, str]]:
    """The `recalq status` table's rows of one task, by status."""
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["TASK", "STATUS", "JOBS"], stdout
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = dict(zip(STATUS_COLUMNS, line.split(), strict=True))
        if cells["task"] == task:
            rows[cells["status"]] = cells
    return rows


# -- status ----------------------------------------------------------------------------------


def test_status_prints_the_jobs_of_each_status_as_the_view_holds_them_with_a_summary(
    db: psycopg.Connection, database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    result = recalq("status", database_url=database_url)

    assert result.returncode == 0, result.stderr
    table = status_table(result.stdout)
    view = {row[0]: row[1] for row in db.execute("SELECT status::text, jobs FROM outbox_queue_state WHERE task = %s",
                                                 [RECALCULATE_TASK]).fetchall()}
    assert set(table) == set(view) == {"pending", "published", "running", "retrying", "done", "dead", "superseded",
                                       "cancelled"}
    for status, jobs in view.items():
        assert table[status]["jobs"] == ("-" if jobs is None else str(jobs)), (status, result.stdout)
    assert (table["pending"]["jobs"], table["dead"]["jobs"], table["running"]["jobs"]) == ("3", "1", "0")
    assert table["dead"]["finished_1m"] == "1" and table["dead"]["finished_5m"] == "1"
    assert table["pending"]["relay_lag"] != "-", "three due pending jobs wait for a relay"
    assert "3 pending, 0 published, 0 running, 0 retrying, 1 dead" in result.stdout
    assert "`recalq jobs --status dead`" in result.stdout


def test_status_json_gives_the_view_rows_to_machines(
    db: psycopg.Connection, database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    result = recalq("status", "--json", database_url=database_url)

    assert result.returncode == 0, result.stderr
    rows = {(r["task"], r["status"]): r for r in json.loads(result.stdout)}
    view = db.execute("SELECT task, status::text, jobs, finished_last_5m FROM outbox_queue_state").fetchall()
    assert {key: (r["jobs"], r["finished_last_5m"]) for key, r in rows.items()} == {
        (task, status): (jobs, finished) for task, status, jobs, finished in view
    }


def test_status_exits_2_with_a_sentence_and_no_traceback_when_the_database_is_unreachable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = recalq("status", database_url=f"postgresql://postgres:s3cret@127.0.0.1:{port}/recalq")

    assert result.returncode == 2
    assert result.stderr.startswith(f"recalq status: cannot reach the database 127.0.0.1:{port}/recalq"), result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
    assert result.stdout == ""


# -- jobs ------------------------------------------------------------------------------------


def test_jobs_status_dead_lists_the_dead_job_with_its_attempts_and_error_and_nothing_else(
    database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    _, dead = three_pending_one_dead
    result = recalq("jobs", "--status", "dead", database_url=database_url)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "TASK", "KEY", "STATUS"]
    [row] = lines[1:lines.index("")]  # the table ends at a blank line
    assert row.split()[:5] == [str(dead), "compliance.recalculate_property", row.split()[2], "dead", "1/5"]
    assert "property data is corrupt" in row
    assert lines[-1] == "1 job, newest first"


def test_job_shows_every_attempt_of_a_job_with_its_own_error_and_json_gives_them_in_full(
    db: psycopg.Connection, database_url: str
) -> None:
    [job_id] = jobs_of(db, provision(db, n_properties=1))
    with db.transaction():
        first = lifecycle.start(db, job_id, redelivered=False, lease_seconds=60, worker="w1@host")
        lifecycle.fail(db, job_id, first.attempt, error="provider answered 503", retryable=True, retry_in_seconds=0)
    db.execute("UPDATE outbox_job SET next_run_at = now() WHERE id = %s", [job_id])
    kill_job(db, job_id, "property data is corrupt")

    result = recalq("job", str(job_id), database_url=database_url)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"job {job_id}  compliance.recalculate_property")
    assert lines[1].startswith("status dead, attempt 2 of 5")
    assert lines[2] == "last error: property data is corrupt"
    table = lines[lines.index("") + 1:]
    assert table[0].split()[:3] == ["RUN", "ATTEMPT", "OUTCOME"]
    assert [row.split()[:3] for row in table[1:]] == [["0", "1", "failed"], ["0", "2", "failed"]]
    assert "provider answered 503" in table[1] and "w1@host" in table[1]
    assert "property data is corrupt" in table[2]

    as_json = json.loads(recalq("job", str(job_id), "--json", database_url=database_url).stdout)
    assert [(a["attempt"], a["error"]) for a in as_json["attempts_history"]] == [
        (1, "provider answered 503"), (2, "property data is corrupt")]
    missing = recalq("job", "999999", database_url=database_url)
    assert (missing.returncode, missing.stderr.strip()) == (1, "recalq job: job 999999 does not exist")


def test_jobs_refuses_an_unknown_status_with_exit_2_naming_the_valid_ones() -> None:
    result = recalq("jobs", "--status", "zombie", database_url="postgresql://unused@127.0.0.1/unused")

    assert result.returncode == 2
    assert "invalid choice: 'zombie'" in result.stderr
    for status in ("pending", "published", "running", "retrying", "done", "dead", "superseded"):
        assert f"'{status}'" in result.stderr


# -- requeue ---------------------------------------------------------------------------------


def test_requeue_of_a_job_that_is_not_dead_exits_1_naming_its_status_and_changes_nothing(
    db: psycopg.Connection, database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    pending, _ = three_pending_one_dead
    result = recalq("requeue", str(pending[0]), database_url=database_url)

    assert result.returncode == 1
    assert result.stderr.strip() == (f"recalq requeue: job {pending[0]} is pending, not dead; only a dead job can be "
                                     "requeued (`recalq jobs --status dead` lists them)")
    assert job_status(db, pending[0]) == "pending" and job(db, pending[0])["requeue_count"] == 0
    assert requeue_audits(db) == []

    unknown = recalq("requeue", "987654", database_url=database_url)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "recalq requeue: job 987654 does not exist"


def test_requeue_all_asks_first_and_requeues_every_dead_job_with_an_audit_row_only_when_told_yes(
    db: psycopg.Connection, database_url: str
) -> None:
    first, second, alive = jobs_of(db, provision(db, n_properties=3))
    kill_job(db, first, "boom")
    kill_job(db, second, "boom")

    refused = recalq("requeue", "--all", database_url=database_url, stdin="n\n")
    assert refused.returncode == 1
    assert f"Requeue 2 dead jobs ({first}, {second})? [y/N]" in refused.stdout
    assert "not confirmed; nothing requeued" in refused.stderr
    assert (job_status(db, first), job_status(db, second)) == ("dead", "dead")
    assert requeue_audits(db) == []

    confirmed = recalq("requeue", "--all", database_url=database_url, stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.splitlines()[-1] == f"requeued 2 dead jobs: {first}, {second}"
    assert [job_status(db, j) for j in (first, second, alive)] == ["pending", "pending", "pending"]
    audits = requeue_audits(db)
    assert [a["job_id"] for a in audits] == [first, second]
    assert {(a["actor_type"], a["details"]["runs_as"] == a["job_id"]) for a in audits} == {("system", True)}
    assert all(re.fullmatch(r"cli:.+", a["actor_id"]) for a in audits)
    assert len({a["correlation_id"] for a in audits}) == 1, "one run's requeues share a correlation id"

    again = recalq("requeue", "--all", "--yes", database_url=database_url)
    assert (again.returncode, again.stdout.strip()) == (0, "no dead jobs at all; nothing requeued")


def test_requeue_key_requeues_the_dead_jobs_of_that_key_only(db: psycopg.Connection, database_url: str) -> None:
    mine, other = provision(db, n_properties=2)
    mine_job, other_job = jobs_of(db, [mine, other])
    kill_job(db, mine_job, "boom")
    kill_job(db, other_job, "boom")

    result = recalq("requeue", "--key", f"property:{mine}", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"requeued 1 dead job: {mine_job}"
    assert (job_status(db, mine_job), job_status(db, other_job)) == ("pending", "dead")


@pytest.fixture
def system(database_url: str, tmp_path: Path) -> Iterator[System]:
    """A real relay and worker on one broker: requeueing does not depend on which."""
    sut = System(database_url, next(iter(brokers().values())), tmp_path)
    yield sut
    sut.stop()


def test_a_job_dead_from_a_held_lock_is_requeued_by_the_cli_and_ends_done_once_the_lock_is_gone(
    system: System, database_url: str
) -> None:
    # One attempt per job (what `recalq migrate` applies from RECALQ_MAX_ATTEMPTS), so the job dies at once.
    migrated = recalq("migrate", database_url=database_url, extra_env={"RECALQ_MAX_ATTEMPTS": "1"})
    assert migrated.returncode == 0, migrated.stderr
    with connect(database_url) as conn, psycopg.connect(database_url) as locker:
        [property_id] = provision(conn)
        [job_id] = jobs_of(conn, [property_id])
        # The cause: a long transaction holds the property's row lock, so the attempt meets lock_timeout.
        locker.execute("SELECT id FROM properties WHERE id = %s FOR UPDATE", [property_id])
        system.start_worker(env={"RECALQ_LOCK_TIMEOUT_MS": "200"})
        system.start_relay()
        wait_until(lambda: job_status(conn, job_id) == "dead", 60, "the job to die")

        dead = recalq("jobs", "--status", "dead", database_url=database_url)
        listed = rf"^\s*{job_id}\s.*\sdead\s+1/1\s.*LockNotAvailable\[55P03\]"
        assert dead.returncode == 0 and re.search(listed, dead.stdout, re.MULTILINE), dead.stdout

        locker.rollback()  # the cause is removed
        result = recalq("requeue", str(job_id), database_url=database_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"requeued 1 dead job: {job_id}"

        drained = recalq("drain", "--timeout", "60", "--interval", "0.2", database_url=database_url, timeout=90)
        assert drained.returncode == 0, drained.stdout + drained.stderr + system.logs()
        assert "drained in" in drained.stdout
        assert job_status(conn, job_id) == "done"
        assert job(conn, job_id)["requeue_count"] == 1
        assert assert_fresh_score(conn, property_id) == 0
        assert history_count(conn, property_id) == 1
        [audit] = requeue_audits(conn)
        assert (audit["job_id"], audit["actor_type"], audit["details"]) == (job_id, "system", {"runs_as": job_id})


# -- drain -----------------------------------------------------------------------------------


def test_drain_exits_0_at_once_when_nothing_is_left_to_run_and_reports_the_dead_jobs(
    db: psycopg.Connection, database_url: str
) -> None:
    [only] = jobs_of(db, provision(db))
    kill_job(db, only, "boom")

    result = recalq("drain", "--timeout", "5", database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert "nothing pending, published, running or retrying" in result.stdout
    assert "1 dead job did not block the drain" in result.stdout


def test_drain_times_out_with_exit_1_and_says_what_is_left_when_no_worker_runs(
    database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    result = recalq("drain", "--timeout", "1", "--interval", "0.2", database_url=database_url)

    assert result.returncode == 1
    assert re.match(r"recalq drain: timed out after 1 s with 3 pending left \(oldest [\d.]+s, relay lag [\d.]+s\); "
                    r"1 dead;", result.stderr), result.stderr
    assert "3 left (3 pending)" in result.stdout, "a progress line shows what is left"
