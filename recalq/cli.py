"""The `recalq` command: run the system and its parts.

    recalq up         everything in the foreground: relay, worker and HTTP API (embedded
                      PostgreSQL + Redis when DATABASE_URL / BROKER_URL are not set)
    recalq demo       `up` plus sample data and live score updates
    recalq migrate    apply database migrations
    recalq relay      run one outbox relay
    recalq worker     run a Celery worker (same as `celery -A tasks worker -E`)
    recalq api        serve the HTTP API (uvicorn; /docs shows it)
    recalq new-key    print a fresh admin API key
"""

from __future__ import annotations

import argparse
import functools
import logging
import secrets
import signal
import sys
import threading
from collections.abc import Sequence

from pydantic import ValidationError

from recalq.settings import Settings

log = logging.getLogger("recalq")

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.without_settings:  # new-key must work even when the environment holds a bad key
        return args.run(None, args)
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
    parser.set_defaults(without_settings=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(run=_migrate)

    relay = commands.add_parser("relay", help="run one outbox relay until SIGINT/SIGTERM")
    relay.set_defaults(run=_relay)

    worker = commands.add_parser("worker", help="run a Celery worker")
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
