"""Flower on the local brokers: it never runs without authentication, and its HTTP API lists the
running worker and each finished recalculation under its outbox job's celery_task_id.

Flower is the real `recalq flower` command in a subprocess, on a port the OS picks
(RECALQ_FLOWER_PORT=0; it logs the address it got). Every wait is a bounded poll on its HTTP API.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import psycopg
import pytest

from recalq import supervisor
from recalq.cli import main
from recalq.flower import LISTENING, NO_AUTH
from recalq.settings import Settings
from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import provision
from tests.harness.services import ROOT
from tests.harness.system import System, wait_until

USER = "ops"
PASSWORD = "flower-test-password-" + "p" * 12
AUTH = (USER, PASSWORD)
STARTUP_SECONDS = 30


class Flower:
    """One `python -m recalq flower` run, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "recalq", "flower"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def url(self) -> str:
        """The address Flower printed, once it listens."""
        def listening() -> bool:
            return self.popen.poll() is not None or any(LISTENING.search(line) for line in self.lines)

        wait_until(listening, STARTUP_SECONDS, "Flower to listen")
        match = next((m for m in map(LISTENING.search, self.lines) if m), None)
        assert match is not None, f"Flower exited {self.popen.returncode} first:\n{self.output()}"
        return match.group(1)

    def stop(self) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            code = self.popen.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            code = self.popen.wait(10)
        self._pump.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return code


@pytest.fixture
def flowers() -> Iterator[list[Flower]]:
    """Flowers a test starts, stopped after it."""
    started: list[Flower] = []
    yield started
    for flower in started:
        flower.stop()


def flower_env(base: dict[str, str], data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith(("RECALQ_FLOWER_", "FLOWER_"))}
    env.update(RECALQ_DATA_DIR=str(data_dir), RECALQ_FLOWER_PORT="0", RECALQ_FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **settings)
    return env


def get(url: str, **kwargs: Any) -> httpx2.Response:
    return httpx2.get(url, timeout=10, **kwargs)


