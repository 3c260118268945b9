"""Submitting a watched job over HTTP, the same way for every kind.

A kind's POST route validates its own input, then calls `submit_job` with its task, lock key
and payload. The answer is 202 with the job (its status and stream URLs); a second submission
while the kind's lock is held answers 409 naming `active_job_id`; one inside the cooldown
answers 429 with `Retry-After`. Submissions are idempotent like every change: the same
`Idempotency-Key` answers the first job (200, `Idempotent-Replayed: true`), however many
arrive at once.
"""

from __future__ import annotations

import math
from typing import Any

import psycopg
from fastapi import Request

from api.dependencies import correlation_id
from api.idempotency import AnswerInstead, answer_once, keyed
from api.problems import problem_response
from api.routes.jobs import JobOut, active_job_problem, job_out
from api.security import WatcherCaller
from outbox import job_views, watched
from outbox.errors import ActiveJobExists, CoolingDown


def submit_job(
    conn: psycopg.Connection,
    request: Request,
    watcher: WatcherCaller,
    key: str,
    *,
    task: str,
    lock_key: str,
    payload: dict[str, Any],
    values: Any = None,
) -> Any:
    """`values`: what the request sent (the idempotency fingerprint); `lock_key`: the coalescing
    key (for a unique_active kind, the lock: e.g. owner and property)."""

    def change() -> JobOut:
        try:
            made = watched.submit(conn, task=task, coalescing_key=lock_key, payload=payload,
                                  correlation_id=correlation_id(watcher.actor, key), trigger_reason="submitted",
                                  actor_type=watcher.actor.type, actor_id=watcher.actor.id)
        except ActiveJobExists as active:
            raise AnswerInstead(active_job_problem(active.active_job_id)) from active
        except CoolingDown as cooling:
            wait = max(1, math.ceil(cooling.retry_after_seconds or 1))
            raise AnswerInstead(problem_response(
                429, "Too many requests", f"the last one finished moments ago; submit again in {wait} s",
                kind="cooling-down", headers={"Retry-After": str(wait)})) from cooling
        snap = job_views.snapshot(conn, made.job_id)
        assert snap is not None
        return job_out(request, snap, owner_view=True)

    return answer_once(conn, keyed(request, watcher.actor, key, values), change)
