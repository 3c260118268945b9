"""The `recalq` command: run the system and its parts.

    recalq up         everything in the foreground: API, relay, workers, beat, Flower, provider simulator
                      (embedded PostgreSQL + Redis when DATABASE_URL / BROKER_URL are not set)
    recalq demo       `up` plus sample data and live score updates
    recalq migrate    apply database migrations
    recalq relay      run one outbox relay
    recalq worker     run a Celery worker (same as `celery -A recalq.celery_app worker -E`)
    recalq beat       run celery beat, the periodic maintenance tasks (exactly one)
    recalq flower     run Flower, the web monitor (needs RECALQ_FLOWER_BASIC_AUTH)
    recalq api        serve the HTTP API (uvicorn; /docs shows it)
    recalq new-key    print a fresh admin API key
    recalq simulator  serve simulated providers for property evaluations (the demo and tests use it)

Operating it (need only the database: DATABASE_URL, else the embedded one of the `recalq up`
running in RECALQ_DATA_DIR):
    recalq status     the queue per task and status, relay lag, throughput
    recalq jobs       jobs newest first, filtered by status, key or task
    recalq job ID     one job and every attempt it made, with each attempt's error
    recalq requeue    run DEAD jobs again once their cause is fixed (audited)
    recalq purge-dead delete DEAD jobs that will never run again (shows them and asks first)
    recalq cancel ID  stop a job of a kind that may be cancelled
    recalq drain      wait until nothing is pending, published, running or retrying

`recalq COMMAND --help` describes each one; docs/operations.md has the runbooks.
"""

from __future__ import annotations

import argparse
import functools
import logging
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from recalq.settings import Settings

if TYPE_CHECKING:
    from recalq.operator_purge import Age

log = logging.getLogger("recalq")

#: Ids are bigints; `recalq jobs` shows at most the admin API's page size at once.
MAX_ID = 2**63 - 1
MAX_JOBS = 200

#: How long the API lets requests in flight finish after SIGTERM; below the supervisor's grace.
API_GRACEFUL_SHUTDOWN_SECONDS = 10
NEW_KEY_HELP = """\
Prints a fresh admin API key (32 random bytes, URL-safe base64) and nothing else.

Give it to the API in RECALQ_ADMIN_API_KEYS; callers send it in the X-API-Key header. Several
keys, comma-separated, are all accepted at once, which is how a key is rotated without downtime:
add the new key next to the old one, move the callers, then remove the old one (the API reads
its keys when it starts).
`recalq up` makes one for itself in DATA_DIR/admin-api-key when RECALQ_ADMIN_API_KEYS is unset.

    export RECALQ_ADMIN_API_KEYS="$(recalq new-key)"
    export RECALQ_ADMIN_API_KEYS="$RECALQ_ADMIN_API_KEYS,$(recalq new-key)"   # rotation: old,new
"""

