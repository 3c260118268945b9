"""The beat's tasks: thin adapters from a schedule tick to a maintenance service.

Each takes a pooled connection from what the composition root handed it, calls one service,
logs what it did and returns a small summary. All are idempotent, so a tick delivered twice, two
beats, or a run by hand (`celery -A recalq.celery_app call maintenance.prune`) do no harm. Time
limits come from task_annotations (recalq/celery_config.py); no results are stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from celery import Celery, Task

from outbox.prune import expire_watched, prune_finished, prune_tombstones
from outbox.relay import Relay
from services.drift_sweep import drift_detected_since, sweep
from services.expiry_rollover import roll_over_expiries
from services.file_store import FileStore
from services.idempotent_answers import prune_answers
from services.uploads import remove_orphans

log = logging.getLogger(__name__)

ROLLOVER_TASK = "maintenance.expiry_rollover"
RESCUE_TASK = "maintenance.rescue"
PRUNE_TASK = "maintenance.prune"
DRIFT_SWEEP_TASK = "maintenance.drift_sweep"
MAINTENANCE_TASKS = (ROLLOVER_TASK, RESCUE_TASK, PRUNE_TASK, DRIFT_SWEEP_TASK)

#: Files no document row references are removed once they are this old (uploads in flight are
#: younger; see services.uploads.remove_orphans).
ORPHAN_FILE_AGE = timedelta(hours=1)
#: The drift count a finished sweep reports covers the nightly period: mostly the runs the
#: previous sweep asked for, which have finished by now.
DRIFT_REPORT_PERIOD = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MaintenanceDeps:
    """What the maintenance tasks need, handed over by the composition root."""

    connection: Callable[[], AbstractContextManager[psycopg.Connection]]
    relay: Callable[[], Relay]
    today: Callable[[], date]
    prune_after: timedelta
    file_store: Callable[[], FileStore]
    drift_sweep_batch_size: int


#: Late acks: a worker that stops mid-task hands the tick back. But a child that dies (OOM) is
#: not redelivered: the next tick reruns the task, where a redelivery could loop on a task that
#: always kills its child. No results are stored: the log and Postgres say what happened.
_MAINTENANCE: dict[str, Any] = {"bind": True, "ignore_result": True, "acks_late": True,
                                "reject_on_worker_lost": False, "shared": False}


def register_maintenance_tasks(app: Celery, deps: Callable[[], MaintenanceDeps]) -> None:
    @app.task(name=ROLLOVER_TASK, **_MAINTENANCE)
    def expiry_rollover(self: Task) -> dict[str, Any]:
        d = deps()
        today = d.today()
        with d.connection() as conn:
            report = roll_over_expiries(conn, today=today)
        log.info("expiry rollover %s: %s recalculation(s) enqueued, %s already requested, %s properties scanned",
                 today, report.enqueued, report.already_requested, report.scanned)
        return {"today": today.isoformat(), "enqueued": report.enqueued,
                "already_requested": report.already_requested, "scanned": report.scanned}

    @app.task(name=RESCUE_TASK, **_MAINTENANCE)
    def rescue(self: Task) -> dict[str, Any]:
        """One relay rescue pass, for deployments whose relays are scaled down. The worker's fenced
        start decides what a re-sent message may do, so a needless re-send is a no-op."""
        d = deps()
        with d.connection() as conn:
            result = d.relay().rescue_pass(conn)
        if result.published:
            log.warning("rescue re-sent %s job(s) whose message looked lost", result.published)
        return {"claimed": result.claimed, "published": result.published}

    @app.task(name=PRUNE_TASK, **_MAINTENANCE)
    def prune(self: Task) -> dict[str, Any]:
        d = deps()
        with d.connection() as conn:
            report = prune_finished(conn, older_than=d.prune_after) + expire_watched(conn)
            tombstones = prune_tombstones(conn)
            # Answers are kept as long as the requests they answer: a key is remembered as long.
            answers = prune_answers(conn, older_than=d.prune_after)
            orphans = remove_orphans(conn, d.file_store(), ORPHAN_FILE_AGE)
        log.info("pruned %s finished job(s), %s request(s), %s tombstone(s) and %s stored answer(s); "
                 "removed %s orphan file(s)", report.jobs, report.requests, tombstones, answers, len(orphans))
        return {"jobs": report.jobs, "requests": report.requests, "tombstones": tombstones, "answers": answers,
                "orphan_files": len(orphans)}

    @app.task(name=DRIFT_SWEEP_TASK, **_MAINTENANCE)
    def drift_sweep(
        self: Task, after_property_id: int = 0, requested_so_far: int = 0, day: str | None = None
    ) -> dict[str, Any]:
        """One batch of the sweep; it sends itself the next batch, so the sweep never holds a
        worker for long. `day` keeps one correlation id for a sweep that runs past midnight."""
        d = deps()
        today = date.fromisoformat(day) if day else d.today()
        with d.connection() as conn:
            report = sweep(conn, today=today, batch_size=d.drift_sweep_batch_size,
                           after_property_id=after_property_id)
            requested = requested_so_far + report.requested
            if report.next_after_property_id is not None:
                self.apply_async(kwargs={"after_property_id": report.next_after_property_id,
                                         "requested_so_far": requested, "day": today.isoformat()})
                return {"requested": report.requested, "next_after_property_id": report.next_after_property_id}
            drift = drift_detected_since(conn, datetime.now(UTC) - DRIFT_REPORT_PERIOD)
        log.info("drift sweep %s asked for %s verification run(s); drift detected in the last %s: %s",
                 today, requested, DRIFT_REPORT_PERIOD, drift)
        return {"requested": requested, "drift_detected": drift}
