"""The operator's commands: `recalq status`, `jobs`, `job`, `requeue` and `drain`.

They read and repair the queue through the same service functions as the admin API
(services.admin_views, outbox.lifecycle, services.audit), so a CLI requeue and an API requeue
are the same transition with the same audit row; only the actor differs (system,
"cli:<os user>"). They need only the database: the broker is not touched.

Every failure ends with one sentence on stderr and an exit status, never a traceback:
0 done, 1 the operation could not do what was asked (a job that is not dead, a drain that timed
out, a refused confirmation), 2 the command cannot run (settings, unreachable or unmigrated
database, bad arguments).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TextIO

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox import JobStatus, lifecycle
from outbox.history import attempts_of_job
from recalq.console_format import age, count, json_default, one_line, plural_s, print_table, utc
from recalq.settings import Settings
from services import admin_views, audit
from services.vocabulary import Actor, AuditAction

#: Statuses that keep `drain` waiting: the job will still run.
ACTIVE = (JobStatus.PENDING, JobStatus.PUBLISHED, JobStatus.RUNNING, JobStatus.RETRYING)
CONNECT_TIMEOUT_SECONDS = 10
#: `jobs` shows at most this many rows at once (the admin API's page size).
MAX_LIMIT = admin_views.MAX_PAGE_SIZE
#: How much of a job's last error `jobs` shows: in a terminal, what fits; else this much.
LAST_ERROR_WIDTH = 100
MIN_LAST_ERROR_WIDTH = 30
#: A requeue's report names at most this many job ids, then counts the rest.
IDS_SHOWN = 50
#: Without a terminal, `drain` prints a progress line at most this often.
PROGRESS_LINE_EVERY_SECONDS = 5.0


class CommandFailed(Exception):
    """Ends a command with `message` on stderr and `exit_code`; never shown as a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


Command = Callable[[psycopg.Connection, argparse.Namespace, TextIO], int]


def run(name: str, command: Command, settings: Settings, args: argparse.Namespace) -> int:
    """Runs one operator command against the database, turning every expected failure into a
    sentence and an exit status."""
    out = sys.stdout
    try:
        if settings.database_url is None:
            raise CommandFailed(
                "DATABASE_URL is not set; point it at recalq's database, e.g. "
                "DATABASE_URL=postgresql://app@db:5432/recalq (`recalq up` prints the one it uses)", 2)
        try:
            conninfo = settings.conninfo
        except ValueError as exc:  # a URL of another database, e.g. mysql://
            raise CommandFailed(str(exc).replace("database_url", "DATABASE_URL"), 2) from None
        with _database(conninfo, name) as conn:
            return command(conn, args, out)
    except CommandFailed as exc:
        print(f"recalq {name}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`recalq jobs --json | head`): as the Python docs advise, point
        # stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


@contextmanager
def _database(conninfo: str, name: str) -> Iterator[psycopg.Connection]:
    try:
        where = _where(conninfo)
    except psycopg.ProgrammingError as exc:  # libpq cannot parse the URL
        raise CommandFailed(f"DATABASE_URL is not a connection URL libpq understands: {_first_line(exc)}", 2) from None
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS,
                               application_name=f"recalq {name}")
    except psycopg.OperationalError as exc:
        raise CommandFailed(f"cannot reach the database {where}: {_first_line(exc)}", 2) from None
    try:
        with conn:
            yield conn
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedObject):
        raise CommandFailed(f"the database {where} has no recalq schema; run `recalq migrate` first", 2) from None
    except psycopg.OperationalError as exc:
        raise CommandFailed(f"lost the database {where}: {_first_line(exc)}", 2) from None


def _where(conninfo: str) -> str:
    """host:port/dbname, never the password."""
    params = conninfo_to_dict(conninfo)
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Totals:
    """The queue over all tasks: what `status` summarises and `drain` waits on."""

    by_status: dict[str, int]
    #: The longest a due pending job has waited for a relay (seconds), if any is waiting.
    relay_lag_s: float | None
    #: The oldest job still to run, in seconds since it was created.
    oldest_active_s: float | None
    finished_last_1m: int
    finished_last_5m: int

    @property
    def active(self) -> int:
        return sum(self.by_status.get(s, 0) for s in ACTIVE)

    @property
    def dead(self) -> int:
        return self.by_status.get(JobStatus.DEAD, 0)


