"""An in-process stand-in for the broker and the Celery task, for model-based fault tests.

The state machine in tests/faults/test_pipeline_state_machine.py drives the real relay and the
real Recalculator against real PostgreSQL; only the transport between them is modelled here,
so that hypothesis can choose every delivery order, duplicate, loss and crash and replay it
exactly. What is modelled is what the pipeline relies on from Celery and the broker:

- a message carries the task's kwargs and a fixed task id, and may be delivered more than once;
- a retry is a new message with the kwargs the task passes to `self.retry` and an ETA: a
  worker holds it until then, so it is never delivered early;
- a worker killed mid-task (acks_late, reject_on_worker_lost) either gets its message back
  flagged redelivered (RabbitMQ) or leaves it out of reach (Redis, until the visibility timeout).

Time is a model clock in seconds. The database's clock is moved with it by `advance_clock`,
which shifts every stored timestamp of the outbox into the past: every comparison the SQL makes
(`lease_expires_at < now()`, `next_run_at <= now()`, the rescue grace) then answers as it would
that many seconds later, deterministically and without sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

import psycopg

from outbox.relay import OutboxMessage
from services.recalculation import Outcome, Recalculator, RetryLater

#: The outbox_job columns that hold instants the SQL compares with now().
OUTBOX_JOB_TIMESTAMPS = (
    "next_run_at", "created_at", "updated_at", "claimed_until", "published_at", "started_at",
    "heartbeat_at", "lease_expires_at", "finished_at", "rescued_at",
)


class ProcessKilled(BaseException):
    """Ends a delivery the way SIGKILL does: nothing in the service may catch it (it catches
    Exception to record unexpected errors as DEAD, which a killed process never gets to do)."""


@dataclass(frozen=True)
class Message:
    task_id: UUID
    #: The task's keyword arguments: job_id, payload, and after a retry resume_attempt and
    #: infra_failures (tasks/recalculation.py).
    kwargs: dict[str, Any]
    #: Model-clock second before which no worker runs it (a retry's countdown).
    due_at: float = 0.0
    redelivered: bool = False

    @property
    def job_id(self) -> int:
        return int(self.kwargs["job_id"])

    def __repr__(self) -> str:  # short: it appears in hypothesis' failing-step reports
        extra = {k: v for k, v in self.kwargs.items() if k not in ("job_id", "payload") and v}
        flags = " redelivered" if self.redelivered else ""
        return f"<job {self.job_id} due@{self.due_at:g}{flags} {extra or ''}>"


class ModelBroker:
    """The queue: messages in flight, in the order they were sent."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.messages: list[Message] = []

    def publish(self, batch: list[OutboxMessage] | tuple[OutboxMessage, ...]) -> None:
        """The relay's `publish` callable; kwargs as recalq.publisher.CeleryPublisher sends them."""
        for m in batch:
            self.messages.append(Message(m.task_id, {"job_id": m.job_id, "payload": m.payload}, self.clock))

    def due(self) -> list[int]:
        """Indices of the messages a worker could receive now."""
        return [i for i, m in enumerate(self.messages) if m.due_at <= self.clock]

    def take(self, index: int) -> Message:
        return self.messages.pop(index)

    def give_back(self, message: Message) -> None:
        """A killed worker's unacknowledged message, handed back by the broker."""
        self.messages.append(replace(message, redelivered=True))

    def retry(self, message: Message, outcome: RetryLater) -> None:
        """What `self.retry(countdown=..., kwargs=...)` in tasks/recalculation.py publishes."""
        kwargs = {
            "job_id": message.job_id,
            "payload": message.kwargs.get("payload"),
            "resume_attempt": outcome.resume_attempt,
            "infra_failures": message.kwargs.get("infra_failures", 0) + 1 if outcome.infrastructure else 0,
        }
        self.messages.append(Message(message.task_id, kwargs, self.clock + outcome.delay_seconds))


def advance_clock(conn: psycopg.Connection, broker: ModelBroker, seconds: float) -> None:
    """Moves time forward by shifting the outbox's stored instants into the past."""
    shifted = ", ".join(f"{c} = {c} - make_interval(secs => %(s)s)" for c in OUTBOX_JOB_TIMESTAMPS)
    with conn.transaction():
        conn.execute(f"UPDATE outbox_job SET {shifted}", {"s": seconds})
    broker.clock += seconds


