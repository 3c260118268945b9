"""Real recalq processes for end-to-end and fault tests: workers and relays as subprocesses.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.harness.services import ROOT

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

    # -- processes ------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], ready_marker: str | None, env: dict[str, str]) -> Process:
        popen = subprocess.Popen(
            argv, cwd=ROOT, env={**self.env, **env}, stdout=subprocess.PIPE,
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

    def start_worker(self, concurrency: int = 2, env: dict[str, str] | None = None, pool: str = "prefork") -> Process:
        name = f"w{len(self.processes)}-{uuid.uuid4().hex[:6]}"
        proc = self._spawn(
            name,
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-E", "-Q", self.queue,
             "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h", "--without-mingle",
             "--without-gossip", "-l", "INFO"],
            ready_marker=" ready.",
            env=env or {},
        )
        if not proc.ready.wait(60) or proc.popen.poll() is not None:
            raise AssertionError(f"worker did not start:\n{proc.output()}")
        return proc

    def start_relay(self, env: dict[str, str] | None = None) -> Process:
        proc = self._spawn(
            f"relay{len(self.processes)}",
            [sys.executable, "-m", "recalq", "relay"],
            ready_marker="relay connected",
            env=env or {},
        )
        if not proc.ready.wait(30):
            raise AssertionError(f"relay did not start:\n{proc.output()}")
        return proc

    def start_beat(self, schedule_dir: Path, env: dict[str, str] | None = None) -> Process:
        proc = self._spawn(
            "beat",
            [sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "INFO",
             "-s", str(schedule_dir / "celerybeat-schedule")],
            ready_marker="beat: Starting",
            env=env or {},
        )
        if not proc.ready.wait(60) or proc.popen.poll() is not None:
            raise AssertionError(f"beat did not start:\n{proc.output()}")
        return proc

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