STATUS_HELP = """\
Prints the outbox_queue_state view: one row per task and job status with the jobs in it now
(done and superseded are history: -), the age of the oldest, the relay lag (pending only: how
long the oldest due job has waited for a relay), jobs finished in the last 1 and 5 minutes and
their rate; then one line over all tasks. Reads the database only (DATABASE_URL; without it,
the embedded database of the `recalq up` running in RECALQ_DATA_DIR, named on stderr).

Exit status: 0, or 2 when the database cannot be reached.

examples:
  recalq status
  recalq status --json | jq '.[] | select(.status == "dead") | .jobs'
  watch -n 5 recalq status
"""
JOBS_HELP = """\
Lists jobs newest first: id, task, coalescing key, status, attempts/max, when it runs next
(pending, published, running and retrying jobs) and its last error, cut to fit; --json gives
every column in full. Reads the database only (DATABASE_URL, or a running `recalq up`'s).

examples:
  recalq jobs --status dead                 # what failed, and why
  recalq jobs --key property:42             # one property's recent jobs
  recalq jobs --status retrying --limit 200
  recalq jobs --status dead --json | jq -r '.[].last_error'
"""
JOB_HELP = """\
Shows one job (task, key, status, attempts, Celery task id, last error) and every attempt it
made, in every run (a requeue starts the next run): outcome (succeeded, failed, lost when its
worker died or its lease ran out), when, on which worker, and its error. --json gives it all
unabridged. Reads the database only (DATABASE_URL, or a running `recalq up`'s).

examples:
  recalq job 1234
  recalq job 1234 --json | jq -r '.attempts_history[].error'
"""
REQUEUE_HELP = """\
Gives DEAD jobs a fresh set of attempts (RECALQ_MAX_ATTEMPTS), after their cause is fixed: one
job, every dead job of a coalescing key, or every dead job (--all asks first unless --yes).
If the key already has a job waiting, that job covers the dead one's requests and the dead one
becomes superseded. Each requeue writes a JOB_REQUEUED audit row with actor system
"cli:<your user>"; the admin API's POST /api/admin/jobs/{id}/requeue does the same.

Exit status: 0 when requeued (or nothing dead for --key/--all); 1 when the job does not exist
or is not dead (the message names its status) or --all was not confirmed; 2 when the database
cannot be reached.

examples:
  recalq jobs --status dead                 # find the cause first
  recalq requeue 1234
  recalq requeue --key property:42
  recalq requeue --all --yes
"""
PURGE_DEAD_HELP = """\
Deletes DEAD jobs for good, with the superseded jobs they covered and all their requests: for
jobs that will never run again (their property is gone, their payload can never be valid).
Choose them by id, by coalescing key, by age (--older-than: how long ago they died), or --all;
filters given together must all match. It first prints the jobs it chose and what goes with
them, then asks (--yes skips the question; --dry-run stops after the list). A job requeued in
the meantime is left alone. Purging writes no audit row, and cannot be undone; requeue a job
instead if its cause can be fixed.

Exit status: 0 when purged (or nothing matched, or --dry-run); 1 when a named job does not
exist or is not dead, or the question was not answered yes; 2 when the database cannot be
reached or the selection is missing.

examples:
  recalq purge-dead --older-than 30d --dry-run
  recalq purge-dead --older-than 30d
  recalq purge-dead 1234 1240
  recalq purge-dead --key property:42 --yes
"""
CANCEL_HELP = """\
Stops a job whose kind's policy allows cancelling (outbox_task.cancellable, e.g. a property
evaluation): one waiting to run (pending, published, retrying) is cancelled at once; a running
one is asked to stop and stops at its next unit (a stage), which `recalq job ID` then shows. The
recalculation cannot be cancelled: it carries the requests of every change coalesced into it.
The API's POST /api/jobs/{id}/cancel is the same transition.

Exit status: 0 when cancelled, asked to stop, or already cancelled; 1 when the job does not
exist, already ended otherwise, or its kind cannot be cancelled; 2 when the database cannot be
reached.

examples:
  recalq jobs --task evaluation.evaluate_property --status running
  recalq cancel 1234
"""
DRAIN_HELP = """\
Waits until no job is pending, published, running or retrying, showing what is left, how many
jobs finished in the last 10 s and how fast the backlog shrank over them, and about how long it
will take (on one line in a terminal, else a line every few seconds). DEAD jobs do not hold it
up; they are reported at the end. Use it before stopping workers for maintenance, or after a
backlog, to know when the system has caught up. Needs workers and a relay to be running
somewhere, or nothing will move.

Exit status: 0 when drained; 1 when --timeout passed first (the message says what is left);
2 when the database cannot be reached.

examples:
  recalq drain
  recalq drain --timeout 600 && systemctl stop recalq-worker
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.without_settings:  # new-key must work even when the environment holds a bad key
        return args.run(None, args)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"recalq: invalid settings: {settings_problems(exc)}", file=sys.stderr)
        return 2
    try:
        return args.run(settings, args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recalq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(without_settings=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate", help="apply database migrations",
        description="Applies the database migrations up to REVISION (default: head), then applies the "
        "settings to the recalculation task's policy (RECALQ_MAX_ATTEMPTS, RECALQ_JOB_LEASE_SECONDS, "
        "RECALQ_TASK_TIME_LIMIT, RECALQ_TASK_SOFT_TIME_LIMIT, RECALQ_RECALC_MIN_INTERVAL_SECONDS). Safe to run "
        "again; run it once per deploy, before the new processes start. Needs DATABASE_URL.",
    )
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(run=_migrate)

    relay = commands.add_parser(
        "relay", help="run one outbox relay until SIGINT/SIGTERM",
        description="Publishes committed outbox jobs to the broker and re-sends lost ones (rescue). "
        "Several relays at once are safe: each claims its rows with FOR UPDATE SKIP LOCKED. Needs "
        "DATABASE_URL and BROKER_URL.",
    )
    relay.set_defaults(run=_relay)

    worker = commands.add_parser(
        "worker", help="run a Celery worker",
        description="Runs a Celery worker on RECALQ_QUEUE (or the --queue given) with RECALQ_WORKER_CONCURRENCY "
        "processes and task events on (the same as `celery -A recalq.celery_app worker -E`). A job kind with a "
        "queue of its own (outbox_task.queue) needs workers on that queue: `recalq worker --queue NAME`. "
        "Arguments after `--` go to `celery worker`, e.g. `recalq worker -- -n w1@%h`. Needs DATABASE_URL and "
        "BROKER_URL.",
    )
    worker.add_argument("--queue", action="append", dest="queues", metavar="NAME",
                        help="consume this queue instead of RECALQ_QUEUE (repeat for several)")
    worker.add_argument("extra", nargs=argparse.REMAINDER, help="extra `celery worker` arguments")
    worker.set_defaults(run=_worker)

    api = commands.add_parser(
        "api", help="serve the HTTP API until SIGINT/SIGTERM",
        description="Serves the HTTP API with uvicorn on RECALQ_API_HOST:RECALQ_API_PORT (default "
        "127.0.0.1:8000); the interactive documentation is at /docs. Needs DATABASE_URL; the relay and "
        "the workers run separately. Admin endpoints take the keys in RECALQ_ADMIN_API_KEYS.",
    )
    api.set_defaults(run=_api)

    new_key = commands.add_parser("new-key", help="print a fresh admin API key (for RECALQ_ADMIN_API_KEYS)",
                                  description=NEW_KEY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    new_key.set_defaults(run=_new_key, without_settings=True)

    simulator = commands.add_parser(
        "simulator", help="serve the provider simulator until SIGINT/SIGTERM",
        description="Serves the provider simulator: a stand-in for the external providers a property evaluation "
        "calls, one per stage (GET /lookup/STAGE?address=...), with deterministic answers, a latency and failures "
        "a test scripts through /_control/script. Prints `provider simulator listening on http://HOST:PORT` once "
        "it listens (the chosen port for --port 0). Needs no database; recalq/provider_simulator.py has the "
        "endpoints.",
    )
    simulator.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    simulator.add_argument("--port", type=_bounded_int(0, 65535), default=8099,
                           help="port to listen on; 0 picks a free one (default 8099)")
    simulator.add_argument("--latency", type=_seconds, default=0.05, metavar="SECONDS",
                           help="how long each lookup takes unless its stage is scripted otherwise (default 0.05)")
    simulator.set_defaults(run=_simulator, without_settings=True)

    _add_operator_commands(commands)

    from recalq import supervisor

    supervisor.add_commands(commands)
    return parser


def _add_operator_commands(commands: argparse._SubParsersAction) -> None:
    from outbox import JobStatus

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=functools.partial(_operator, name))
        return sub

    status = command("status", "the queue as a table: jobs per task and status, relay lag, throughput", STATUS_HELP)
    status.add_argument("--json", action="store_true", help="print the view's rows as JSON instead")

    jobs = command("jobs", "list jobs newest first, by status, key or task", JOBS_HELP)
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only jobs in this status")
    jobs.add_argument("--key", type=_key, metavar="KEY", help="only this coalescing key, e.g. property:42")
    jobs.add_argument("--task", type=_key, metavar="TASK", help="only this task, e.g. compliance.recalculate_property")
    jobs.add_argument("--limit", type=_bounded_int(1, MAX_JOBS), default=50, metavar="N",
                      help=f"show at most N jobs (1-{MAX_JOBS}, default 50)")
    jobs.add_argument("--before-id", type=_bounded_int(1, MAX_ID), metavar="ID",
                      help="only jobs older than this id (the next page)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as JSON, with every column")

    job = command("job", "one job and every attempt it made, with each attempt's error", JOB_HELP)
    job.add_argument("job_id", type=_bounded_int(1, MAX_ID), metavar="JOB_ID", help="the job's id")
    job.add_argument("--json", action="store_true", help="print the job and its attempts as JSON")

    requeue = command("requeue", "run DEAD jobs again: one, all of a key, or all", REQUEUE_HELP)
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?", type=_bounded_int(1, MAX_ID), metavar="JOB_ID", help="one dead job")
    which.add_argument("--key", type=_key, metavar="KEY", help="every dead job of this coalescing key")
    which.add_argument("--all", action="store_true", help="every dead job (asks first)")
    requeue.add_argument("--yes", action="store_true", help="do not ask before requeueing --all")

    purge = command("purge-dead", "delete DEAD jobs for good: by id, key, age or all (shows them, asks first)",
                    PURGE_DEAD_HELP)
    purge.add_argument("job_ids", nargs="*", type=_bounded_int(1, MAX_ID), metavar="JOB_ID",
                       help="these dead jobs (each must be dead)")
    purge.add_argument("--key", type=_key, metavar="KEY", help="only dead jobs of this coalescing key")
    purge.add_argument("--older-than", type=_age, metavar="AGE",
                       help="only jobs that died more than AGE ago: 90s, 30m, 12h, 7d or 2w")
    purge.add_argument("--all", action="store_true", help="every dead job")
    purge.add_argument("--dry-run", action="store_true", help="show what would be purged, and stop")
    purge.add_argument("--yes", action="store_true", help="do not ask before purging")

    cancel = command("cancel", "stop a job whose kind may be cancelled: now, or at its next unit", CANCEL_HELP)
    cancel.add_argument("job_id", type=_bounded_int(1, MAX_ID), metavar="JOB_ID", help="the job's id")

    drain = command("drain", "wait until no job is pending, published, running or retrying", DRAIN_HELP)
    drain.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                       help="give up after this long and exit 1 (default: wait as long as it takes)")
    drain.add_argument("--interval", type=_positive_float, default=1.0, metavar="SECONDS",
                       help="how often to look at the queue (default 1)")


def _operator(name: str, settings: Settings, args: argparse.Namespace) -> int:
    from recalq import operator, operator_drain, operator_purge, operator_repair

    commands: dict[str, operator.Command] = {
        "status": operator.status, "jobs": operator.jobs, "job": operator.job, "requeue": operator_repair.requeue,
        "purge-dead": operator_purge.purge_dead, "cancel": operator_repair.cancel, "drain": operator_drain.drain,
    }
    check = operator_purge.check if name == "purge-dead" else None
    return operator.run(name, commands[name], settings, args, check)


def _age(text: str) -> Age:
    from recalq.operator_purge import parse_age

    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range; use {low} to {high}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use 0 to 600 seconds")
    return value


def _key(text: str) -> str:
    if not text or len(text) > 200 or "\x00" in text:
        raise argparse.ArgumentTypeError("must be 1 to 200 characters without NUL")
    return text


def settings_problems(exc: ValidationError) -> str:
    """Pydantic's report as sentences that name the environment variable to fix."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            name = str(error["loc"][0]).upper().removeprefix("RECALQ_")
            variable = f"{name} (or RECALQ_{name})" if name in _ALIASED else f"RECALQ_{name}"
            problems.append(f"{variable}: {message[:1].lower()}{message[1:]}")
        else:
            problems.append(message)
    return "; ".join(problems) + "."