def run_delivery(recalculator: Recalculator, message: Message) -> Outcome:
    """The body of tasks/recalculation.recalculate_property, minus Celery."""
    kwargs = message.kwargs
    return recalculator.run(
        message.job_id,
        redelivered=message.redelivered,
        resume_attempt=kwargs.get("resume_attempt"),
        infra_failures=kwargs.get("infra_failures", 0),
    )


#: What the n-th connection a delivery asks for does (1: start, 2: apply, 3: record a failure).
#: "refused": the database cannot be reached; "lost_after_commit": the transaction committed
#: and then the connection broke, so the worker never learns that it did.
CONNECTION_FAULTS = ("refused", "lost_after_commit")

#: Builds the worker's Recalculator from its connection source and its probe.
RecalculatorFactory = Callable[[Callable[[], AbstractContextManager[psycopg.Connection]], Callable[[str], None]],
                               Recalculator]


class ModelWorker:
    """One worker process: its Recalculator, its connection (the pool, in production), and
    the faults planned for its next delivery.

    The connection is reused across deliveries like a pool's would be; a killed worker's is
    closed, as the server sees it go.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection], build: RecalculatorFactory) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._acquired = 0
        self._faults: dict[int, str] = {}
        self._kill_at: str | None = None
        self._gate: Callable[[int], None] | None = None
        self.recalculator = build(self._connection, self._probe)

    def deliver(
        self,
        message: Message,
        *,
        faults: dict[int, str] | None = None,
        kill_at: str | None = None,
        gate: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Runs the task for one message; ProcessKilled propagates when the worker dies."""
        self._acquired = 0
        self._faults = dict(faults or {})
        self._kill_at = kill_at
        self._gate = gate
        try:
            return run_delivery(self.recalculator, message)
        except ProcessKilled:
            self.close()
            raise
        finally:
            self._faults, self._kill_at, self._gate = {}, None, None

    def _probe(self, point: str) -> None:
        if point == self._kill_at:
            raise ProcessKilled(point)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        self._acquired += 1
        n = self._acquired
        if self._gate is not None:
            self._gate(n)
        fault = self._faults.get(n)
        if fault == "refused":
            raise psycopg.OperationalError("connection refused (model: the database is unreachable)")
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        yield self._conn
        if fault == "lost_after_commit":
            self.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly (model: after COMMIT)")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class StalledWorker:
    """A delivery paused between its start transaction and its apply transaction (a GC pause,
    a stopped VM, a partitioned worker): its attempt is recorded as running and it holds no
    lock, so the rest of the system carries on around it until it is resumed or killed.

    It runs on a thread of its own, with a connection of its own; only one thread touches the
    database at a time (the main thread waits while the stalled one finishes).
    """

    def __init__(self, worker: ModelWorker, message: Message) -> None:
        self.message = message
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self._worker = worker
        self._settled = threading.Event()  # at the gate, or finished without reaching it
        self._release = threading.Event()
        self._kill = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"stalled-job-{message.job_id}")
        self._thread.start()
        if not self._settled.wait(30):
            raise AssertionError("the stalled delivery neither started nor finished within 30 s")

    @property
    def stalled(self) -> bool:
        """False when the delivery started no attempt, and so ran to its end at once."""
        return self._thread.is_alive()

    def _gate(self, n: int) -> None:
        if n != 2:  # the second connection is the apply transaction's
            return
        self._settled.set()
        if not self._release.wait(60):
            raise AssertionError("the stalled worker was never resumed")
        if self._kill:
            raise ProcessKilled("killed while stalled")

    def _run(self) -> None:
        try:
            self.outcome = self._worker.deliver(self.message, gate=self._gate)
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        finally:
            self._worker.close()
            self._settled.set()

    def resume(self, *, kill: bool = False) -> None:
        self._kill = kill
        self._release.set()
        self._thread.join(30)
        if self._thread.is_alive():
            raise AssertionError("the resumed worker did not finish within 30 s")
