"""The operator commands as ops run them: the installed `recalq` console script in a
subprocess, against a real database (and, for requeue, a real relay and worker; for finding the
database without DATABASE_URL, a real `recalq up`).

Jobs are put into the states a test needs through the outbox's own functions (a worker's
start and permanent failure make a DEAD job), so what the commands print can be checked
against what the database holds. Only ages are set by hand (finished_at moved into the past),
never by sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import lifecycle, watched
from services.recalc_requests import request_recalculation
from services.vocabulary import RECALCULATE_TASK, Actor, TriggerReason
from tests.e2e.test_up_command import READY, STARTUP_SECONDS, RecalqCommand
from tests.harness.data import provision
from tests.harness.observe import assert_fresh_score, connect, history_count, job, job_status
from tests.harness.services import ROOT, brokers
from tests.harness.system import System, wait_until
from tests.harness.toy_kind import WATCHED_TASK, register_watched_toy

RECALQ = Path(sys.executable).with_name("recalq")
STATUS_COLUMNS = ("task", "status", "jobs", "oldest", "relay_lag", "finished_1m", "finished_5m", "rate")


def recalq(*args: str, database_url: str | None, stdin: str = "", timeout: float = 60,
           extra_env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """One run of the console script with only DATABASE_URL (none when None) / BROKER_URL from the
    test."""
    return subprocess.run([str(RECALQ), *args], env=recalq_env(database_url, extra_env), cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def recalq_env(database_url: str | None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RECALQ_") and k not in {"DATABASE_URL", "BROKER_URL"}}
    env.update(BROKER_URL=next(iter(brokers().values())), PYTHONPATH=str(ROOT), **(extra_env or {}))
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    assert RECALQ.exists(), f"the recalq console script is not installed next to {sys.executable}"
    return env


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


def finish_job(conn: psycopg.Connection, job_id: int, seconds_ago: float | None = None) -> None:
    """What a worker does with a success; then, if asked, moves the finish into the past."""
    with conn.transaction():
        start = lifecycle.start(conn, job_id, redelivered=False, lease_seconds=60)
        assert start.attempt is not None, start
        assert lifecycle.complete(conn, job_id, start.attempt)
    if seconds_ago is not None:
        conn.execute("UPDATE outbox_job SET finished_at = now() - make_interval(secs => %s) WHERE id = %s",
                     [seconds_ago, job_id])


def test_drain_shows_what_finished_in_the_window_it_names_not_a_minute_over_60(
    db: psycopg.Connection, database_url: str
) -> None:
    *finished, left = jobs_of(db, provision(db, n_properties=12))
    for job_id in finished[:7]:
        finish_job(db, job_id, seconds_ago=2)  # inside the last 10 s
    for job_id in finished[7:]:
        finish_job(db, job_id, seconds_ago=40)  # inside the last minute, not the last 10 s

    result = recalq("drain", "--timeout", "1", "--interval", "0.2", database_url=database_url)

    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert "1 left (1 pending); finished 7 in the last 10 s: 0.7/s; backlog trend: measuring" in first, first
    assert "finished/s" not in result.stdout
    assert job_status(db, left) == "pending"


def test_drain_counts_the_jobs_finished_meanwhile_and_the_backlog_they_took_away_over_the_same_time(
    db: psycopg.Connection, database_url: str
) -> None:
    jobs = jobs_of(db, provision(db, n_properties=10))
    drain = subprocess.Popen([str(RECALQ), "drain", "--timeout", "30", "--interval", "0.2"],
                             env=recalq_env(database_url), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert drain.stdout is not None
        first = drain.stdout.readline()
        assert "10 left (10 pending); finished 0 in the last 10 s: 0.0/s; backlog trend: measuring" in first, first
        for job_id in jobs[:4]:  # as workers would, while the drain watches
            finish_job(db, job_id)
        second = drain.stdout.readline()  # the next line, PROGRESS_LINE_EVERY_SECONDS later
    finally:
        drain.kill()
        drain.communicate(timeout=10)
    finished_now = db.execute("SELECT count(*) FROM outbox_job WHERE finished_at > now() - interval '10 s'"
                              ).fetchone()[0]
    assert finished_now == 4
    assert "6 left (6 pending); finished 4 in the last 10 s: 0.4/s; backlog shrinking " in second, second
    trend = re.search(r"backlog shrinking ([\d.]+)/s over the last (\d+) s, about \S+ to go$", second.strip())
    assert trend, second
    per_second, span = float(trend.group(1)), int(trend.group(2))
    assert 5 <= span < 10 and abs(per_second * span - 4) <= 0.6, f"4 jobs went in {span} s, not {per_second}/s"


# -- purge-dead ------------------------------------------------------------------------------


def requests_of(conn: psycopg.Connection, job_ids: list[int]) -> int:
    return conn.execute("SELECT count(*) FROM outbox_request WHERE job_id = ANY(%s)", [job_ids]).fetchone()[0]


def existing(conn: psycopg.Connection, job_ids: list[int]) -> set[int]:
    return {row[0] for row in conn.execute("SELECT id FROM outbox_job WHERE id = ANY(%s)", [job_ids])}


def test_purge_dead_older_than_shows_the_jobs_asks_and_purges_only_them_and_only_on_yes(
    db: psycopg.Connection, database_url: str
) -> None:
    old_a, old_b, recent, alive = jobs_of(db, provision(db, n_properties=4))
    for job_id in (old_a, old_b, recent):
        kill_job(db, job_id, "property data is corrupt")
    db.execute("UPDATE outbox_job SET finished_at = now() - interval '10 days' WHERE id = ANY(%s)", [[old_a, old_b]])
    requests = requests_of(db, [old_a, old_b])
    shown = (f"2 dead jobs that died more than 7d ago: {old_a}, {old_b} (died 10d00h ago), with their {requests} "
             "requests")

    refused = recalq("purge-dead", "--older-than", "7d", database_url=database_url, stdin="n\n")

    assert refused.returncode == 1
    assert refused.stdout.splitlines()[0] == shown
    assert "Purge them for good? [y/N]" in refused.stdout
    assert refused.stderr.strip() == ("recalq purge-dead: not confirmed; nothing purged (pass --yes to skip the "
                                      "question)")
    assert existing(db, [old_a, old_b, recent, alive]) == {old_a, old_b, recent, alive}
    assert requests_of(db, [old_a, old_b]) == requests

    confirmed = recalq("purge-dead", "--older-than", "7d", database_url=database_url, stdin="y\n")

    assert confirmed.returncode == 0, confirmed.stderr
    assert confirmed.stdout.splitlines()[0] == shown
    assert confirmed.stdout.splitlines()[-1] == (f"purged 2 dead jobs for good ({old_a}, {old_b}), with their "
                                                 f"{requests} requests")
    assert existing(db, [old_a, old_b, recent, alive]) == {recent, alive}
    assert requests_of(db, [old_a, old_b]) == 0
    assert (job_status(db, recent), job_status(db, alive)) == ("dead", "pending")

    again = recalq("purge-dead", "--older-than", "7d", "--yes", database_url=database_url)
    assert (again.returncode, again.stdout.strip()) == (0, "no dead jobs that died more than 7d ago; nothing purged")


def test_purge_dead_dry_run_counts_what_goes_with_a_job_and_yes_purges_it_with_its_superseded_one(
    db: psycopg.Connection, database_url: str
) -> None:
    [property_id, other] = provision(db, n_properties=2)
    first, other_job = jobs_of(db, [property_id, other])
    kill_job(db, first, "boom")
    kill_job(db, other_job, "boom")
    second = request_recalculation(db, property_id, trigger=TriggerReason.MANUAL_RECALCULATION,
                                   actor=Actor.system("test"), correlation_id=uuid.uuid4().hex)
    requeued = recalq("requeue", str(first), database_url=database_url)
    assert requeued.stdout.splitlines()[-1] == f"covered by a job already waiting for its key: {first} -> {second}"
    kill_job(db, second, "boom again")  # the job that covers the first dies too
    requests = requests_of(db, [first, second])
    key = f"property:{property_id}"

    dry = recalq("purge-dead", "--key", key, "--dry-run", database_url=database_url)

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"1 dead job of key '{key}': {second} (died {dry.stdout.split('(died ')[1].split(')')[0]}), with 1 "
        f"superseded job it covered and {requests} requests",
        "dry run: nothing purged (without --dry-run, `recalq purge-dead` asks, then purges it)",
    ]
    assert existing(db, [first, second]) == {first, second}

    purged = recalq("purge-dead", "--key", key, "--yes", database_url=database_url)

    assert purged.returncode == 0, purged.stderr
    assert "[y/N]" not in purged.stdout
    assert purged.stdout.splitlines()[-1] == (f"purged 1 dead job for good ({second}), with 1 superseded job it "
                                              f"covered and {requests} requests")
    assert existing(db, [first, second, other_job]) == {other_job}


def test_purge_dead_refuses_a_job_that_is_not_dead_and_a_missing_selection_and_purges_nothing(
    db: psycopg.Connection, database_url: str, three_pending_one_dead: tuple[list[int], int]
) -> None:
    pending, dead = three_pending_one_dead

    named = recalq("purge-dead", str(dead), str(pending[0]), "987654", "--yes", database_url=database_url)
    assert named.returncode == 1
    assert named.stderr.strip() == (f"recalq purge-dead: job {pending[0]} is pending; job 987654 does not exist: only "
                                    "a dead job can be purged (`recalq jobs --status dead` lists them); nothing purged")

    for argv, message in [
        ([], "say which dead jobs to purge: JOB_ID ..., --key KEY, --older-than AGE (e.g. 7d), or --all"),
        (["--all", str(dead)], "--all purges every dead job: give it without job ids, --key or --older-than"),
    ]:
        refused = recalq("purge-dead", *argv, "--yes", database_url=database_url)
        assert (refused.returncode, refused.stderr.strip()) == (2, f"recalq purge-dead: {message}")
    bad_age = recalq("purge-dead", "--older-than", "7", database_url=database_url)
    assert bad_age.returncode == 2
    assert "argument --older-than: '7' is not an age (a unit is needed); write it like 7d" in bad_age.stderr
    assert existing(db, [*pending, dead]) == {*pending, dead}

    everything = recalq("purge-dead", "--all", database_url=database_url, stdin="yes\n")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.startswith(f"1 dead job in all: {dead} (died ")
    assert existing(db, [*pending, dead]) == set(pending)


# -- cancel ----------------------------------------------------------------------------------


@pytest.fixture
def toy_jobs(db: psycopg.Connection) -> Iterator[Callable[[], int]]:
    """Submits jobs of the watched toy kind (cancellable), as a client would."""
    register_watched_toy(db)

    def submit() -> int:
        return watched.submit(db, task=WATCHED_TASK, coalescing_key=f"toy:{uuid.uuid4().hex[:8]}",
                              payload={"units": 3}, correlation_id=uuid.uuid4().hex, trigger_reason="test",
                              actor_type="client", actor_id="7").job_id

    yield submit


def test_cancel_stops_a_job_that_has_not_started_at_once_and_a_second_cancel_changes_nothing(
    db: psycopg.Connection, database_url: str, toy_jobs: Callable[[], int]
) -> None:
    job_id = toy_jobs()
    key = job(db, job_id)["coalescing_key"]

    result = recalq("cancel", str(job_id), database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cancelled job {job_id} ({WATCHED_TASK}, key {key}): it was waiting to run, " \
                                    "and now never will"
    assert job_status(db, job_id) == "cancelled"
    again = recalq("cancel", str(job_id), database_url=database_url)
    assert (again.returncode, again.stdout.strip()) == (
        0, f"job {job_id} ({WATCHED_TASK}, key {key}) was already cancelled; nothing changed")


def test_cancel_asks_a_running_job_to_stop_at_its_next_unit(
    db: psycopg.Connection, database_url: str, toy_jobs: Callable[[], int]
) -> None:
    job_id = toy_jobs()
    with db.transaction():
        assert lifecycle.start(db, job_id, redelivered=False, lease_seconds=60).attempt == 1

    result = recalq("cancel", str(job_id), database_url=database_url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"asked job {job_id} ({WATCHED_TASK}, key ")
    assert result.stdout.strip().endswith(": it is running and stops at its next unit; "
                                          f"`recalq job {job_id}` shows it cancelled once it has")
    row = db.execute("SELECT status::text, cancel_requested_at IS NOT NULL FROM outbox_job WHERE id = %s",
                     [job_id]).fetchone()
    assert row == ("running", True)


def test_cancel_refuses_a_recalculation_a_finished_job_and_a_missing_one_with_exit_1(
    db: psycopg.Connection, database_url: str, toy_jobs: Callable[[], int],
    three_pending_one_dead: tuple[list[int], int],
) -> None:
    pending, _ = three_pending_one_dead
    done = toy_jobs()
    finish_job(db, done)

    recalculation = recalq("cancel", str(pending[0]), database_url=database_url)
    assert recalculation.returncode == 1
    assert recalculation.stderr.strip() == (
        f"recalq cancel: job {pending[0]} ({RECALCULATE_TASK}, key {job(db, pending[0])['coalescing_key']}) cannot be "
        "cancelled: a coalescing kind carries the requests of every change coalesced into it, which cancelling would "
        "drop; nothing changed")
    assert job_status(db, pending[0]) == "pending"

    finished = recalq("cancel", str(done), database_url=database_url)
    assert finished.returncode == 1
    assert finished.stderr.strip().endswith("already ended (done); there is nothing to cancel"), finished.stderr
    assert job_status(db, done) == "done"

    missing = recalq("cancel", "987654", database_url=database_url)
    assert (missing.returncode, missing.stderr.strip()) == (1, "recalq cancel: job 987654 does not exist")


# -- without DATABASE_URL: the database of the running `recalq up` -----------------------------


def test_without_database_url_and_no_running_up_a_command_exits_2_saying_to_start_one(tmp_path: Path) -> None:
    var = tmp_path / "var"
    for command in ("status", "jobs", "drain"):
        result = recalq(command, database_url=None, extra_env={"RECALQ_DATA_DIR": str(var)})
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip() == (
            f"recalq {command}: DATABASE_URL is not set; no `recalq up` with an embedded database is running in {var} "
            "(RECALQ_DATA_DIR, default ./var) either: start one with `recalq up`, or point DATABASE_URL at recalq's "
            "database, e.g. DATABASE_URL=postgresql://app@db:5432/recalq")
        assert result.stdout == ""
    assert not var.exists(), "looking creates nothing"


@pytest.fixture
def up() -> Iterator[RecalqCommand]:
    """`recalq up` with embedded services in a fresh data dir directly under /tmp (see
    tests/e2e/test_up_command.py for why), started from the data dir's parent and ready."""
    home = Path(tempfile.mkdtemp(prefix="recalq-op-test-"))
    command = RecalqCommand(["up"], home / "var", cwd=home)
    try:
        command.wait_for(READY, STARTUP_SECONDS)
        yield command
    finally:
        command.kill()
        postmaster = home / "var" / "postgres" / "postmaster.pid"
        if postmaster.exists():  # killed: stop its server before deleting its files
            with contextlib.suppress(psutil.NoSuchProcess, ValueError):
                psutil.Process(int(postmaster.read_text().split()[0])).terminate()
        shutil.rmtree(home, ignore_errors=True)


