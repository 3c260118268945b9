"""The composition root: builds a process's pool, Celery app, job runners and relay.

Nothing is built at import time. `runtime()` builds the one Runtime of this process from the
one Settings object on first use; the Celery app is made when a command asks for it, and the
connection pool is made lazily in the process that uses it (after a prefork worker forks).

This is the one module that knows every concrete class: each job kind's handler (services/) is
wrapped in the generic runner (outbox/) and registered as a task (tasks/) here. Adding a job kind
is a handler, a task name, an outbox_task row, and one entry in `Runtime.job_kinds`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import cache, cached_property

import psycopg
from celery import Celery
from celery.signals import task_unknown, worker_process_init, worker_process_shutdown
from psycopg_pool import ConnectionPool

from outbox.backoff import RetryPolicy
from outbox.relay import Relay
from outbox.runner import Handler, JobRunner, RunnerPolicy
from outbox.unrunnable import record_unrunnable_delivery
from recalq.celery_config import celery_config
from recalq.faults import probe_from_spec
from recalq.publisher import CeleryPublisher
from recalq.settings import Settings
from services.evaluations import EVALUATE_TASK, EvaluationHandler
from services.file_store import FileStore
from services.providers import ProviderClient
from services.recalculation import RecalculationPolicy, Recalculator
from services.vocabulary import RECALCULATE_TASK
from tasks import recalculation as recalculation_task
from tasks.jobs import register_job_task
from tasks.maintenance import MaintenanceDeps, register_maintenance_tasks

log = logging.getLogger(__name__)

#: Where `recalq simulator` listens by default: the providers when none is configured.
SIMULATOR_URL = "http://127.0.0.1:8099"


def utc_today() -> date:
    return datetime.now(UTC).date()


class Runtime:
    def __init__(self, settings: Settings, *, pool_size: int | None = None, check_connections: bool = False) -> None:
        """`pool_size`: this process's connections (the API's is its own setting); None:
        db_pool_max_size, what each worker child gets. `check_connections`: test each connection
        at checkout (the API: a request must not fail on a session the server dropped while it
        sat in the pool). Workers skip it, it would cost every job several round trips: a
        dropped connection there is an infrastructure error, retried without spending an attempt."""
        self.settings = settings
        self._pool_size = pool_size if pool_size is not None else settings.db_pool_max_size
        self._check_connections = check_connections
        self._pool: ConnectionPool | None = None
        self._pool_pid: int | None = None
        # The pool is made on first use, which in the API is many request threads at once: one
        # makes it, the others wait (without the lock each made a pool, and all but one leaked).
        self._pool_lock = threading.Lock()

    # -- database -------------------------------------------------------------------------
    @property
    def pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._pool_lock:
            return self._make_pool()

    def _make_pool(self) -> ConnectionPool:
        if self._pool is None or self._pool_pid != os.getpid():
            # A pool inherited across fork() shares sockets with the parent: never reuse it.
            self._pool = ConnectionPool(
                self.settings.conninfo,
                min_size=min(self.settings.db_pool_min_size, self._pool_size),
                max_size=self._pool_size,
                timeout=self.settings.db_pool_timeout_seconds,
                # Autocommit: every change is an explicit `with conn.transaction()`, which then
                # really commits. Without it, a read before a service call would open a
                # transaction, turn the service's block into a savepoint, and the change would be
                # rolled back silently when the connection went back to the pool.
                kwargs={"autocommit": True},
                # A connection the server dropped while it sat in the pool (a restart, a killed
                # session, an idle timeout) is found and replaced at checkout, for the price of
                # one round trip, instead of failing the request that drew it.
                check=ConnectionPool.check_connection if self._check_connections else None,
                open=True,
                name="recalq",
            )
            self._pool_pid = os.getpid()
        return self._pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def connect(self) -> psycopg.Connection:
        """A dedicated connection outside the pool (the relay's and its LISTEN's)."""
        return psycopg.connect(self.settings.conninfo, connect_timeout=10)

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
        self._pool = None

    # -- services -------------------------------------------------------------------------
    @cached_property
    def retry_policy(self) -> RetryPolicy:
        """The backoff after a counted failed attempt, whoever records the failure."""
        s = self.settings
        return RetryPolicy(s.retry_base_seconds, s.retry_max_seconds, s.retry_jitter)

    @cached_property
    def infra_retry_policy(self) -> RetryPolicy:
        """The wait after an infrastructure error (never counted), growing per consecutive one."""
        s = self.settings
        return RetryPolicy(min(1.0, s.infra_retry_max_seconds), s.infra_retry_max_seconds, s.retry_jitter)

    @cached_property
    def runner_policy(self) -> RunnerPolicy:
        """Every kind's runner: the lease is each task's own (outbox_task.lease_seconds)."""
        s = self.settings
        return RunnerPolicy(retry=self.retry_policy, infra_retry=self.infra_retry_policy,
                            busy_retry_seconds=s.busy_retry_seconds, lease_seconds=None)

    @cached_property
    def recalculation_policy(self) -> RecalculationPolicy:
        s = self.settings
        return RecalculationPolicy(
            lease_seconds=None,
            retry=self.retry_policy,
            infra_retry=self.infra_retry_policy,
            busy_retry_seconds=s.busy_retry_seconds,
            lock_timeout_ms=s.lock_timeout_ms,
        )

    @cached_property
    def recalculator(self) -> Recalculator:
        return Recalculator(
            connection=self.connection,
            policy=self.recalculation_policy,
            today=utc_today,
            probe=probe_from_spec(self.settings.fault),
        )

    def job_kinds(self) -> dict[str, Handler]:
        """Every job kind this deployment runs: task name -> handler. The recalculation's handler
        is the Recalculator's, so the worker and the tests that drive it run the same code."""
        return {RECALCULATE_TASK: self.recalculator.handler, EVALUATE_TASK: self.evaluation_handler}

    @cached_property
    def evaluation_handler(self) -> EvaluationHandler:
        s = self.settings
        return EvaluationHandler(ProviderClient(s.evaluation_provider_url or SIMULATOR_URL,
                                                timeout_seconds=s.evaluation_provider_timeout_seconds,
                                                tries=s.evaluation_provider_tries))

    def runner(self, handler: Handler) -> JobRunner:
        return JobRunner(handler=handler, connection=self.connection, policy=self.runner_policy,
                         probe=probe_from_spec(self.settings.fault))

    @cached_property
    def runners(self) -> dict[str, JobRunner]:
        return {name: self.recalculator.runner if name == RECALCULATE_TASK else self.runner(handler)
                for name, handler in self.job_kinds().items()}

    def maintenance(self) -> MaintenanceDeps:
        s = self.settings
        return MaintenanceDeps(
            connection=self.connection,
            relay=self.relay,
            today=utc_today,
            prune_after=timedelta(days=s.prune_after_days),
            file_store=lambda: FileStore(s.document_dir),
            drift_sweep_batch_size=s.drift_sweep_batch_size,
        )

    # -- Celery and the relay ---------------------------------------------------------------
    @cached_property
    def celery_app(self) -> Celery:
        app = Celery("recalq")
        app.config_from_object(celery_config(self.settings))
        # One line per job at INFO, its outcome ("succeeded" / "retry" / the runner's lines): not
        # also a "received" line for every delivery, which doubles a busy worker's log.
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
        recalculation_task.register(app, lambda: self.runners[RECALCULATE_TASK])
        for name in self.job_kinds():
            if name != RECALCULATE_TASK:
                register_job_task(app, name, lambda name=name: self.runners[name])
        register_maintenance_tasks(app, self.maintenance)
        worker_process_init.connect(self._on_worker_process_init, weak=False)
        worker_process_shutdown.connect(self._on_worker_process_shutdown, weak=False)
        task_unknown.connect(self._on_task_unknown, weak=False)
        return app

    def relay(self) -> Relay:
        s = self.settings
        return Relay(
            connect=self.connect,
            # RabbitMQ: publisher confirms, pipelined per batch. Redis has none: a pipeline.
            publish=CeleryPublisher(
                self.celery_app, s.queue,
                confirms=s.broker_is_rabbitmq, confirm_timeout=s.broker_timeout_seconds,
            ),
            batch_size=s.relay_batch_size,
            claim_lease_seconds=s.relay_claim_lease_seconds,
            poll_seconds=s.relay_poll_seconds,
            rescue_after_seconds=s.rescue_after_seconds,
            rescue_interval_seconds=s.rescue_interval_seconds,
            # Twice the longest infrastructure retry countdown (jitter included): a worker cut
            # off from the database resumes its own attempt before the rescue takes it over.
            takeover_grace_seconds=2 * s.infra_retry_max_seconds,
            probe=probe_from_spec(s.fault),
        )

    def _on_worker_process_init(self, **_: object) -> None:
        self._pool = None  # the child builds its own on first use
        self.pool  # noqa: B018 - open it now, before the first task waits on it

    def _on_worker_process_shutdown(self, **_: object) -> None:
        self.close()

    def _on_task_unknown(self, name: str | None = None, id: str | None = None, **_: object) -> None:
        """Celery discarded a message for a task this worker does not run: count its attempt, or
        the rescue would re-send it for ever. Runs in the consumer; a rare event, so it uses a
        short-lived connection, and a database error only costs the count (the rescue re-sends)."""
        try:
            with self.connect() as conn:
                conn.autocommit = True
                outcome = record_unrunnable_delivery(
                    conn, str(id), reason=f"no worker that received it runs task {name!r}",
                    lease_seconds=None,
                    retry=self.retry_policy,
                )
        except psycopg.Error as exc:
            log.warning("could not record the undeliverable task %s (%s): %s", id, name, exc)
            return
        if outcome is not None:
            log.warning("task %s (%s) is not run by this worker; its job is now %s", id, name, outcome)


@cache
def runtime() -> Runtime:
    """This process's Runtime, built from the environment once."""
    return Runtime(Settings())
