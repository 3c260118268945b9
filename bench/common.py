"""Plumbing the benchmarks share: a private database, real worker and relay processes, a
baseline Celery app, statistics and the results table.

Benchmarks compare recalq with a baseline measured in the same run, so both sides must run
under the same conditions: the baseline Celery app here takes recalq's own Celery configuration
(`celery_config`: JSON, acks_late, prefetch 1, confirms on RabbitMQ) and its worker is started
with the same `celery worker` flags as recalq's (`WORKER_FLAGS`).

Nothing here imports tests/: benchmarks must run from a checkout without the test suite.

Environment: BENCH_PG_ADMIN_URL (a superuser URL on the maintenance database),
BENCH_AMQP_URL, BENCH_REDIS_URL. Loopback only by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKERS = {
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    # A database of its own: kombu keeps one `unacked` hash per Redis database.
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
}

#: `celery worker` flags for recalq's worker and the baseline's alike: the production form
#: (`recalq worker` = `celery -A recalq.celery_app worker -E`) with 2 prefork processes. WARNING keeps
#: per-task log lines out of both, as production would at scale.
WORKER_FLAGS = ["-E", "-P", "prefork", "-c", "2", "--without-mingle", "--without-gossip",
                "--without-heartbeat", "-l", "WARNING"]

#: The baseline app's record of each task run: (time.time() at body start, sender's timestamp).
_RECORD = struct.Struct("<dd")


def log(*parts: object) -> None:
    print("#", *parts, file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# -- database ------------------------------------------------------------------------------
def with_database(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def private_database(prefix: str, admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A freshly migrated database of this run's own, dropped afterwards whatever happens."""
    from recalq import migrate
    from recalq.settings import Settings

    name = f"recalq_bench_{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(admin_url, name)
    try:
        migrate.upgrade(Settings(database_url=url))
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def unique_queue(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


def delete_queue(broker_url: str, queue: str) -> None:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker_url, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(queue)


def recalq_env(database_url: str, broker_url: str, queue: str, **extra: str) -> dict[str, str]:
    """The environment a recalq process of this run needs (production defaults otherwise)."""
    env = {
        **os.environ,
        "RECALQ_DATABASE_URL": database_url,
        "RECALQ_BROKER_URL": broker_url,
        "RECALQ_QUEUE": queue,
        "RECALQ_WORKER_CONCURRENCY": "2",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("RECALQ_FAULT", None)
    return env


# -- data ----------------------------------------------------------------------------------
BENCH_ACTOR_ID = "bench"


def sample_documents(i: int, count: int) -> list[Any]:
    """`count` documents of mixed requirements, statuses and expiries, varied by `i`, so the
    formula takes its different branches (valid, expiring soon, pending, expired, missing)."""
    import hashlib
    from datetime import date, timedelta

    from services.documents import NewDocument
    from services.scoring import REQUIREMENTS, DocumentStatus

    statuses = (DocumentStatus.VERIFIED, DocumentStatus.PENDING_VERIFICATION, DocumentStatus.VERIFIED)
    expiries = (400, 20, -5, 200, None)
    docs = []
    for k in range(count):
        content = f"{i}-{k}-{uuid.uuid4().hex}".encode()
        days = expiries[(i + k) % len(expiries)]
        docs.append(NewDocument(
            requirement_code=REQUIREMENTS[(i + k) % len(REQUIREMENTS)],
            file_name=f"doc-{i}-{k}.pdf",
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            expires_at=None if days is None else date.today() + timedelta(days=days),
            status=statuses[(i + k) % len(statuses)],
        ))
    return docs


def create_properties(database_url: str, n: int, documents_each: int = 3) -> list[int]:
    """`n` properties with `documents_each` documents, made through the real services: each
    property ends with exactly one pending recalculation job (the upload joins the job its
    creation queued), as after a burst of real traffic."""
    from services.documents import add_documents
    from services.properties import NewProperty, provision_client
    from services.vocabulary import Actor, ActorType, TriggerReason

    admin = Actor(ActorType.ADMIN, BENCH_ACTOR_ID)
    client = Actor(ActorType.CLIENT, BENCH_ACTOR_ID)
    ids: list[int] = []
    with psycopg.connect(database_url) as conn:
        for start in range(0, n, 1000):
            batch = min(1000, n - start)
            made = provision_client(
                conn, name=f"Bench client {start}", actor=admin, correlation_id=f"bench-{uuid.uuid4()}",
                properties=[NewProperty(f"Property {start + k}", has_gas_supply=(start + k) % 4 != 0)
                            for k in range(batch)],
            )
            conn.commit()
            ids.extend(p.property_id for p in made.properties)
        if documents_each:
            for i, property_id in enumerate(ids):
                add_documents(conn, property_id=property_id, documents=sample_documents(i, documents_each),
                              source="client", actor=client, trigger=TriggerReason.CLIENT_UPLOAD,
                              correlation_id=f"bench-{uuid.uuid4()}")
                conn.commit()
    return ids


# -- processes -----------------------------------------------------------------------------
class Process:
    """A child process in its own session (so its whole group can be stopped), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"recalq-bench-{name}-"))
        self.log_path = self.dir / "output.log"
        self._log = self.log_path.open("w")
        self.spawned_at = time.time()
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def output(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for_line(self, marker: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.output()}")
            return marker in self.log_path.read_text(errors="replace")

        wait_until(seen, timeout, f"{self.name} to log {marker!r}", interval=0.02)

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM to the group: in-flight tasks finish), then SIGKILL if stuck."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop in {timeout}s; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def start_recalq_worker(env: dict[str, str]) -> Process:
    """recalq's worker as production runs it; ready when it consumes (callers wait on work)."""
    return Process("recalq-worker", [sys.executable, "-m", "celery", "-A", "recalq.celery_app", "worker",
                                     "-Q", env["RECALQ_QUEUE"], "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
                                     *WORKER_FLAGS], env)


def start_relay(env: dict[str, str]) -> Process:
    """A real relay process (`recalq relay`: LISTEN/NOTIFY wake-ups, confirms on RabbitMQ)."""
    proc = Process("relay", [sys.executable, "-m", "recalq", "--log-level", "INFO", "relay"], env)
    proc.wait_for_line("relay connected", timeout=60)
    return proc


# -- the baseline Celery app ----------------------------------------------------------------
def baseline_config(broker_url: str, queue: str) -> dict[str, Any]:
    """recalq's Celery configuration, so the baseline differs from recalq only in the task body."""
    from recalq.celery_config import celery_config
    from recalq.settings import Settings

    return celery_config(Settings(database_url="postgresql://unused@127.0.0.1/unused",
                                  broker_url=broker_url, queue=queue))


def _build_baseline_app() -> Any:
    """The app `celery -A bench.common:baseline worker` runs (configured by BENCH_* variables).

    Each task body appends one fixed-size record (its start time and the sender's timestamp)
    to a file of its process: one write(2) of 16 bytes, so the baseline task stays a no-op,
    and the parent can count and read the records while the worker still runs.
    """
    from celery import Celery

    app = Celery("bench_baseline")
    app.config_from_object(baseline_config(os.environ["BENCH_BROKER_URL"], os.environ["BENCH_QUEUE"]))
    out_dir = Path(os.environ["BENCH_OUT_DIR"])
    handle: dict[int, int] = {}

    def record(sent_ts: float) -> None:
        now = time.time()
        fd = handle.get(os.getpid())
        if fd is None:  # opened after fork, one file per process
            fd = handle[os.getpid()] = os.open(out_dir / f"{os.getpid()}.rec",
                                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, _RECORD.pack(now, sent_ts))

    @app.task(name="bench.noop", acks_late=True, ignore_result=True)
    def noop(job_id: int = 0, payload: Any = None, sent_ts: float = 0.0) -> None:
        record(sent_ts)

    return app


def __getattr__(name: str) -> Any:
    if name == "baseline":
        app = globals().get("_baseline")
        if app is None:
            app = globals()["_baseline"] = _build_baseline_app()
        return app
    raise AttributeError(f"module 'bench.common' has no attribute {name!r}")


class BaselineWorker(Process):
    """A `celery worker` of the baseline app, with recalq's worker flags."""

    def __init__(self, broker_url: str, queue: str) -> None:
        out = Path(tempfile.mkdtemp(prefix="recalq-bench-records-"))
        env = {**os.environ, "BENCH_BROKER_URL": broker_url, "BENCH_QUEUE": queue, "BENCH_OUT_DIR": str(out),
               "PYTHONPATH": str(ROOT)}
        super().__init__("baseline-worker", [sys.executable, "-m", "celery", "-A", "bench.common:baseline",
                                             "worker", "-Q", queue, "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
                                             *WORKER_FLAGS], env)
        self.records_dir = out

    def count(self) -> int:
        return sum(p.stat().st_size for p in self.records_dir.glob("*.rec")) // _RECORD.size

    def records(self) -> list[tuple[float, float]]:
        """(start time, sender timestamp) of every task run so far."""
        out: list[tuple[float, float]] = []
        for path in self.records_dir.glob("*.rec"):
            out.extend(_RECORD.iter_unpack(path.read_bytes()))
        return out

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.records_dir, ignore_errors=True)


def baseline_sender(broker_url: str, queue: str) -> Any:
    """A Celery app that sends with recalq's publishing configuration (confirms on RabbitMQ)."""
    from celery import Celery

    app = Celery("bench_sender")
    app.config_from_object(baseline_config(broker_url, queue))
    return app


# -- CPU accounting -----------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> tuple[int, float] | None:
    """(process group, user+system CPU seconds) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds spent by one process group (a worker and its children) and, optionally, by
    the Postgres backends of one database (the worker's pool connections).

    On a machine shared with other work, rates measure the machine; CPU per job measures the
    code. Sampled while the processes live (a prefork child's CPU vanishes when it exits).
    """

    def __init__(self, pgid: int, database_url: str | None = None) -> None:
        self._pgid = pgid
        self._db = psycopg.connect(database_url, autocommit=True) if database_url else None
        self._backends: dict[int, float] = {}

    def sample(self) -> tuple[float, float]:
        worker = 0.0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (info := _proc_cpu(int(entry.name))) and info[0] == self._pgid:
                worker += info[1]
        if self._db is not None:
            pids = [r[0] for r in self._db.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
            for pid in pids:
                if info := _proc_cpu(pid):
                    self._backends[pid] = info[1]
        return worker, sum(self._backends.values())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def cpu_per_job(samples: Sequence[tuple[int, float, float]]) -> dict[str, float] | None:
    """Milliseconds of worker and Postgres CPU per job between the first sample that saw work
    done and the last one: start-up (imports, forks, connecting) falls outside."""
    worked = [s for s in samples if s[0] > 0]
    if len(worked) < 2 or worked[-1][0] == worked[0][0]:
        return None
    (n0, w0, p0), (n1, w1, p1) = worked[0], worked[-1]
    jobs = n1 - n0
    return {"worker_ms": (w1 - w0) * 1000 / jobs, "postgres_ms": (p1 - p0) * 1000 / jobs, "jobs": jobs}


# -- statistics and output --------------------------------------------------------------------
def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest rank (p in 0..100), the peers' method."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[k]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max over repetitions."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(stat: dict[str, float], digits: int = 1) -> str:
    return f"{stat['median']:,.{digits}f} ({stat['min']:,.{digits}f}-{stat['max']:,.{digits}f})"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def broker_urls(selected: Sequence[str] | None) -> dict[str, str]:
    """The brokers a run covers: names from BROKERS (default both) or URLs."""
    if not selected:
        return dict(BROKERS)
    out = {}
    for item in selected:
        if item in BROKERS:
            out[item] = BROKERS[item]
        else:
            out["rabbitmq" if item.startswith("amqp") else "redis"] = item
    return out
