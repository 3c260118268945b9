"""`recalq requeue` and `recalq cancel`: the operator's verbs that change a job's status.

Each goes through the transition the admin API uses (outbox.lifecycle.requeue with its
JOB_REQUEUED audit row; outbox.watched.cancel, as POST /api/jobs/{id}/cancel), in one
transaction that holds the job's row lock, so a concurrent API call or second CLI run cannot
do it twice.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import psycopg

from outbox import JobStatus, lifecycle, watched
from outbox.watched import CancelOutcome
from recalq.console_format import plural_s
from recalq.operator import MAX_LIMIT, CommandFailed
from services import admin_views, audit
from services.vocabulary import Actor, AuditAction

#: A report names at most this many job ids, then counts the rest.
IDS_SHOWN = 50


# -- requeue ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requeued:
    job_id: int
    #: The job that will run: this one, or the key's job already waiting, which covers it.
    runs_as: int


def requeue(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    actor = cli_actor()
    correlation_id = f"{actor.type}:{actor.id}:{uuid.uuid4().hex}"  # one per run: its audit rows share it
    if args.job_id is not None:
        done = requeue_one(conn, args.job_id, actor, correlation_id)
        out.write(_requeued_report([done], []) + "\n")
        return 0

    candidates = dead_job_ids(conn, key=args.key)
    scope = f"for key {args.key!r}" if args.key is not None else "at all"
    if not candidates:
        out.write(f"no dead jobs {scope}; nothing requeued\n")
        return 0
    if args.all and not args.yes and not confirmed(
        f"Requeue {len(candidates)} dead job{plural_s(len(candidates))} ({ids_text(candidates)})? [y/N] ", out
    ):
        raise CommandFailed("not confirmed; nothing requeued (pass --yes to skip the question)")
    requeued: list[Requeued] = []
    skipped: list[tuple[int, str]] = []
    for job_id in candidates:
        try:
            requeued.append(requeue_one(conn, job_id, actor, correlation_id))
        except NotDead as exc:  # requeued or purged by someone else meanwhile
            skipped.append((job_id, exc.status or "gone"))
    out.write(_requeued_report(requeued, skipped) + "\n")
    return 0


class NotDead(CommandFailed):
    def __init__(self, job_id: int, status: str | None) -> None:
        if status is None:
            super().__init__(f"job {job_id} does not exist")
        else:
            super().__init__(f"job {job_id} is {status}, not dead; only a dead job can be requeued "
                             "(`recalq jobs --status dead` lists them)")
        self.status = status


class KeyHeld(NotDead):
    def __init__(self, job_id: int) -> None:
        CommandFailed.__init__(self, f"job {job_id}'s key is held by another active job (its task runs one at a "
                               "time); requeue it once that one has finished")
        self.status = "dead, key held"


def requeue_one(conn: psycopg.Connection, job_id: int, actor: Actor, correlation_id: str) -> Requeued:
    """Requeues one DEAD job with its audit row, in one transaction; the job's row lock keeps a
    concurrent requeue (API or CLI) from doing it twice."""
    with conn.transaction():
        current = admin_views.lock_job(conn, job_id)
        if current != JobStatus.DEAD:
            raise NotDead(job_id, current)
        runs_as = lifecycle.requeue(conn, job_id)
        if runs_as is None:
            raise KeyHeld(job_id)
        audit.record(conn, AuditAction.JOB_REQUEUED, actor, job_id=job_id, correlation_id=correlation_id,
                     details={"runs_as": runs_as})
    return Requeued(job_id, runs_as)


def dead_job_ids(conn: psycopg.Connection, *, key: str | None) -> list[int]:
    """Every DEAD job (of one key, if given), oldest first."""
    ids: list[int] = []
    before: int | None = None
    while True:
        page = admin_views.jobs(conn, status=JobStatus.DEAD, key=key, limit=MAX_LIMIT, before_id=before)
        ids.extend(job.job_id for job in page.jobs)
        if page.next_before_id is None:
            return sorted(ids)
        before = page.next_before_id


def cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid-{os.getuid()}"
    return Actor.system(f"cli:{user}")


def confirmed(question: str, out: TextIO) -> bool:
    out.write(question)
    out.flush()
    answer = sys.stdin.readline()
    if not sys.stdin.isatty() or not answer.endswith("\n"):
        out.write("\n")  # the terminal did not echo an answer and its newline
    return answer.strip().lower() in {"y", "yes"}


def _requeued_report(requeued: Sequence[Requeued], skipped: Sequence[tuple[int, str]]) -> str:
    lines = []
    if requeued:
        ids = ids_text([r.job_id for r in requeued])
        lines.append(f"requeued {len(requeued)} dead job{plural_s(len(requeued))}: {ids}")
        joined = [r for r in requeued if r.runs_as != r.job_id]
        if joined:
            lines.append("covered by a job already waiting for its key: "
                         + ", ".join(f"{r.job_id} -> {r.runs_as}" for r in joined[:IDS_SHOWN]))
    else:
        lines.append("requeued nothing")
    if skipped:
        lines.append("skipped, no longer dead: " + ", ".join(f"{job_id} ({what})" for job_id, what in skipped))
    return "\n".join(lines)


# -- drain -----------------------------------------------------------------------------------


def ids_text(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:IDS_SHOWN])
    return shown + (f" and {len(ids) - IDS_SHOWN} more" if len(ids) > IDS_SHOWN else "")


# -- cancel ----------------------------------------------------------------------------------

#: The job's coalescing mode: a coalescing kind (the recalculation) is never cancellable.
JOB_MODE = "SELECT mode::text FROM outbox_job WHERE id = %(job_id)s"
#: Why a job cannot be cancelled, by whether its kind coalesces.
NOT_CANCELLABLE = {
    True: "a coalescing kind carries the requests of every change coalesced into it, which cancelling would drop",
    False: "its kind's policy does not allow cancelling (outbox_task.cancellable)",
}


def cancel(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    """Stops a job of a kind whose policy allows it (outbox_task.cancellable): at once if it is
    waiting to run, at its next unit if it runs."""
    job_id = args.job_id
    with conn.transaction():
        outcome = watched.cancel(conn, job_id)  # locks the job's row until the transaction ends
        found = admin_views.job(conn, job_id)
        mode_row = conn.execute(JOB_MODE, {"job_id": job_id}).fetchone()
    if outcome is CancelOutcome.MISSING or found is None:
        raise CommandFailed(f"job {job_id} does not exist")
    what = f"job {job_id} ({found.task}, key {found.coalescing_key})"
    if outcome is CancelOutcome.NOT_CANCELLABLE:
        coalescing = mode_row is not None and mode_row[0] == "coalesce"
        raise CommandFailed(f"{what} cannot be cancelled: {NOT_CANCELLABLE[coalescing]}; nothing changed")
    if outcome is CancelOutcome.FINISHED:
        if found.status == JobStatus.CANCELLED:
            out.write(f"{what} was already cancelled; nothing changed\n")
            return 0
        raise CommandFailed(f"{what} already ended ({found.status}); there is nothing to cancel")
    if outcome is CancelOutcome.REQUESTED:
        out.write(f"asked {what} to stop: it is running and stops at its next unit; "
                  f"`recalq job {job_id}` shows it cancelled once it has\n")
        return 0
    out.write(f"cancelled {what}: it was waiting to run, and now never will\n")
    return 0
