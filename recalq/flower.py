"""`recalq flower`: Flower, Celery's web monitor, watching this system's workers and tasks.

Workers send events (-E, task_send_sent_event) and the relay publishes each job under the
`celery_task_id` fixed when the job was inserted, so a task in Flower and a job in Postgres
carry the same id. Flower shows what the workers reported; Postgres stays the truth about a job.

Flower can also act on workers (shut them down, resize pools, revoke tasks), so it never runs
without authentication: the command refuses to start unless RECALQ_FLOWER_BASIC_AUTH
("user:password") is set, and it binds to RECALQ_FLOWER_HOST (127.0.0.1 unless told otherwise).
`recalq up` makes a password for it in DATA_DIR/flower-password. What Flower has seen is kept
in DATA_DIR/flower-state (saved every minute and on a clean exit), so a restart keeps the task
history.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from recalq.settings import Settings

#: Flower's saved state (a shelve file), under the data dir.
STATE_FILE = "flower-state"
STATE_SAVE_INTERVAL_MS = 60_000
#: Tasks Flower keeps in memory and in its state file; Flower's default (100 000) makes the
#: minutely save slow, and the full history is in Postgres anyway.
MAX_TASKS = 10_000
#: The line Flower logs once its HTTP server listens; it names the bound address.
LISTENING = re.compile(r"Visit me at (\S+)")
NO_AUTH = (
    "recalq flower: refusing to start Flower without authentication (it can shut workers down and "
    "revoke tasks): set RECALQ_FLOWER_BASIC_AUTH to user:password, or use `recalq up`, which makes a "
    "password in DATA_DIR/flower-password."
)
#: Flower options recalq sets from its settings; passing them as extra arguments is refused.
_FROM_SETTINGS = {
    "address": "RECALQ_FLOWER_HOST",
    "port": "RECALQ_FLOWER_PORT",
    "unix_socket": "RECALQ_FLOWER_HOST and RECALQ_FLOWER_PORT",
    "basic_auth": "RECALQ_FLOWER_BASIC_AUTH",
    "persistent": "RECALQ_DATA_DIR",
    "db": "RECALQ_DATA_DIR",
}
HELP = """\
Runs Flower (the same as `celery -A recalq.celery_app flower`) on RECALQ_FLOWER_HOST:RECALQ_FLOWER_PORT
(default 127.0.0.1:5555), behind HTTP basic auth from RECALQ_FLOWER_BASIC_AUTH ("user:password";
without it Flower does not start). Needs BROKER_URL, not the database. Its state is kept in
DATA_DIR/flower-state. Other Flower options go after `--`, e.g.

    recalq flower -- --url_prefix=flower --purge_offline_workers=3600

Its HTTP API is at /api/workers and /api/tasks; /metrics (Flower's own Prometheus metrics) and
/healthcheck answer without authentication.
"""


@dataclass(frozen=True)
class FlowerConfig:
    host: str
    port: int
    #: "user:password", or None when none is configured.
    basic_auth: str | None


def flower_config(settings: Settings) -> FlowerConfig:
    # getattr: these settings may not exist in an older Settings; absent means "not configured".
    secret = getattr(settings, "flower_basic_auth", None)
    auth = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    return FlowerConfig(
        host=getattr(settings, "flower_host", "127.0.0.1"),
        port=getattr(settings, "flower_port", 5555),
        basic_auth=auth or None,
    )


def flower_argv(config: FlowerConfig, data_dir: Path, log_level: str, extra: list[str]) -> list[str]:
    """The `celery flower` arguments. Refuses, with the setting to use instead, an extra argument
    that would override what the settings decide (address, port, authentication, state)."""
    if config.basic_auth is None:
        raise SystemExit(NO_AUTH)
    for arg in extra:
        name = arg.lstrip("-").partition("=")[0].replace("-", "_")
        if name in _FROM_SETTINGS:
            raise SystemExit(f"recalq flower: {arg.partition('=')[0]} comes from the settings; "
                             f"set {_FROM_SETTINGS[name]} instead.")
    return [
        "flower",
        *extra,
        f"--address={config.host}",
        f"--port={config.port}",
        # Flower splits this option at commas; the settings refuse a credential that has one.
        f"--basic_auth={config.basic_auth}",
        "--persistent=True",
        f"--db={data_dir / STATE_FILE}",
        f"--state_save_interval={STATE_SAVE_INTERVAL_MS}",
        f"--max_tasks={MAX_TASKS}",
        f"--logging={log_level.lower()}",
    ]


def add_command(commands: argparse._SubParsersAction) -> None:
    flower = commands.add_parser(
        "flower", help="run Flower, the web monitor of workers and tasks (needs RECALQ_FLOWER_BASIC_AUTH)",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flower.add_argument("extra", nargs=argparse.REMAINDER, help="extra Flower options, after --")
    flower.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if settings.broker_url is None:
        raise SystemExit("recalq flower: BROKER_URL is not set (or use `recalq up`, which starts embedded "
                         "services and Flower)")
    config = flower_config(settings)
    if config.basic_auth is None:
        raise SystemExit(NO_AUTH)
    from recalq.bootstrap import runtime
    from recalq.embedded import EmbeddedError, prepare_data_dir

    try:
        data_dir = prepare_data_dir(settings.data_dir)
    except EmbeddedError as exc:
        raise SystemExit(f"recalq flower: {exc}") from None
    argv = flower_argv(config, data_dir, args.log_level, [a for a in args.extra if a != "--"])
    # "Inspect method … failed" at WARNING means no worker answered Flower's inspect in time,
    # which is every start-up (the workers start beside it); a real failure is logged as an error.
    logging.getLogger("flower.inspector").setLevel(logging.ERROR)
    return runtime().celery_app.start(argv) or 0
