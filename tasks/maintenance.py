"""The beat's tasks: thin adapters from a schedule tick to a maintenance service.

Each takes a pooled connection from the worker's runtime, calls one service, logs what it did
and returns a small summary. All are idempotent, so a tick delivered twice, two beats, or a
run by hand (`celery -A tasks call maintenance.prune`) do no harm. Time limits come from
task_annotations (recalq/celery_config.py); no results are stored.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

from celery import Task, shared_task

from outbox.prune import prune_finished
from recalq.bootstrap import Runtime, utc_today
from recalq.celery_config import DRIFT_SWEEP_TASK, PRUNE_TASK, RESCUE_TASK, ROLLOVER_TASK
from services.drift_sweep import drift_detected_since, sweep
from services.expiry_rollover import roll_over_expiries
from services.file_store import FileStore
from services.uploads import remove_orphans

log = logging.getLogger(__name__)

#: Files no document row references are removed once they are this old (uploads in flight are
#: younger; see services.uploads.remove_orphans).
ORPHAN_FILE_AGE = timedelta(hours=1)
#: The drift count a finished sweep reports covers the nightly period: mostly the runs the
#: previous sweep asked for, which have finished by now.
DRIFT_REPORT_PERIOD = timedelta(days=1)


#: Late acks: a worker that stops mid-task hands the tick back. But a child that dies (OOM) is
#: not redelivered: the next tick reruns the task, where a redelivery could loop on a task that
#: always kills its child. No results are stored: the log and Postgres say what happened.
_MAINTENANCE: dict[str, Any] = {"bind": True, "ignore_result": True, "acks_late": True, "reject_on_worker_lost": False}


def _runtime(task: Task) -> Runtime:
    return task.app.recalq


@shared_task(name=ROLLOVER_TASK, **_MAINTENANCE)
def expiry_rollover(self: Task) -> dict[str, Any]:
    runtime = _runtime(self)
    today = utc_today()
    with runtime.connection() as conn:
        report = roll_over_expiries(conn, today=today)
    log.info("expiry rollover %s: %s recalculation(s) enqueued, %s already requested, %s properties scanned",
             today, report.enqueued, report.already_requested, report.scanned)
    return {"today": today.isoformat(), "enqueued": report.enqueued,
            "already_requested": report.already_requested, "scanned": report.scanned}


@shared_task(name=RESCUE_TASK, **_MAINTENANCE)
def rescue(self: Task) -> dict[str, Any]:
    """One relay rescue pass, for deployments whose relays are scaled down. The worker's fenced
    start decides what a re-sent message may do, so a needless re-send is a no-op."""
    runtime = _runtime(self)
    with runtime.connection() as conn:
        result = runtime.relay().rescue_pass(conn)
    if result.published:
        log.warning("rescue re-sent %s job(s) whose message looked lost", result.published)
    return {"claimed": result.claimed, "published": result.published}


@shared_task(name=PRUNE_TASK, **_MAINTENANCE)
def prune(self: Task) -> dict[str, Any]:
    runtime = _runtime(self)
    settings = runtime.settings
    with runtime.connection() as conn:
        report = prune_finished(conn, older_than=timedelta(days=settings.prune_after_days))
        orphans = remove_orphans(conn, FileStore(settings.document_dir), ORPHAN_FILE_AGE)
    log.info("pruned %s finished job(s) and %s request(s); removed %s orphan file(s)",
             report.jobs, report.requests, len(orphans))
    return {"jobs": report.jobs, "requests": report.requests, "orphan_files": len(orphans)}


@shared_task(name=DRIFT_SWEEP_TASK, **_MAINTENANCE)
def drift_sweep(
    self: Task, after_property_id: int = 0, requested_so_far: int = 0, day: str | None = None
) -> dict[str, Any]:
    """One batch of the sweep; it sends itself the next batch, so the sweep never holds a
    worker for long. `day` keeps one correlation id for a sweep that runs past midnight."""
    runtime = _runtime(self)
    today = date.fromisoformat(day) if day else utc_today()
    with runtime.connection() as conn:
        report = sweep(conn, today=today, batch_size=runtime.settings.drift_sweep_batch_size,
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
