"""Real recalq processes for end-to-end and fault tests: workers, relays and APIs as subprocesses.

Each test system gets its own Celery queue, so tests never consume each other's messages,
and every wait is a bounded poll on Postgres, never a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from tests.harness.services import ROOT

if TYPE_CHECKING:
    from celery import Celery

#: Knobs that make retries, polls and leases fast enough to test in seconds.
FAST_SETTINGS = {
    "RECALQ_RETRY_BASE_SECONDS": "0.2",
    "RECALQ_RETRY_MAX_SECONDS": "1",
    "RECALQ_INFRA_RETRY_MAX_SECONDS": "1",
    "RECALQ_BUSY_RETRY_SECONDS": "0.05",
    "RECALQ_RELAY_POLL_SECONDS": "0.2",
    "RECALQ_RELAY_CLAIM_LEASE_SECONDS": "2",
    "RECALQ_TASK_SOFT_TIME_LIMIT": "8",
    "RECALQ_TASK_TIME_LIMIT": "10",
    "RECALQ_JOB_LEASE_SECONDS": "12",
    "RECALQ_LOCK_TIMEOUT_MS": "2000",
    "RECALQ_BROKER_TIMEOUT_SECONDS": "5",
}

#: The relay looks for lost jobs every second and takes over a running one shortly after its
#: lease ran out: for tests that kill a worker and wait for the takeover.
FAST_RESCUE = {"RECALQ_RESCUE_INTERVAL_SECONDS": "1", "RECALQ_RESCUE_AFTER_SECONDS": "1"}

ACTIVE_STATUSES = ("pending", "published", "running", "retrying")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    pump: threading.Thread | None = None

    def output(self) -> str:
        return "\n".join(self.lines[-200:])


class System:
    def __init__(self, database_url: str, broker_url: str, workdir: Path, extra_env: dict[str, str] | None = None):
        self.database_url = database_url
        self.broker_url = broker_url
        self.queue = f"recalq-test-{uuid.uuid4().hex[:10]}"
        self.workdir = workdir
        self.env = {
            **os.environ,
            **FAST_SETTINGS,
            "RECALQ_DATABASE_URL": database_url,
            "RECALQ_BROKER_URL": broker_url,
            "RECALQ_QUEUE": self.queue,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.env.pop("RECALQ_FAULT", None)
        self.processes: list[Process] = []
        self.apply_task_policy()

    def apply_task_policy(self, env: dict[str, str] | None = None) -> None:
        """The recalculation's lease and time limits from these settings, written to its task row
        as a deploy's `recalq migrate` writes them (processes read them there, not from their own
        environment). `env` adds a test's own knobs (a short lease, say) to the system's. Attempts
        and the minimum interval are left as the database has them."""
        from recalq.settings import Settings
        from services.vocabulary import RECALCULATE_TASK

        merged = {**self.env, **(env or {})}
        knobs = {key.removeprefix("RECALQ_").lower(): value for key, value in merged.items()
                 if key in {"RECALQ_JOB_LEASE_SECONDS", "RECALQ_TASK_TIME_LIMIT", "RECALQ_TASK_SOFT_TIME_LIMIT"}}
        settings = Settings(database_url=self.database_url, broker_url=self.broker_url, **knobs)  # validates them
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'outbox_task' "
                            "AND column_name = 'lease_seconds'").fetchone() is None:
                return  # an older schema (an upgrade test): its processes read their own settings
            conn.execute(
                "UPDATE outbox_task SET lease_seconds = %s, time_limit_seconds = %s, soft_time_limit_seconds = %s "
                "WHERE name = %s",
                [settings.job_lease_seconds, settings.task_time_limit, settings.task_soft_time_limit,
                 RECALCULATE_TASK],
            )

    # -- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], ready_marker: str | None, env: dict[str, str],
               cwd: Path | None = None) -> Process:
        popen = subprocess.Popen(
            argv, cwd=cwd or ROOT, env={**self.env, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        proc = Process(name, popen)

        def pump() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                proc.lines.append(line.rstrip())
                if ready_marker is None or ready_marker in line:
                    proc.ready.set()
            proc.ready.set()

        proc.pump = threading.Thread(target=pump, daemon=True)
        proc.pump.start()
        self.processes.append(proc)
        return proc

    def start_worker(self, concurrency: int = 2, env: dict[str, str] | None = None, pool: str = "prefork",
                     app: str = "recalq.celery_app", queue: str | None = None, cwd: Path | None = None) -> Process:
        """A real `celery worker` of `app` (the composition root's entry module unless a test
        brings its own) consuming `queue` (the system's default queue unless told otherwise), run
        from `cwd` (this checkout unless a test runs an older release's code)."""
        name = f"w{len(self.processes)}-{uuid.uuid4().hex[:6]}"
        proc = self._spawn(
            name,
            [sys.executable, "-m", "celery", "-A", app, "worker", "-E", "-Q", queue or self.queue,
             "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h", "--without-mingle",
             "--without-gossip", "-l", "INFO"],
            ready_marker=" ready.",
            env=env or {},
            cwd=cwd,
        )
        if not proc.ready.wait(60) or proc.popen.poll() is not None:
            raise AssertionError(f"worker did not start:\n{proc.output()}")
        return proc

    def start_relay(self, env: dict[str, str] | None = None, cwd: Path | None = None) -> Process:
        proc = self._spawn(
            f"relay{len(self.processes)}",
            [sys.executable, "-m", "recalq", "relay"],
            ready_marker="relay connected",
            env=env or {},
            cwd=cwd,
        )
        if not proc.ready.wait(30):
            raise AssertionError(f"relay did not start:\n{proc.output()}")
        return proc

    def start_beat(self, schedule_dir: Path, env: dict[str, str] | None = None) -> Process:
        proc = self._spawn(
            "beat",
            [sys.executable, "-m", "celery", "-A", "recalq.celery_app", "beat", "-l", "INFO",
             "-s", str(schedule_dir / "celerybeat-schedule")],
            ready_marker="beat: Starting",
            env=env or {},
        )
        if not proc.ready.wait(60) or proc.popen.poll() is not None:
            raise AssertionError(f"beat did not start:\n{proc.output()}")
        return proc

    def start_api(self, env: dict[str, str] | None = None) -> tuple[Process, str]:
        """A real `recalq api` on a port the kernel picks; returns it and its base URL (read from
        uvicorn's "running on" line, so no port is guessed and raced for)."""
        proc = self._spawn(f"api{len(self.processes)}", [sys.executable, "-m", "recalq", "api"],
                           ready_marker="Uvicorn running on", env={"RECALQ_API_PORT": "0", **(env or {})})
        if not proc.ready.wait(60) or proc.popen.poll() is not None:
            raise AssertionError(f"api did not start:\n{proc.output()}")
        line = next(line for line in proc.lines if "Uvicorn running on" in line)
        return proc, line.split("Uvicorn running on ", 1)[1].split()[0]

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> None:
        if proc.popen.poll() is None:
            os.killpg(proc.popen.pid, sig)
        proc.popen.wait(30)

    def stop(self) -> None:
        for proc in self.processes:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        for proc in self.processes:
            if proc.pump is not None:
                proc.pump.join(10)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        self._delete_queue()

    def _delete_queue(self) -> None:
        from kombu import Connection

        try:
            with Connection(self.broker_url, connect_timeout=5) as conn:
                channel = conn.channel()
                channel.queue_delete(self.queue)
        except Exception:
            pass

    def logs(self) -> str:
        return "\n\n".join(f"--- {p.name} (rc={p.popen.poll()})\n{p.output()}" for p in self.processes)

    # -- waiting ---------------------------------------------------------------------------
    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.database_url, autocommit=True)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no job is pending, published, running or retrying."""
        with self.connect() as conn:
            def idle() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM outbox_job WHERE status = ANY(%s::outbox_job_status[])",
                    [list(ACTIVE_STATUSES)],
                ).fetchone()
                return row is not None and row[0] == 0

            try:
                wait_until(idle, timeout, "the queue to drain")
            except AssertionError as exc:
                rows = conn.execute(
                    "SELECT id, status, attempts, last_error FROM outbox_job "
                    "WHERE status <> 'done' ORDER BY id LIMIT 20"
                ).fetchall()
                raise AssertionError(f"{exc}\nunfinished jobs: {rows}\n{self.logs()}") from None


# -- fault-test helpers ------------------------------------------------------------------------
# Appended for tests/faults: the broker-side views and tools those tests share.

def kill_all(system: System) -> None:
    """SIGKILLs every process of the system: a fault test's teardown, where graceful shutdown is
    not under test and waiting for it costs seconds per process."""
    for proc in system.processes:
        system.kill(proc)


def first_broker_url() -> str:
    """One broker for a test whose behaviour does not depend on the broker (RabbitMQ if this
    machine has it), so that it costs one run instead of one per broker."""
    from tests.harness.services import brokers

    return next(iter(brokers().values()))


def queue_depth(system: System) -> int:
    """Messages waiting in the system's queue (not counting ones a worker holds unacked)."""
    from kombu import Connection

    with Connection(system.broker_url, connect_timeout=5) as conn:
        try:
            return conn.default_channel.queue_declare(queue=system.queue, passive=True).message_count
        except conn.channel_errors:
            return 0  # never declared, or (Redis) emptied: an empty list does not exist there


@contextmanager
def celery_app(system: System) -> Iterator[Celery]:
    """The app a recalq process would build for this system, in the test process."""
    from recalq.bootstrap import Runtime
    from recalq.settings import Settings

    fast = {key.removeprefix("RECALQ_").lower(): value for key, value in FAST_SETTINGS.items()}
    settings = Settings(database_url=system.database_url, broker_url=system.broker_url, queue=system.queue, **fast)
    app = Runtime(settings).celery_app
    try:
        yield app
    finally:
        app.close()


def publish_jobs_again(system: System, conn: psycopg.Connection, *job_ids: int) -> None:
    """Publishes the stored message of each job (same task, payload and fixed task id) with
    Celery's own send_task, in the order given: a duplicate, late or reordered delivery on
    demand, without going through the relay under test."""
    with celery_app(system) as app, app.producer_or_acquire() as producer:
        for job_id in job_ids:
            row = conn.execute(
                "SELECT task, payload, celery_task_id::text FROM outbox_job WHERE id = %s", [job_id]
            ).fetchone()
            assert row is not None, f"job {job_id} does not exist"
            task, payload, task_id = row
            app.send_task(task, kwargs={"job_id": job_id, "payload": payload}, task_id=task_id,
                          queue=system.queue, producer=producer)


def start_together(*starts: Callable[[], Process]) -> list[Process]:
    """Starts processes side by side when their order does not matter (each takes seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(starts)) as pool:
        return [future.result() for future in [pool.submit(start) for start in starts]]
