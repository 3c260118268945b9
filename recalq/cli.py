"""The `recalq` command: run the system and its parts.

    recalq up         everything in the foreground (embedded PostgreSQL + Redis when
                      DATABASE_URL / BROKER_URL are not set)
    recalq demo       `up` plus sample data and live score updates
    recalq migrate    apply database migrations
    recalq relay      run one outbox relay
    recalq worker     run a Celery worker (same as `celery -A tasks worker -E`)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from pydantic import ValidationError

from recalq.settings import Settings

log = logging.getLogger("recalq")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"recalq: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        return args.run(settings, args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recalq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(run=_migrate)

    relay = commands.add_parser("relay", help="run one outbox relay until SIGINT/SIGTERM")
    relay.set_defaults(run=_relay)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("extra", nargs=argparse.REMAINDER, help="extra `celery worker` arguments")
    worker.set_defaults(run=_worker)

    from recalq import supervisor

    supervisor.add_commands(commands)
    return parser


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
    app.worker_main(["worker", "-E", "-Q", settings.queue, "--loglevel", args.log_level, *extra])
    return 0
