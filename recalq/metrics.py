"""Prometheus metrics of the queue, read from PostgreSQL on every scrape.

The numbers come from the `outbox_queue_state` view and the audit log, not from counters kept in
a process: Postgres is the truth about jobs, every API process answers the same, and nothing is
lost when a process restarts. A scrape while the database is down or slow answers `recalq_up 0`
and nothing else, instead of failing: "down" is itself the thing to alert on.

    recalq_up                                     1 when the database answered this scrape
    recalq_jobs{task,status}                      jobs in pending, published, running, retrying, dead
    recalq_relay_lag_seconds{task}                how long the oldest due pending job has waited
    recalq_oldest_job_age_seconds{task,status}    age of the oldest job in that status (0: none)
    recalq_finished_per_second{task,status}       done, dead, superseded per second over 5 minutes
    recalq_failed_attempts_5m{task,outcome}       attempts that failed or were lost in the last 5 minutes
                                                  (outbox_attempt: every error, not only a job's last)
    recalq_drift_detected_24h                     COMPLIANCE_SCORE_DRIFT_DETECTED audits, last 24 h
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from outbox.db_errors import is_infrastructure_error, is_transient_error
from outbox.history import FailedAttempts, failed_attempts_since
from services.queries import QUERIES
from services.vocabulary import AuditAction

log = logging.getLogger(__name__)

#: Statuses a job can be in now; done and superseded are history.
LIVE_STATUSES = ("pending", "published", "running", "retrying", "dead")
#: Statuses a job finishes in.
FINISHED_STATUSES = ("done", "dead", "superseded")
DRIFT_WINDOW_SECONDS = 24 * 3600
FAILED_ATTEMPTS_WINDOW_SECONDS = 300
#: Attempt outcomes counted as failures; each task reports both, 0 when none happened.
FAILED_OUTCOMES = ("failed", "lost")
#: Prometheus' default scrape timeout is 10 s; a scrape gives up well before.
DEFAULT_SCRAPE_TIMEOUT_SECONDS = 2.0

Connect = Callable[[], AbstractContextManager[psycopg.Connection]]


@dataclass(frozen=True)
class QueueRow:
    task: str
    status: str
    jobs: int | None
    oldest_age_s: float | None
    relay_lag_s: float | None
    finished_per_second: float


@dataclass(frozen=True)
class Snapshot:
    rows: list[QueueRow]
    drift_detected_24h: int
    failed_attempts: list[FailedAttempts]


class QueueCollector(Collector):
    """Reads a snapshot through `connect` (a pooled connection, autocommit) on each collect."""

    def __init__(self, connect: Connect, statement_timeout_seconds: float = DEFAULT_SCRAPE_TIMEOUT_SECONDS) -> None:
        self._connect = connect
        self._timeout_ms = max(1, int(statement_timeout_seconds * 1000))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering must not touch the database, so the families are named without samples.
        yield from _families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snapshot = self._snapshot()
        except (psycopg.Error, PoolTimeout) as exc:
            if not (is_infrastructure_error(exc) or is_transient_error(exc)):
                raise  # a bug (say, the view is missing) is an error, not "down"
            log.warning("metrics: the database did not answer the scrape: %s", exc)
            yield GaugeMetricFamily("recalq_up", _UP_HELP, value=0)
            return
        up, jobs, lag, age, rate, drift, failed = _families()
        up.add_metric([], 1)
        for row in snapshot.rows:
            if row.status in LIVE_STATUSES:
                jobs.add_metric([row.task, row.status], row.jobs or 0)
                age.add_metric([row.task, row.status], row.oldest_age_s or 0.0)
            if row.status == "pending":
                lag.add_metric([row.task], row.relay_lag_s or 0.0)
            if row.status in FINISHED_STATUSES:
                rate.add_metric([row.task, row.status], row.finished_per_second)
        drift.add_metric([], snapshot.drift_detected_24h)
        counted = {(f.task, f.outcome): f.attempts for f in snapshot.failed_attempts}
        for task in sorted({row.task for row in snapshot.rows} | {task for task, _ in counted}):
            for outcome in FAILED_OUTCOMES:
                failed.add_metric([task, outcome], counted.get((task, outcome), 0))
        yield from (up, jobs, lag, age, rate, drift, failed)

    def _snapshot(self) -> Snapshot:
        with self._connect() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(QUERIES["metrics_statement_timeout"], {"timeout": f"{self._timeout_ms}ms"})
            rows = [QueueRow(**row) for row in cur.execute(QUERIES["metrics_queue_state"]).fetchall()]
            drift = cur.execute(
                QUERIES["metrics_audit_actions_since"],
                {"action": str(AuditAction.COMPLIANCE_SCORE_DRIFT_DETECTED), "seconds": DRIFT_WINDOW_SECONDS},
            ).fetchone()
            failed = failed_attempts_since(conn, seconds=FAILED_ATTEMPTS_WINDOW_SECONDS)
        assert drift is not None
        return Snapshot(rows, drift["n"], failed)


_UP_HELP = "1 when the database answered this scrape, 0 when it was down or too slow (nothing else is reported)"


def _families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily("recalq_up", _UP_HELP),
        GaugeMetricFamily("recalq_jobs", "Outbox jobs in each live status", labels=["task", "status"]),
        GaugeMetricFamily("recalq_relay_lag_seconds",
                          "How long the oldest due pending job has waited for a relay (0: none waiting)",
                          labels=["task"]),
        GaugeMetricFamily("recalq_oldest_job_age_seconds",
                          "Age of the oldest job in each live status (0: no job in it)", labels=["task", "status"]),
        GaugeMetricFamily("recalq_finished_per_second",
                          "Jobs that finished in each terminal status, per second over the last 5 minutes",
                          labels=["task", "status"]),
        GaugeMetricFamily("recalq_drift_detected_24h",
                          "Verification runs in the last 24 hours that found a stored score differing from "
                          "the recomputed one (COMPLIANCE_SCORE_DRIFT_DETECTED)"),
        GaugeMetricFamily("recalq_failed_attempts_5m",
                          "Attempts that failed (an error) or were lost (worker died, lease ran out) in the last "
                          "5 minutes, whether or not their job was retried", labels=["task", "outcome"]),
    )


def exposition(connect: Connect, statement_timeout_seconds: float = DEFAULT_SCRAPE_TIMEOUT_SECONDS) -> bytes:
    """One scrape in the Prometheus text format (serve it as prometheus_client.CONTENT_TYPE_LATEST)."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(connect, statement_timeout_seconds))
    return generate_latest(registry)