def test_without_database_url_the_commands_use_the_embedded_database_of_the_running_up_and_say_so(
    up: RecalqCommand,
) -> None:
    data_dir = up.data_dir
    using = f"using the embedded database of the `recalq up` running in {data_dir} (pid {up.popen.pid})"
    with connect(up.database_url()) as conn:
        [property_id] = provision(conn)
        [job_id] = jobs_of(conn, [property_id])

    status = recalq("status", database_url=None, extra_env={"RECALQ_DATA_DIR": str(data_dir)})
    assert status.returncode == 0, status.stderr
    assert status.stderr == f"recalq status: {using}\n"
    assert set(status_table(status.stdout)) >= {"pending", "done", "dead"}

    # The default data dir is ./var: from the directory `up` runs in, no setting is needed.
    shown = recalq("job", str(job_id), "--json", database_url=None, cwd=data_dir.parent)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == f"recalq job: {using}\n"
    assert json.loads(shown.stdout)["coalescing_key"] == f"property:{property_id}", "the same database as up's"
    drained = recalq("drain", "--timeout", "30", database_url=None, cwd=data_dir.parent)
    assert drained.returncode == 0, drained.stdout + drained.stderr + up.output()

    os.kill(up.popen.pid, signal.SIGINT)
    assert up.finish(60) == 0, up.output()
    gone = recalq("status", database_url=None, cwd=data_dir.parent)
    assert gone.returncode == 2
    assert gone.stderr.startswith(f"recalq status: DATABASE_URL is not set; no `recalq up` with an embedded database "
                                  f"is running in {data_dir} "), gone.stderr