def test_flower_refuses_to_start_without_credentials_and_says_which_setting_to_set(monkeypatch) -> None:
    monkeypatch.setenv("RECALQ_BROKER_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.delenv("RECALQ_FLOWER_BASIC_AUTH", raising=False)

    with pytest.raises(SystemExit) as refused:
        main(["flower"])

    assert refused.value.code == NO_AUTH
    assert "RECALQ_FLOWER_BASIC_AUTH" in NO_AUTH and "user:password" in NO_AUTH


def test_flower_refuses_an_extra_option_that_would_override_its_loopback_address(monkeypatch) -> None:
    monkeypatch.setenv("RECALQ_BROKER_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("RECALQ_FLOWER_BASIC_AUTH", f"{USER}:{PASSWORD}")

    with pytest.raises(SystemExit) as refused:
        main(["flower", "--", "--address=0.0.0.0"])

    assert refused.value.code == "recalq flower: --address comes from the settings; set RECALQ_FLOWER_HOST instead."


def test_up_makes_a_private_flower_password_once_and_reuses_it_or_uses_the_configured_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECALQ_FLOWER_BASIC_AUTH", raising=False)
    made = supervisor._flower_access(Settings(data_dir=tmp_path), tmp_path)
    password_file = tmp_path / "flower-password"
    password = password_file.read_text().strip()

    assert made.env == {"RECALQ_FLOWER_BASIC_AUTH": f"admin:{password}"}
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert made.credentials_source == f"user admin, password in {password_file}"
    assert supervisor._flower_access(Settings(data_dir=tmp_path), tmp_path) == made, "reused, not made again"

    other = tmp_path / "other"
    configured = supervisor._flower_access(Settings(data_dir=other, flower_basic_auth=f"{USER}:{PASSWORD}"), other)
    assert configured.env == {}, "Flower inherits RECALQ_FLOWER_BASIC_AUTH from the environment"
    assert configured.credentials_source == "user and password from RECALQ_FLOWER_BASIC_AUTH"
    assert not (other / "flower-password").exists()


def test_flower_on_loopback_answers_401_without_or_with_wrong_credentials_and_200_with_them(
    broker_url: str, tmp_path: Path, flowers: list[Flower]
) -> None:
    flower = Flower(flower_env({**os.environ, "RECALQ_BROKER_URL": broker_url}, tmp_path / "var"))
    flowers.append(flower)
    url = flower.url()

    assert url.startswith("http://127.0.0.1:"), "bound to loopback by default"
    for path in ("/", "/api/workers", "/api/tasks"):
        assert get(url + path).status_code == 401, path
        assert get(url + path, auth=(USER, "wrong-password-123")).status_code == 401, path
        assert get(url + path, auth=AUTH).status_code == 200, path
    assert PASSWORD not in flower.output()


def test_flower_lists_the_running_worker_and_the_finished_recalculation_under_its_jobs_task_id_also_after_a_restart(
    system: System, database_url: str, tmp_path: Path, flowers: list[Flower]
) -> None:
    env = flower_env(system.env, tmp_path / "var")
    flower = Flower(env)
    flowers.append(flower)
    url = flower.url()
    worker = system.start_worker()
    worker_name = f"{worker.name}@{socket.gethostname()}"

    def online() -> bool:
        return get(f"{url}/api/workers", params={"status": "true"}, auth=AUTH).json().get(worker_name) is True

    # The worker's heartbeats reach Flower: from now on it sees every task event.
    wait_until(online, 30, f"Flower to receive {worker_name}'s events", interval=0.25)

    def listed_by_inspection() -> bool:
        return worker_name in get(f"{url}/api/workers", params={"refresh": "true"}, auth=AUTH).json()

    wait_until(listed_by_inspection, 30, f"{worker_name} in /api/workers", interval=0.25)

    system.start_relay()
    with psycopg.connect(database_url) as conn:
        [property_id] = provision(conn)
        system.wait_idle()
        jobs = conn.execute(
            "SELECT celery_task_id::text, status::text FROM outbox_job WHERE coalescing_key = %s",
            [f"property:{property_id}"],
        ).fetchall()
    assert jobs and all(status == "done" for _, status in jobs), jobs

    def tasks(base_url: str) -> dict[str, dict[str, Any]]:
        return get(f"{base_url}/api/tasks", params={"taskname": RECALCULATE_TASK}, auth=AUTH).json()

    def finished(base_url: str) -> bool:
        seen = tasks(base_url)
        return all(seen.get(task_id, {}).get("state") == "SUCCESS" for task_id, _ in jobs)

    wait_until(lambda: finished(url), 30, "the recalculations as SUCCESS in /api/tasks", interval=0.25)
    seen = tasks(url)
    for task_id, _ in jobs:
        assert (seen[task_id]["name"], seen[task_id]["uuid"], seen[task_id]["worker"]) == (
            RECALCULATE_TASK, task_id, worker_name
        )

    assert flower.stop() == 0, flower.output()  # a clean stop saves what it has seen
    restarted = Flower(env)
    flowers.append(restarted)
    assert finished(restarted.url()), "the task history survives a restart (DATA_DIR/flower-state)"


def test_a_dead_job_is_a_failure_in_flower_with_its_reason_and_its_requeued_run_is_a_task_of_its_own(
    system: System, database_url: str, tmp_path: Path, flowers: list[Flower]
) -> None:
    """Postgres is the truth, and Flower must not contradict it: a job that ended DEAD shows as
    FAILURE (not SUCCESS), and a requeued job's next run keeps the first run's record."""
    flower = Flower(flower_env(system.env, tmp_path / "var"))
    flowers.append(flower)
    url = flower.url()
    worker = system.start_worker()
    worker_name = f"{worker.name}@{socket.gethostname()}"
    wait_until(lambda: get(f"{url}/api/workers", params={"status": "true"}, auth=AUTH).json().get(worker_name)
               is True, 30, f"Flower to receive {worker_name}'s events", interval=0.25)
    system.start_relay()

    def task_state(task_id: str) -> dict[str, Any]:
        return get(f"{url}/api/tasks", params={"taskname": RECALCULATE_TASK}, auth=AUTH).json().get(task_id, {})

    with psycopg.connect(database_url, autocommit=True) as conn:
        # A property that does not exist: a named permanent error, DEAD after one attempt.
        [job_id] = conn.execute(
            "SELECT outbox_enqueue(%s, 'property:999999', '{\"property_id\": 999999}', 'flower-dead', "
            "'manual_recalculation', 'admin', 'ops')", [RECALCULATE_TASK]).fetchone()
        system.wait_idle()
        first_run, status, last_error = conn.execute(
            "SELECT celery_task_id::text, status::text, last_error FROM outbox_job WHERE id = %s", [job_id]).fetchone()
        assert (status, last_error) == ("dead", "property 999999 does not exist")

        wait_until(lambda: task_state(first_run).get("state") == "FAILURE", 30,
                   "the DEAD job as FAILURE in /api/tasks", interval=0.25)
        assert "property 999999 does not exist" in task_state(first_run)["exception"]

        conn.execute("SELECT outbox_requeue(%s)", [job_id])
        system.wait_idle()
        second_run = conn.execute("SELECT celery_task_id::text FROM outbox_job WHERE id = %s", [job_id]).fetchone()[0]

    assert second_run != first_run, "a requeued job runs under a new task id"
    wait_until(lambda: task_state(second_run).get("state") == "FAILURE", 30,
               "the requeued run as a task of its own in /api/tasks", interval=0.25)
    assert task_state(first_run).get("state") == "FAILURE", "the first run's record is kept"
