"""A steady stream of real mutations while a fault test breaks something, and the checks that
every fault test makes once the system is idle again.

The stream runs in a thread on its own connection and records when each mutation committed
and how long its transaction took, so a test can show that producers kept committing during a
broker outage and never waited on the broker (G1).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg

from services.scoring import REQUIREMENTS, DocumentStatus
from tests.harness.data import new_document, upload
from tests.harness.invariants import assert_invariants
from tests.harness.system import Process, System, wait_until

FAR = date(2031, 6, 30)
STATUSES = (DocumentStatus.VERIFIED, DocumentStatus.PENDING_VERIFICATION)


@dataclass(frozen=True, slots=True)
class Commit:
    at: float  # time.monotonic() when the transaction committed
    seconds: float  # how long the mutation's transaction took
    property_id: int
    job_id: int


@dataclass
class MutationFlow:
    """Uploads round-robin over `property_ids`, one transaction each, every `interval` seconds."""

    database_url: str
    property_ids: list[int]
    interval: float = 0.02
    commits: list[Commit] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mutation-flow", daemon=True)

    def __enter__(self) -> MutationFlow:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the mutation flow did not stop"

    def _run(self) -> None:
        docs = itertools.cycle(itertools.product(REQUIREMENTS, STATUSES))
        targets = itertools.cycle(self.property_ids)
        try:
            with psycopg.connect(self.database_url) as conn:
                while not self._stop.is_set():
                    property_id = next(targets)
                    requirement, status = next(docs)
                    started = time.monotonic()
                    job_id = upload(conn, property_id, new_document(requirement, FAR, status))
                    now = time.monotonic()
                    self.commits.append(Commit(now, now - started, property_id, job_id))
                    self._stop.wait(self.interval)
        except BaseException as exc:  # surfaced by the test through .errors
            self.errors.append(exc)

    def since(self, moment: float) -> list[Commit]:
        return [c for c in list(self.commits) if c.at >= moment]

    def between(self, start: float, end: float) -> list[Commit]:
        return [c for c in list(self.commits) if start <= c.at <= end]


def assert_converged(conn: psycopg.Connection, max_attempts_seen: int | None = None) -> dict[int, int]:
    """Nothing DEAD, every job finished, the I1-I6 invariants hold; returns {attempts: jobs}.

    `max_attempts_seen` bounds the attempts any job used: a fault that the design absorbs
    without counting (infrastructure errors) must leave every job at one attempt.
    """
    dead = conn.execute("SELECT id, attempts, last_error FROM outbox_job WHERE status = 'dead'").fetchall()
    assert not dead, f"jobs went DEAD: {dead}"
    histogram = dict(conn.execute(
        "SELECT attempts, count(*) FROM outbox_job WHERE status = 'done' GROUP BY attempts ORDER BY attempts"
    ).fetchall())
    if max_attempts_seen is not None:
        over = conn.execute(
            "SELECT id, status, attempts, last_error FROM outbox_job WHERE attempts > %s", [max_attempts_seen]
        ).fetchall()
        assert not over, f"jobs used more than {max_attempts_seen} attempt(s): {over}"
    assert_invariants(conn)
    return histogram


def start_pipeline(
    system: System, worker_env: dict[str, str] | None = None, relay_env: dict[str, str] | None = None,
    concurrency: int = 2,
) -> tuple[Process, Process]:
    """A worker and a relay started side by side (each takes seconds to boot; order is free)."""
    with ThreadPoolExecutor(2) as pool:
        worker = pool.submit(system.start_worker, concurrency, worker_env)
        relay = pool.submit(system.start_relay, relay_env)
        return worker.result(), relay.result()


def wait_for(system: System, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until, with the system's logs as they are when it gives up."""
    try:
        wait_until(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{system.logs()}") from None


def warm_up(system: System, flow: MutationFlow, conn: psycopg.Connection) -> None:
    """Until the pipeline demonstrably flows: the stream's first job has finished."""
    wait_for(system, lambda: len(flow.commits) >= 1, 30, "the mutation stream to start")
    first = flow.commits[0].job_id
    wait_for(system, lambda: conn.execute("SELECT status::text FROM outbox_job WHERE id = %s",
                                          [first]).fetchone() == ("done",),
             30, "the stream's first job to finish")


def lines_with(processes: list[Process], text: str) -> int:
    """How many log lines of these processes contain `text`."""
    return sum(text in line for proc in processes for line in list(proc.lines))


def db_now(conn: psycopg.Connection) -> datetime:
    """The database's clock, to compare with the timestamps it writes."""
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]
