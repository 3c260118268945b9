"""Deploying engine v5 onto a live queue, as an operator would: the previous release's producer,
relay and worker keep running while `recalq migrate` upgrades a populated database, messages the
old relay published wait in the broker for the new worker, and nothing is lost or refused.

The previous release is the commit before migration 0011, taken from this repository's history
with `git archive` and run from its own directory on the same virtualenv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from recalq import migrate
from recalq.settings import Settings
from services.vocabulary import RECALCULATE_TASK
from tests.harness.databases import DatabaseFactory
from tests.harness.observe import assert_fresh_score
from tests.harness.services import ROOT
from tests.harness.system import System, first_broker_url, wait_until

pytestmark = pytest.mark.broker

#: The last commit before the generic engine (migration 0010 is its head).
PREVIOUS_RELEASE = "80230f3"
PREVIOUS_HEAD = "0010_requeue_v2"
#: Finished jobs already in the table, so the new indexes and the validation scan real rows.
HISTORY = 100_000

#: A client of the previous release: uploads through its own services until told to stop.
PRODUCER = """
import json, pathlib, sys, time
import psycopg
from tests.harness.data import new_document, upload
url, stop, report = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
properties = [int(p) for p in sys.argv[4].split(",")]
ok, failed, errors, slowest = 0, 0, [], 0.0
with psycopg.connect(url) as conn:
    while not stop.exists():
        began = time.monotonic()
        try:
            upload(conn, properties[ok % len(properties)], new_document())
            ok += 1
        except Exception as exc:
            conn.rollback()
            failed += 1
            errors.append(repr(exc)[:300])
        slowest = max(slowest, time.monotonic() - began)
        time.sleep(0.01)  # pacing: a steady stream of clients, not a flood
report.write_text(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5], "slowest_s": slowest}))
"""

PROVISION = """
import sys
import psycopg
from tests.harness.data import provision
with psycopg.connect(sys.argv[1]) as conn:
    print(",".join(str(p) for p in provision(conn, n_properties=int(sys.argv[2]))))
"""


@pytest.fixture
def previous_release(tmp_path: Path) -> Path:
    """The previous release's source tree."""
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                           capture_output=True, check=False)
    if known.returncode != 0:
        pytest.fail(f"commit {PREVIOUS_RELEASE} (the previous release) is not in this clone's history; "
                    "this test needs a full clone (not --depth 1)")
    tree = tmp_path / "previous-release"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


@pytest.fixture
def empty_database(db_factory: DatabaseFactory) -> Iterator[str]:
    url = db_factory.create_empty()
    yield url
    db_factory.drop(url)


def run_old(tree: Path, code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=old_env(tree), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def old_env(tree: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RECALQ_")}, "PYTHONPATH": str(tree)}


def seed_history(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO outbox_job (task, coalescing_key, payload, status, attempts, started_at, finished_at,
                                       published_at, created_at, updated_at)
               SELECT %s, 'property:' || (1000000 + g), jsonb_build_object('property_id', 1000000 + g), 'done', 1,
                      now() - interval '2 days', now() - interval '2 days', now() - interval '2 days',
                      now() - interval '2 days', now() - interval '2 days'
                 FROM generate_series(1, %s) g""",
            [RECALCULATE_TASK, HISTORY],
        )
        conn.execute("ANALYZE outbox_job")


def test_an_upgrade_under_a_running_previous_release_loses_no_mutation_and_its_queued_messages_still_run(
    empty_database: str, previous_release: Path, tmp_path: Path
) -> None:
    url = empty_database
    migrate.upgrade(Settings(database_url=url), PREVIOUS_HEAD)
    seed_history(url)
    properties = run_old(previous_release, PROVISION, url, "8")
    system = System(url, first_broker_url(), tmp_path)
    old = {"PYTHONPATH": str(previous_release)}
    stop, report = tmp_path / "stop-producer", tmp_path / "producer.json"
    try:
        old_worker = system.start_worker(app="tasks", cwd=previous_release, env=old)
        old_relay = system.start_relay(cwd=previous_release, env=old)
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, url, str(stop), str(report), properties],
                                    cwd=previous_release, env={**system.env, **old}, text=True)
        with psycopg.connect(url, autocommit=True) as db:
            def done_jobs() -> int:
                return db.execute("SELECT count(*) FROM outbox_job WHERE status = 'done' AND id > %s",
                                  [HISTORY]).fetchone()[0]

            wait_until(lambda: done_jobs() >= 20, 60, "the previous release to run jobs")

            began = time.monotonic()
            migrate.upgrade(Settings(database_url=url))  # the operator's `recalq migrate`, under load
            upgrade_seconds = time.monotonic() - began
            assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == migrate_head()

            # The previous release keeps working on the new schema (rolling deploy) ...
            after_upgrade = done_jobs()
            wait_until(lambda: done_jobs() >= after_upgrade + 10, 60, "the old worker to run jobs after the upgrade")
            # ... then its worker stops first: what its relay publishes meanwhile waits in the broker.
            system.kill(old_worker, sig=15)
            wait_until(lambda: db.execute("SELECT count(*) FROM outbox_job WHERE status = 'published'")
                       .fetchone()[0] >= 3, 60, "messages published by the old relay with no worker to take them")
            system.kill(old_relay, sig=15)
            stop.touch()
            assert producer.wait(60) == 0
            waiting = [row[0] for row in db.execute("SELECT id FROM outbox_job WHERE status = 'published'")]

            new_worker = system.start_worker()
            system.start_relay()
            system.wait_idle(timeout=120)

            produced = json.loads(report.read_text())
            assert produced["failed"] == 0, produced["errors"]
            assert produced["ok"] > 0
            statuses = dict(db.execute("SELECT status::text, count(*) FROM outbox_job GROUP BY 1").fetchall())
            assert set(statuses) <= {"done", "superseded"}, statuses
            ran_waiting = db.execute(
                "SELECT count(*) FROM outbox_job j WHERE j.id = ANY(%s) AND j.status = 'done' AND EXISTS "
                "(SELECT 1 FROM outbox_attempt a WHERE a.job_id = j.id AND a.worker LIKE %s)",
                [waiting, f"{new_worker.name}@%"]).fetchone()[0]
            assert ran_waiting == len(waiting), "a message queued by the old release was not run by the new worker"
            for property_id in properties.split(","):
                assert_fresh_score(db, int(property_id))
    finally:
        stop.touch()
        system.stop()
    print(f"upgrade under load: {upgrade_seconds:.2f}s beside {HISTORY} finished jobs; "
          f"{produced['ok']} mutations, slowest {produced['slowest_s'] * 1000:.0f} ms")


def migrate_head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused")).get_current_head()