#: Settings read from an unprefixed variable too.
_ALIASED = {"DATABASE_URL", "BROKER_URL"}


def _require_services(settings: Settings, what: str) -> None:
    if settings.embedded:
        raise SystemExit(
            f"recalq {what}: DATABASE_URL and BROKER_URL must be set "
            "(or use `recalq up`, which starts embedded services)"
        )


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_url is None:
        raise SystemExit("recalq migrate: DATABASE_URL is not set")
    from recalq import migrate

    migrate.upgrade(settings, args.revision)
    log.info("database migrated to %s", args.revision)
    return 0


def _relay(settings: Settings, args: argparse.Namespace) -> int:
    _require_services(settings, "relay")
    from recalq.bootstrap import Runtime

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("relay starting (batch %s, poll %.1fs)", settings.relay_batch_size, settings.relay_poll_seconds)
    Runtime(settings).relay().run(stop)
    log.info("relay stopped")
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    _require_services(settings, "worker")
    from recalq.bootstrap import runtime

    app = runtime().celery_app
    extra = [a for a in args.extra if a != "--"]
    queues = ",".join(args.queues or [settings.queue])
    app.worker_main(["worker", "-E", "-Q", queues, "--loglevel", args.log_level, *extra])
    return 0


def _api(settings: Settings, args: argparse.Namespace) -> int:
    if settings.database_url is None:
        raise SystemExit(
            "recalq api: DATABASE_URL is not set (or use `recalq up`, which starts embedded services and the API)"
        )
    import uvicorn

    from api.app import create_app

    if not settings.admin_api_keys:
        log.warning("no admin API key is configured (RECALQ_ADMIN_API_KEYS): admin endpoints answer 503; "
                    "make one with `recalq new-key`")
    log.info("documents are stored in %s", settings.document_dir.absolute())
    uvicorn.run(
        # The factory gets this process's one settings object instead of reading the environment again.
        functools.partial(create_app, settings),
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # uvicorn's loggers go through the root handler, like the relay's and worker's lines
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=API_GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


def _new_key(_settings: None, _args: argparse.Namespace) -> int:
    print(secrets.token_urlsafe(32))
    return 0


def _simulator(_settings: None, args: argparse.Namespace) -> int:
    from recalq.provider_simulator import serve_simulator

    try:
        stopped_by = serve_simulator(args.host, args.port, args.latency)
    except KeyboardInterrupt:  # main() does not catch it for a command without settings
        return 130
    return 128 + stopped_by if stopped_by else 0  # 130 after Ctrl-C, 143 after SIGTERM
