"""The operator's commands, run as `recalq status`, `jobs`, `job`, `requeue`, `purge-dead`,
`cancel` and `drain`; this module runs each one and holds the read-only ones (status, jobs, job).
The verbs that change jobs are in recalq.operator_repair (requeue, cancel) and
recalq.operator_purge (purge-dead), drain in recalq.operator_drain.

They read and repair the queue through the same service functions as the admin API
(services.admin_views, outbox.lifecycle, outbox.watched, outbox.prune, services.audit), so a CLI
requeue and an API requeue are the same transition with the same audit row; only the actor
differs (system, "cli:<os user>"). They need only the database: the broker is not touched. With
no DATABASE_URL they use the embedded database of the `recalq up` running in RECALQ_DATA_DIR
(recalq.operator_instance) and say so on stderr.

Every failure ends with one sentence on stderr and an exit status, never a traceback:
0 done, 1 the operation could not do what was asked (a job that is not dead, a drain that timed
out, a refused confirmation), 2 the command cannot run (settings, no database, an unreachable or
unmigrated one, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TextIO

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox import JobStatus
from outbox.history import attempts_of_job
from recalq import operator_instance
from recalq.console_format import age, count, json_default, one_line, plural_s, print_table, utc
from recalq.settings import Settings
from services import admin_views

#: Statuses that keep `drain` waiting: the job will still run.
ACTIVE = (JobStatus.PENDING, JobStatus.PUBLISHED, JobStatus.RUNNING, JobStatus.RETRYING)
CONNECT_TIMEOUT_SECONDS = 10
#: `jobs` shows at most this many rows at once (the admin API's page size).
MAX_LIMIT = admin_views.MAX_PAGE_SIZE
#: How much of a job's last error `jobs` shows: in a terminal, what fits; else this much.
LAST_ERROR_WIDTH = 100
MIN_LAST_ERROR_WIDTH = 30


class CommandFailed(Exception):
    """Ends a command with `message` on stderr and `exit_code`; never shown as a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


Command = Callable[[psycopg.Connection, argparse.Namespace, TextIO], int]


def run(name: str, command: Command, settings: Settings, args: argparse.Namespace,
        check: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Runs one operator command against the database, turning every expected failure into a
    sentence and an exit status. `check` refuses arguments before any database is looked for."""
    out = sys.stdout
    try:
        if check is not None:
            check(args)
        conninfo, unmigrated = _conninfo(name, settings)
        with _database(conninfo, name, unmigrated) as conn:
            return command(conn, args, out)
    except CommandFailed as exc:
        print(f"recalq {name}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`recalq jobs --json | head`): as the Python docs advise, point
        # stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _conninfo(name: str, settings: Settings) -> tuple[str, str]:
    """How to reach the database (DATABASE_URL, else the embedded one of a running `recalq up`,
    named on stderr) and what to say if it has no recalq schema."""
    if settings.database_url is None:
        try:
            up = operator_instance.find(settings.data_dir)
        except operator_instance.NoRunningUp as exc:
            raise CommandFailed(f"DATABASE_URL is not set; {exc}", 2) from None
        print(f"recalq {name}: using the embedded database of {up.describe()}", file=sys.stderr, flush=True)
        return up.conninfo, f"; {up.describe()} migrates it as it starts: try again in a few seconds"
    try:
        return settings.conninfo, "; run `recalq migrate` first"
    except ValueError as exc:  # a URL of another database, e.g. mysql://
        raise CommandFailed(str(exc).replace("database_url", "DATABASE_URL"), 2) from None


@contextmanager
def _database(conninfo: str, name: str, unmigrated: str) -> Iterator[psycopg.Connection]:
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
        raise CommandFailed(f"the database {where} has no recalq schema{unmigrated}", 2) from None
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