def totals(rows: Iterable[admin_views.QueueState]) -> Totals:
    by_status: dict[str, int] = {}
    lags: list[float] = []
    ages: list[float] = []
    finished_1m = finished_5m = 0
    for row in rows:
        if row.jobs is not None:
            by_status[row.status] = by_status.get(row.status, 0) + row.jobs
        if row.relay_lag_s is not None and row.jobs:
            lags.append(row.relay_lag_s)
        if row.status in ACTIVE and row.oldest_age_s is not None:
            ages.append(row.oldest_age_s)
        finished_1m += row.finished_last_1m
        finished_5m += row.finished_last_5m
    return Totals(by_status, max(lags, default=None), max(ages, default=None), finished_1m, finished_5m)


def status(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    rows = queue_state(conn)
    if args.json:
        json.dump([asdict(row) for row in rows], out, indent=2)
        out.write("\n")
        return 0
    header = ("TASK", "STATUS", "JOBS", "OLDEST", "RELAY LAG", "FINISHED 1M", "FINISHED 5M", "RATE/S (5M)")
    table = [
        (row.task, row.status, count(row.jobs), age(row.oldest_age_s), age(row.relay_lag_s if row.jobs else None),
         str(row.finished_last_1m), str(row.finished_last_5m), f"{row.per_second_5m:.2f}")
        for row in rows
    ]
    print_table(out, header, table, right_aligned={2, 5, 6, 7})
    overall = totals(rows)
    out.write("\n" + summary(overall) + "\n")
    dead = overall.dead
    if dead:
        out.write(f"{dead} dead job{plural_s(dead)} need{'' if dead != 1 else 's'} attention: "
                  "`recalq jobs --status dead` shows why; `recalq requeue` runs them again once fixed\n")
    return 0


def queue_state(conn: psycopg.Connection) -> list[admin_views.QueueState]:
    """The view's rows by task, then in the order a job moves through its statuses."""
    order = {status: i for i, status in enumerate(JobStatus)}
    return sorted(admin_views.queue_state(conn), key=lambda row: (row.task, order.get(row.status, len(order))))


def summary(t: Totals) -> str:
    counts = ", ".join(f"{t.by_status.get(s, 0)} {s}" for s in (*ACTIVE, JobStatus.DEAD))
    lag = f"relay lag {age(t.relay_lag_s)}" if t.relay_lag_s is not None else "no job waits for a relay"
    return (f"{counts}; {lag}; {t.finished_last_5m} finished in the last 5 min "
            f"({t.finished_last_5m / 300:.2f}/s), {t.finished_last_1m} in the last minute")


# -- jobs ------------------------------------------------------------------------------------


def jobs(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    if args.task is not None:
        known = sorted({row.task for row in queue_state(conn)})
        if args.task not in known:
            raise CommandFailed(f"there is no task {args.task!r}; the tasks are: {', '.join(known)}", 2)
    page = admin_views.jobs(conn, status=args.status, key=args.key, task=args.task, limit=args.limit,
                            before_id=args.before_id)
    if args.json:
        json.dump([asdict(job) for job in page.jobs], out, indent=2, default=json_default)
        out.write("\n")
        return 0
    if not page.jobs:
        out.write("no jobs match\n")
        return 0
    header = ("ID", "TASK", "KEY", "STATUS", "ATTEMPTS", "NEXT RUN (UTC)", "LAST ERROR")
    table = [
        [str(job.job_id), job.task, job.coalescing_key, job.status, f"{job.attempts}/{job.max_attempts}",
         utc(job.next_run_at) if job.status in ACTIVE else "-"]
        for job in page.jobs
    ]
    width = LAST_ERROR_WIDTH
    if out.isatty():  # the error gets what is left of the terminal's width
        used = sum(max(len(cell) for cell in column) + 2 for column in zip(header[:-1], *table, strict=True))
        width = max(MIN_LAST_ERROR_WIDTH, shutil.get_terminal_size().columns - used)
    for row, job in zip(table, page.jobs, strict=True):
        row.append(one_line(job.last_error, width))
    print_table(out, header, table, right_aligned={0, 4})
    shown = f"{len(page.jobs)} job{plural_s(len(page.jobs))}, newest first"
    if page.next_before_id is not None:
        shown += f"; older ones: add --before-id {page.next_before_id}"
    out.write(f"\n{shown}\n")
    return 0


# -- job -------------------------------------------------------------------------------------


def job(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    """One job and every attempt it made (outbox_attempt), each with its own error."""
    with conn.transaction():
        found = admin_views.job(conn, args.job_id)
        if found is None:
            raise CommandFailed(f"job {args.job_id} does not exist")
        attempts = attempts_of_job(conn, args.job_id)
    if args.json:
        json.dump({**asdict(found), "attempts_history": [asdict(a) for a in attempts]}, out, indent=2,
                  default=json_default)
        out.write("\n")
        return 0
    out.write(f"job {found.job_id}  {found.task}  key {found.coalescing_key}\n"
              f"status {found.status}, attempt {found.attempts} of {found.max_attempts}"
              f"{f', requeued {found.requeue_count}x' if found.requeue_count else ''}; "
              f"celery task id {found.celery_task_id}\n")
    if found.last_error:
        out.write(f"last error: {found.last_error}\n")
    if not attempts:
        out.write("\nno attempt yet\n")
        return 0
    out.write("\n")
    header = ("RUN", "ATTEMPT", "OUTCOME", "STARTED (UTC)", "FINISHED (UTC)", "WORKER", "ERROR")
    table = [[str(a.run), str(a.attempt), a.outcome or "running", utc(a.started_at),
              utc(a.finished_at) if a.finished_at else "-", a.worker or "-", one_line(a.error, LAST_ERROR_WIDTH)]
             for a in attempts]
    print_table(out, header, table, right_aligned={0, 1})
    return 0


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
    if args.all and not args.yes and not _confirmed(
        f"Requeue {len(candidates)} dead job{plural_s(len(candidates))} ({_ids(candidates)})? [y/N] ", out
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


def _confirmed(question: str, out: TextIO) -> bool:
    out.write(question)
    out.flush()
    answer = sys.stdin.readline()
    if not sys.stdin.isatty() or not answer.endswith("\n"):
        out.write("\n")  # the terminal did not echo an answer and its newline
    return answer.strip().lower() in {"y", "yes"}


def _requeued_report(requeued: Sequence[Requeued], skipped: Sequence[tuple[int, str]]) -> str:
    lines = []
    if requeued:
        ids = _ids([r.job_id for r in requeued])
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


def drain(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    tty = out.isatty()
    started = time.monotonic()
    first = current = totals(queue_state(conn))
    last_line = float("-inf")
    on_screen = False  # an unfinished progress line on the terminal
    try:
        while current.active:
            elapsed = time.monotonic() - started
            if args.timeout is not None and elapsed >= args.timeout:
                raise CommandFailed(f"timed out after {args.timeout:g} s with {left(current)}")
            if tty:
                out.write("\r\x1b[2K" + progress(current, first, elapsed))
                out.flush()
                on_screen = True
            elif elapsed - last_line >= PROGRESS_LINE_EVERY_SECONDS:
                out.write(progress(current, first, elapsed) + "\n")
                out.flush()
                last_line = elapsed
            wait = args.interval if args.timeout is None else min(args.interval, max(0.0, args.timeout - elapsed))
            time.sleep(wait)
            current = totals(queue_state(conn))
    finally:
        if on_screen:
            out.write("\n")
            out.flush()
    out.write(f"drained in {time.monotonic() - started:.1f} s: nothing pending, published, running or retrying\n")
    if current.dead:
        out.write(f"{current.dead} dead job{plural_s(current.dead)} did not block the drain: "
                  "`recalq jobs --status dead` shows them\n")
    return 0


def progress(now: Totals, first: Totals, elapsed: float) -> str:
    remaining = ", ".join(f"{now.by_status.get(s, 0)} {s}" for s in ACTIVE if now.by_status.get(s, 0))
    rate = (first.active - now.active) / elapsed if elapsed > 0 else 0.0
    if rate > 0:
        trend = f"backlog shrinking {rate:.1f}/s, about {age(now.active / rate)} to go"
    elif rate < 0:
        trend = f"backlog growing {-rate:.1f}/s"
    else:
        trend = "backlog not shrinking yet"
    return f"{elapsed:5.0f} s  {now.active} left ({remaining}); {now.finished_last_1m / 60:.1f} finished/s; {trend}"


def left(t: Totals) -> str:
    parts = [f"{t.by_status.get(s, 0)} {s}" for s in ACTIVE if t.by_status.get(s, 0)]
    text = ", ".join(parts) + " left"
    if t.oldest_active_s is not None:
        text += f" (oldest {age(t.oldest_active_s)}"
        text += f", relay lag {age(t.relay_lag_s)})" if t.relay_lag_s is not None else ")"
    if t.dead:
        text += f"; {t.dead} dead"
    return text + "; `recalq status` and `recalq jobs` show them"


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:IDS_SHOWN])
    return shown + (f" and {len(ids) - IDS_SHOWN} more" if len(ids) > IDS_SHOWN else "")
