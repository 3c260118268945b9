"""`recalq beat`: the periodic-task scheduler (celery beat) for the entries in celery_config.

Beat only sends messages; workers run the tasks. Its clock is UTC (celery_config sets
`timezone` and `enable_utc`), and it keeps each entry's last run in DATA_DIR/celerybeat-schedule,
so a restarted beat knows what already ran and sends an entry that fell due while it was down
once, not once per missed slot. One beat per deployment: a second one sends every entry again
(the entries are idempotent, so that costs work, not correctness).
"""

from __future__ import annotations

import argparse

from recalq.settings import Settings

#: Beat's schedule state (a shelve file), under the data dir.
SCHEDULE_FILE = "celerybeat-schedule"
HELP = """\
Runs celery beat (the same as `celery -A recalq.celery_app beat`) with its schedule state in
DATA_DIR/celerybeat-schedule. Needs BROKER_URL. Run exactly one per deployment. Other
`celery beat` options go after `--`, e.g. `recalq beat -- --max-interval 60`.
"""


def add_command(commands: argparse._SubParsersAction) -> None:
    beat = commands.add_parser("beat", help="run the periodic-task scheduler (celery beat, UTC)",
                               description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    beat.add_argument("extra", nargs=argparse.REMAINDER, help="extra `celery beat` options, after --")
    beat.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace) -> int:
    if settings.broker_url is None:
        raise SystemExit("recalq beat: BROKER_URL is not set (or use `recalq up`, which starts embedded services "
                         "and beat)")
    from recalq.bootstrap import runtime
    from recalq.embedded import EmbeddedError, prepare_data_dir

    try:
        data_dir = prepare_data_dir(settings.data_dir)
    except EmbeddedError as exc:
        raise SystemExit(f"recalq beat: {exc}") from None
    extra = [a for a in args.extra if a != "--"]
    argv = ["beat", "--schedule", str(data_dir / SCHEDULE_FILE), "--loglevel", args.log_level, *extra]
    return runtime().celery_app.start(argv) or 0
