"""API under load: recalq's real HTTP API process at 10 to 500 concurrent connections, beside a
bare FastAPI endpoint served with the same server settings, in the same run.

    .venv/bin/python bench/api_load.py [--levels 10,50,200,500] [--seconds 10] [--quick]
                                       [--project-dir DIR] [--greedy-connections 64] [--help]

The API runs as production runs it, `recalq --log-level INFO api` (uvicorn, one process, the
factory given the process's settings, uvicorn's loggers through the root handler, 10 s graceful
shutdown), on a free loopback port, against a private database made by `recalq migrate`, with
every RECALQ_* setting at its default (a RECALQ_* variable of the calling shell is dropped).
No relay or worker runs: mutations only enqueue. Data is provisioned through the admin API
(X-API-Key): --tenants clients, each with its token and --properties properties of
--documents documents (uploaded through the client API), plus a greedy tenant A (with one large
text document) and a steady tenant B.

Mixed traffic: at each level, that many connections are opened first (one asyncio task and one
keep-alive HTTP/1.1 connection each, in this process; connection i speaks for tenant
i % --tenants), then each sends requests back to back for --seconds after a warm-up: 75 %
GET /api/properties/{id}, 10 % GET /api/properties, 10 % GET .../documents, 5 % a small text
upload (POST .../documents, multipart, requirement_code gas_safety). A 429 or 503 with
Retry-After is honoured (the connection sleeps that long; --ignore-retry-after: it does not).
Per level: 2xx answers per second, latency p50/p99 of the 2xx answers, p99 of every request
(refusals and errors at their elapsed time), each status, errors (timeouts after --timeout s,
resets; requests in flight at the end are waited for and counted, not in the rate), /healthz
sampled every 50 ms on its own connection by a separate process (so a busy load generator does
not inflate it), and the CPU of the load generator, the API process and the database's backends
(% of one core).

Baseline: `GET /baseline/properties/{id}`, one indexed SELECT on `properties` through a
psycopg_pool of the size the API's own pool has (the project's create_app decides it), in a sync
route as recalq's are, served by uvicorn with the same uvicorn.run arguments and log level:
`python bench/api_load.py --serve-baseline`. Each level runs on recalq, then on the baseline.

Greedy tenant: tenant B reads its properties at a steady --victim-rate (requests/s over 4
connections, from a separate process; a late answer skips the ticks it missed, so B's achieved
rate is shown too) alone, then while tenant A hammers on --greedy-connections connections (80 %
GET .../ai-suggestion of a --heavy-mib MiB text, 20 % small uploads), once retrying refusals at
once and once after their Retry-After (--greedy-modes). Reported: B's p50/p99 in each phase,
A's statuses and refusals without Retry-After.

Targets (informational; the exit status is 0): no 5xx and no errors at any level (a fast 503 or
429 is fine: "fast" is p99 <= 3 s); 2xx/s at 200 and 500 connections >= 80 % of the best
level's; 2xx p99 at 200 <= 2x the bare endpoint's; /healthz <= 100 ms throughout (max over
every level and phase); B's p99 beside A <= 2x its p99 alone. Notes after the tables say
which process was CPU-bound (the load generator is one process: on 2 cores it competes).

--project-dir DIR runs the API (and `recalq migrate`) of another checkout: cwd=DIR, with
DIR/.venv/bin/python if it exists, else this interpreter with PYTHONPATH=DIR; for a "before"
table: `git worktree add /tmp/before REV` then `--project-dir /tmp/before`. Writes
bench/results/api_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BROKERS,
    PG_ADMIN_URL,
    ROOT,
    CpuMeter,
    log,
    percentile,
    print_table,
    recalq_env,
    unique_queue,
    wait_until,
    with_database,
    write_result,
)
from bench.report import row

NAME = "api_load"
TITLE = "HTTP API under load: recalq's API process beside a bare FastAPI endpoint"
DEFAULT_LEVELS = (10, 50, 200, 500)
QUICK_LEVELS = (10, 200)
#: The log level `recalq api` runs at unless told otherwise (recalq --log-level's default).
DEFAULT_LOG_LEVEL = "INFO"
#: recalq.cli.API_GRACEFUL_SHUTDOWN_SECONDS; the baseline is served with the same.
GRACEFUL_SHUTDOWN_SECONDS = 10
#: The log format of `recalq` (logging.basicConfig in recalq/cli.py); the baseline logs alike.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: uvicorn closes a keep-alive connection idle for 5 s: reconnect before reusing one idle this long.
IDLE_RECONNECT_SECONDS = 4.0
HEALTHZ_INTERVAL = 0.05
FAST_REFUSAL_S = 3.0

TARGET_THROUGHPUT_SHARE = 0.8
TARGET_P99_VS_BARE = 2.0
TARGET_HEALTHZ_MS = 100.0
TARGET_VICTIM_P99_RATIO = 2.0

MIX = (("get", 0.75), ("list", 0.10), ("documents", 0.10), ("upload", 0.05))
ADMIN_KEY = "bench-admin-key-" + "k" * 24


# -- a minimal HTTP/1.1 client ------------------------------------------------------------------
# Plain asyncio streams: one keep-alive connection per task, so 500 connections are 500 sockets
# of this process, and a request costs a write and a read, not a client library's pool.

def http_request(method: str, path: str, port: int, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def multipart(fields: dict[str, str], file_name: str, content: bytes,
              content_type: str = "text/plain") -> tuple[str, bytes]:
    boundary = "bench" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                 f"Content-Type: {content_type}\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


class HttpConn:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self.last_used = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None or time.perf_counter() - self.last_used > IDLE_RECONNECT_SECONDS:
            self.close()
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        if len(data) > 1 << 16:
            await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(b":")
                headers[key.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            body = b"".join(chunks)
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            body = await self.reader.read()
            headers[b"connection"] = b"close"
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        self.last_used = time.perf_counter()
        return status, headers, body


async def call(conn: HttpConn, data: bytes, timeout: float) -> tuple[int | str, dict[bytes, bytes], bytes]:
    """One request; an error is a string outcome (timeout, refused, closed, reset) and closes the
    connection (the next request opens a new one)."""
    try:
        async with asyncio.timeout(timeout):
            return await conn.request(data)
    except TimeoutError:
        outcome = "timeout"
    except ConnectionRefusedError:
        outcome = "refused"
    except asyncio.IncompleteReadError:
        outcome = "closed"
    except (ConnectionError, OSError):
        outcome = "reset"
    except Exception as exc:  # a malformed answer
        outcome = f"error:{type(exc).__name__}"
    conn.close()
    return outcome, {}, b""


# -- tallies ------------------------------------------------------------------------------------

def status_class(outcome: int | str) -> str:
    if isinstance(outcome, str):
        return "err"
    if outcome in (200, 201, 429, 503):
        return str(outcome)
    if outcome >= 500:
        return "5xx"
    return "other"


def latency_summary(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(samples), "p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000,
            "max_ms": max(samples) * 1000}


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, list[tuple[float, int | str]]] = field(default_factory=dict)
    ok_in_window: int = 0
    answers_in_window: int = 0
    refusals_without_retry_after: int = 0

    def add(self, kind: str, outcome: int | str, latency: float, in_window: bool, retry_after: bool) -> None:
        self.statuses[str(outcome)] += 1
        self.classes[status_class(outcome)] += 1
        self.by_kind.setdefault(kind, []).append((latency, outcome))
        if in_window:
            self.answers_in_window += 1
            if isinstance(outcome, int) and 200 <= outcome < 300:
                self.ok_in_window += 1
        if outcome in (429, 503) and not retry_after:
            self.refusals_without_retry_after += 1

    def summary(self, seconds: float) -> dict[str, Any]:
        every = [x for samples in self.by_kind.values() for x in samples]
        ok = [lat for lat, o in every if isinstance(o, int) and 200 <= o < 300]
        refused_503 = [lat for lat, o in every if o == 503]
        kinds = {}
        for kind, samples in self.by_kind.items():
            kinds[kind] = {**latency_summary([lat for lat, o in samples if isinstance(o, int) and 200 <= o < 300]),
                           "statuses": dict(Counter(str(o) for _, o in samples))}
        return {
            "requests": len(every),
            "ok_per_s": self.ok_in_window / seconds,
            "answers_per_s": self.answers_in_window / seconds,
            "ok": latency_summary(ok),
            "all": latency_summary([lat for lat, _ in every]),
            "p99_503_ms": percentile(refused_503, 99) * 1000 if refused_503 else None,
            "statuses": dict(self.statuses),
            "classes": dict(self.classes),
            "refusals_without_retry_after": self.refusals_without_retry_after,
            "by_kind": kinds,
        }


Pick = Callable[[int, random.Random], tuple[str, bytes]]


async def run_load(port: int, connections: int, pick: Pick, *, seconds: float, warmup: float, timeout: float,
                   honour_retry_after: bool, seed: int = 0) -> tuple[Tally, dict[str, Any]]:
    """`connections` closed-loop connections, opened before the clock starts; requests that end in
    the warm-up are not counted; `seconds` of measurement follow, then the requests in flight end
    (answered or timed out) and count, but not towards the rate."""
    tally = Tally()
    conns = [HttpConn(port) for _ in range(connections)]
    opened = time.perf_counter()
    outcomes = await asyncio.gather(*(c.open() for c in conns), return_exceptions=True)
    open_failures = sum(isinstance(o, BaseException) for o in outcomes)
    open_s = time.perf_counter() - opened
    measure_from = time.perf_counter() + warmup
    deadline = measure_from + seconds

    async def worker(i: int, conn: HttpConn) -> None:
        rng = random.Random(seed * 100_003 + i)
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            kind, data = pick(i, rng)
            outcome, headers, _ = await call(conn, data, timeout)
            t1 = time.perf_counter()
            retry_after = headers.get(b"retry-after")
            if t1 >= measure_from:  # a request of the warm-up that ends later counts: a stuck server shows
                tally.add(kind, outcome, t1 - t0, t1 <= deadline, retry_after is not None)
            if isinstance(outcome, str):
                await asyncio.sleep(0.05)  # an error: do not spin on a dead socket
            elif honour_retry_after and outcome in (429, 503) and retry_after:
                with contextlib.suppress(ValueError):
                    await asyncio.sleep(max(0.0, min(float(retry_after), deadline - t1)))

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    for c in conns:
        c.close()
    return tally, {"open_seconds": open_s, "open_failures": open_failures,
                   "drain_seconds": time.perf_counter() - deadline}


# -- probes: light steady load from a process of their own ------------------------------------------

async def _probe_main(spec: dict[str, Any]) -> None:
    port, n, interval, duration = spec["port"], spec["connections"], spec["interval"], spec["duration"]
    datas = [http_request(m, p, port, h) for m, p, h in spec["requests"]]
    conns = [HttpConn(port) for _ in range(n)]
    for c in conns:
        await c.open()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0 = time.perf_counter()
    end = t0 + duration
    samples: list[tuple[float, float, int | str]] = []

    async def one(j: int, conn: HttpConn) -> None:
        due, k = t0 + j * interval / n, j
        while True:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            start = time.perf_counter()
            if start >= end:
                return
            outcome, _, _ = await call(conn, datas[k % len(datas)], spec["timeout"])
            finished = time.perf_counter()
            samples.append((start - t0, finished - start, outcome))
            k += n
            due = max(due + interval, finished)  # a late answer skips the ticks it missed

    await asyncio.gather(*(one(j, c) for j, c in enumerate(conns)))
    print(json.dumps({"samples": samples}), flush=True)


class Probe:
    """A probe process: opens its connections, waits for go(), runs for its duration."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, port: int, requests: list[tuple[str, str, dict[str, str]]], *, connections: int,
                    interval: float, duration: float, timeout: float) -> Probe:
        spec = {"port": port, "requests": requests, "connections": connections, "interval": interval,
                "duration": duration, "timeout": timeout}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"probe did not start: {line!r}")
        return cls(proc)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def samples(self) -> list[tuple[float, float, int | str]]:
        out, _ = await self.proc.communicate()
        return [tuple(s) for s in json.loads(out.decode().strip().splitlines()[-1])["samples"]]


def probe_summary(samples: list[tuple[float, float, int | str]]) -> dict[str, Any]:
    lat = [s[1] for s in samples]
    ok = [s[1] for s in samples if isinstance(s[2], int) and 200 <= s[2] < 300]
    return {**latency_summary(lat), "ok_p99_ms": percentile(ok, 99) * 1000 if ok else None,
            "statuses": dict(Counter(str(s[2]) for s in samples))}


async def _healthz_probe(port: int, duration: float, timeout: float) -> Probe:
    return await Probe.start(port, [("GET", "/healthz", {})], connections=1, interval=HEALTHZ_INTERVAL,
                             duration=duration, timeout=timeout)


# -- processes ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process in its own session (its group is stopped at the end), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, port: int, workdir: Path) -> None:
        self.name, self.port = name, port
        self._argv, self._env, self._cwd, self._workdir = argv, env, cwd, workdir
        self.log_paths: list[Path] = []
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.log_path = self._workdir / f"{self.name}.{len(self.log_paths)}.log"
        self.log_paths.append(self.log_path)
        self._log = self.log_path.open("w")
        self.popen = subprocess.Popen(self._argv, cwd=self._cwd, env=self._env, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self) -> None:
        """A fresh process on the same port (for a server that does not recover from a level)."""
        self.stop()
        self.restarts += 1
        self._start()
        self.wait_ready()

    def output(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60) -> None:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(http_request("GET", "/healthz", self.port, {"Connection": "close"}))
                return s.recv(64).startswith(b"HTTP/1.1 200")
            return False

        wait_until(up, timeout, f"{self.name} to answer /healthz", interval=0.1)

    def first_traceback(self, lines: int = 40) -> str | None:
        for path in self.log_paths:
            text = path.read_text(errors="replace")
            at = text.find("Traceback (most recent call last)")
            if at >= 0:
                start = text.rfind("\n", 0, max(0, at - 1)) + 1  # the line that logged it
                return "\n".join(text[start:].splitlines()[:lines])
        return None

    def errors_logged(self) -> int:
        return sum(p.read_text(errors="replace").count("Traceback (most recent call last)") for p in self.log_paths)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(GRACEFUL_SHUTDOWN_SECONDS + 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()


@dataclass(frozen=True)
class Project:
    dir: Path
    python: str
    pythonpath: str

    @classmethod
    def of(cls, directory: Path) -> Project:
        venv = directory / ".venv" / "bin" / "python"
        return cls(directory, str(venv) if venv.exists() else sys.executable, str(directory))

    def describe(self) -> str:
        """Where the measured code comes from (read once, at the start: others may commit meanwhile)."""
        rev = subprocess.run(["git", "-C", str(self.dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(self.dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return f"{self.dir} @ {rev}{' + uncommitted changes' if dirty else ''}"


def api_env(project: Project, database_url: str, port: int, storage: Path) -> dict[str, str]:
    """The environment of the project's API: recalq_env with every other RECALQ_* setting dropped."""
    env = recalq_env(database_url, BROKERS["rabbitmq"], unique_queue("api"), PYTHONPATH=project.pythonpath,
                     RECALQ_ADMIN_API_KEYS=ADMIN_KEY, RECALQ_STORAGE_DIR=str(storage / "documents"),
                     RECALQ_DATA_DIR=str(storage), RECALQ_API_HOST="127.0.0.1", RECALQ_API_PORT=str(port))
    ours = {"RECALQ_DATABASE_URL", "RECALQ_BROKER_URL", "RECALQ_QUEUE", "RECALQ_WORKER_CONCURRENCY",
            "RECALQ_ADMIN_API_KEYS", "RECALQ_STORAGE_DIR", "RECALQ_DATA_DIR", "RECALQ_API_HOST", "RECALQ_API_PORT"}
    for key in list(env):
        if (key.startswith("RECALQ_") and key not in ours) or key in ("DATABASE_URL", "BROKER_URL"):
            del env[key]
    return env


_INTROSPECT = """
import dataclasses
import json
from recalq.settings import Settings
import api.app as app_module
settings = Settings()
app = app_module.create_app(settings)
runtime = app.state.runtime
pool = getattr(runtime, "_pool_size", None) or settings.db_pool_max_size
limits = getattr(app_module, "admission_limits", None)
dump = settings.model_dump(mode="json")
print(json.dumps({
    "api_pool_size": pool,
    "db_pool_min_size": settings.db_pool_min_size,
    "db_pool_timeout_seconds": settings.db_pool_timeout_seconds,
    "settings": {k: v for k, v in dump.items() if k.startswith(("api_", "db_pool_"))},
    "admission": dataclasses.asdict(limits(settings)) if limits else None,
}))
"""


def introspect(project: Project, env: dict[str, str]) -> dict[str, Any]:
    """The API's pool size and admission limits as the project's own create_app sets them."""
    done = subprocess.run([project.python, "-c", _INTROSPECT], cwd=project.dir, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"could not read the project's settings:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def project_database(project: Project, env_for: Callable[[str], dict[str, str]]) -> Iterator[str]:
    """A private database migrated by the project's own `recalq migrate`, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"recalq_bench_apiload_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(PG_ADMIN_URL, name)
    try:
        done = subprocess.run([project.python, "-m", "recalq", "--log-level", "WARNING", "migrate"],
                              cwd=project.dir, env=env_for(url), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"recalq migrate failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# -- the baseline app -----------------------------------------------------------------------------------

def create_baseline_app() -> Any:
    """A bare FastAPI app: one sync route, one indexed query, a pool the size of the API's."""
    from fastapi import FastAPI, HTTPException
    from psycopg_pool import ConnectionPool

    size = int(os.environ["BENCH_BASELINE_POOL_SIZE"])
    pool = ConnectionPool(os.environ["BENCH_BASELINE_DATABASE_URL"],
                          min_size=min(int(os.environ["BENCH_BASELINE_POOL_MIN"]), size), max_size=size,
                          timeout=float(os.environ["BENCH_BASELINE_POOL_TIMEOUT"]), kwargs={"autocommit": True},
                          open=True, name="baseline")
    app = FastAPI(title="baseline")

    @app.get("/baseline/properties/{property_id}")
    def read_property(property_id: int) -> dict[str, Any]:
        with pool.connection() as conn:
            found = conn.execute(
                "SELECT id, client_id, name, compliance_score, compliance_breakdown, compliance_score_pending "
                "FROM properties WHERE id = %s", [property_id]).fetchone()
        if found is None:
            raise HTTPException(404)
        return dict(zip(("id", "client_id", "name", "compliance_score", "compliance_breakdown",
                         "compliance_score_pending"), found, strict=True))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_baseline() -> None:
    """What `recalq api` does, with the baseline app (same uvicorn.run arguments, same logging)."""
    import logging

    import uvicorn

    level = os.environ.get("BENCH_BASELINE_LOG_LEVEL", DEFAULT_LOG_LEVEL)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    uvicorn.run(create_baseline_app, factory=True, host="127.0.0.1", port=int(os.environ["BENCH_BASELINE_PORT"]),
                log_config=None, log_level=level.lower(), timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


# -- provisioning -----------------------------------------------------------------------------------------

@dataclass
class Tenant:
    name: str
    client_id: int
    token: str
    property_ids: list[int]
    document_ids: dict[int, list[int]] = field(default_factory=dict)
    heavy: tuple[int, int] | None = None  # (property, document) of the large text

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def certificate_text(tag: str) -> bytes:
    return (f"Landlord gas safety record (CP12) {tag}\nGas Safe register engineer checked every gas appliance.\n"
            "Date of inspection: 14/03/2025\nNext inspection due: 13/03/2026\n").encode()


def heavy_text(mib: float) -> bytes:
    """A few MiB of certificate-like text: keywords and labelled dates on every block."""
    block = ("Landlord gas safety record (CP12). Gas Safe register engineer checked every gas appliance.\n"
             "Date of inspection: 14/03/2025. Next inspection due: 13/03/2026.\n"
             "Notes: flue flow test satisfactory; ventilation adequate; no defects recorded on the boiler.\n"
             + "lorem ipsum dolor sit amet " * 20 + "\n")
    size = int(mib * 1024 * 1024)
    return (block * (size // len(block) + 1)).encode()[:size]


def upload_request(tenant: Tenant, property_id: int, port: int, content: bytes, file_name: str = "cert.txt") -> bytes:
    ctype, body = multipart({"requirement_code": "gas_safety"}, file_name, content)
    return http_request("POST", f"/api/properties/{property_id}/documents", port,
                        {**tenant.auth, "Content-Type": ctype}, body)


async def _checked(conn: HttpConn, data: bytes, expect: int, what: str) -> Any:
    """A provisioning call, retried after a 429/503's Retry-After."""
    for _ in range(20):
        status, headers, body = await call(conn, data, 120)
        if status == expect:
            return json.loads(body)
        if status in (429, 503) or isinstance(status, str):
            await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
            continue
        raise RuntimeError(f"{what}: HTTP {status}: {body[:500]!r}")
    raise RuntimeError(f"{what}: still refused after 20 tries")


async def provision(port: int, names: list[str], properties: int, documents: int) -> dict[str, Tenant]:
    admin = {"X-API-Key": ADMIN_KEY, "Content-Type": "application/json"}
    tenants: dict[str, Tenant] = {}
    conn = HttpConn(port)
    for name in names:
        body = json.dumps({"name": f"Bench {name}",
                           "properties": [{"name": f"{name} property {k}"} for k in range(properties)]}).encode()
        made = await _checked(conn, http_request("POST", "/api/admin/clients", port, admin, body), 201,
                              f"provisioning {name}")
        tenants[name] = Tenant(name, made["client_id"], made["token"]["token"],
                               [p["property_id"] for p in made["properties"]])
    conn.close()

    jobs = [(t, pid, k) for t in tenants.values() for pid in t.property_ids for k in range(documents)]

    async def uploader(share: list[tuple[Tenant, int, int]]) -> None:
        c = HttpConn(port)
        for tenant, pid, k in share:
            added = await _checked(c, upload_request(tenant, pid, port, certificate_text(f"{pid}-{k}-{uuid.uuid4()}")),
                                   201, f"uploading to property {pid}")
            tenant.document_ids.setdefault(pid, []).extend(d["id"] for d in added["documents"])
        c.close()

    await asyncio.gather(*(uploader(jobs[i::8]) for i in range(8)))
    return tenants


async def add_heavy(port: int, tenant: Tenant, mib: float) -> None:
    conn = HttpConn(port)
    pid = tenant.property_ids[0]
    added = await _checked(conn, upload_request(tenant, pid, port, heavy_text(mib), "large-certificate.txt"), 201,
                           "uploading the large document")
    tenant.heavy = (pid, added["documents"][0]["id"])
    conn.close()


# -- traffic --------------------------------------------------------------------------------------------------

def mixed_pick(tenants: list[Tenant], port: int) -> Pick:
    prepared = []
    for t in tenants:
        prepared.append((
            t,
            [http_request("GET", f"/api/properties/{pid}", port, t.auth) for pid in t.property_ids],
            http_request("GET", "/api/properties?limit=50", port, t.auth),
            [http_request("GET", f"/api/properties/{pid}/documents", port, t.auth) for pid in t.property_ids],
        ))
    bounds = []
    acc = 0.0
    for kind, share in MIX:
        acc += share
        bounds.append((acc, kind))

    def pick(i: int, rng: random.Random) -> tuple[str, bytes]:
        tenant, gets, listing, docs = prepared[i % len(prepared)]
        r = rng.random()
        kind = next((k for b, k in bounds if r < b), "get")
        if kind == "get":
            return kind, rng.choice(gets)
        if kind == "list":
            return kind, listing
        if kind == "documents":
            return kind, rng.choice(docs)
        pid = rng.choice(tenant.property_ids)
        return kind, upload_request(tenant, pid, port, certificate_text(f"load-{uuid.uuid4().hex}"))

    return pick


def baseline_pick(property_ids: list[int], port: int) -> Pick:
    gets = [http_request("GET", f"/baseline/properties/{pid}", port) for pid in property_ids]
    return lambda i, rng: ("get", rng.choice(gets))


def greedy_pick(tenant: Tenant, port: int) -> Pick:
    assert tenant.heavy is not None
    pid, doc = tenant.heavy
    heavy = http_request("GET", f"/api/properties/{pid}/documents/{doc}/ai-suggestion", port, tenant.auth)

    def pick(i: int, rng: random.Random) -> tuple[str, bytes]:
        if rng.random() < 0.8:
            return "ai-suggestion", heavy
        return "upload", upload_request(tenant, rng.choice(tenant.property_ids), port,
                                        certificate_text(f"greedy-{uuid.uuid4().hex}"))

    return pick


async def settle(server: Server, data: bytes, limit: float = 20.0) -> dict[str, Any]:
    """Waits until the server answers `data` quickly again (it may still be working off the last
    level's backlog); one that has not within `limit` seconds is restarted, so each level and
    phase starts from a server that answers."""
    started = time.perf_counter()
    settled = False
    while not settled and time.perf_counter() - started < limit:
        conn = HttpConn(server.port)
        t0 = time.perf_counter()
        outcome, _, _ = await call(conn, data, 5)
        conn.close()
        settled = isinstance(outcome, int) and outcome < 500 and time.perf_counter() - t0 < 0.25
        if not settled:
            await asyncio.sleep(0.5)
    waited = time.perf_counter() - started
    if not settled:
        log(f"{server.name} did not answer quickly within {limit:g} s of the last level ending; restarting it")
        server.restart()
    await asyncio.sleep(0.5)
    return {"settle_seconds": waited, "restarted_before": not settled}


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


class Cpu:
    """CPU of this process, of a server's process group, of the database's backends, and of
    everything else on the machine (probes, other work), each in % of one core."""

    def __init__(self, server: Server, database_url: str) -> None:
        self.meter = CpuMeter(server.popen.pid, database_url)

    def __enter__(self) -> Cpu:
        self.t0, self.own0 = time.perf_counter(), time.process_time()
        self.server0, self.pg0 = self.meter.sample()
        self.machine0 = _machine_ticks()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self.t0
        server, pg = self.meter.sample()
        busy, total = _machine_ticks()
        machine = 100 * (os.cpu_count() or 1) * (busy - self.machine0[0]) / max(1, total - self.machine0[1])
        self.result = {"loadgen": 100 * (time.process_time() - self.own0) / wall,
                       "api": 100 * (server - self.server0) / wall, "postgres": 100 * (pg - self.pg0) / wall}
        self.result["other"] = max(0.0, machine - sum(self.result.values()))
        self.meter.close()


# -- the run ----------------------------------------------------------------------------------------------------

async def measure_level(side: str, server: Server, database_url: str, connections: int, pick: Pick,
                        settle_request: bytes, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    settled = await settle(server, settle_request)
    health = await _healthz_probe(server.port, args.warmup + args.seconds, args.timeout)
    with Cpu(server, database_url) as cpu:
        health.go()
        tally, conn_info = await run_load(server.port, connections, pick, seconds=args.seconds, warmup=args.warmup,
                                          timeout=args.timeout, honour_retry_after=not args.ignore_retry_after,
                                          seed=seed)
    healthz = probe_summary(await health.samples())
    out = {"side": side, "connections": connections, **tally.summary(args.seconds), "healthz": healthz,
           "cpu": cpu.result, **settled, **conn_info}
    log(f"{side} @{connections}: {out['ok_per_s']:.0f} 2xx/s, p50 {_ms(out['ok']['p50_ms'])} p99 "
        f"{_ms(out['ok']['p99_ms'])} ms, {out['statuses']}, healthz max {_ms(healthz['max_ms'])} ms, "
        f"cpu {cpu.result['loadgen']:.0f}/{cpu.result['api']:.0f}/{cpu.result['postgres']:.0f} %")
    return out


async def greedy_phase(server: Server, database_url: str, a: Tenant, b: Tenant, args: argparse.Namespace,
                       greedy: str | None) -> dict[str, Any]:
    """B alone (greedy None), or beside A, which ignores or honours Retry-After ("ignore", "honour")."""
    with_greedy = greedy is not None
    port = server.port
    b_requests = [("GET", f"/api/properties/{pid}", b.auth) for pid in b.property_ids]
    settled = await settle(server, http_request("GET", f"/api/properties/{b.property_ids[0]}", port, b.auth))
    ramp = args.warmup if with_greedy else 0.0
    health = await _healthz_probe(port, ramp + args.greedy_seconds, args.timeout)
    victim = await Probe.start(port, b_requests, connections=4, interval=4 / args.victim_rate,
                               duration=args.greedy_seconds, timeout=args.timeout)
    out: dict[str, Any] = {"phase": f"B + A ({greedy}s Retry-After)" if with_greedy else "B alone",
                           "greedy": greedy, **settled}
    with Cpu(server, database_url) as cpu:
        health.go()
        load = None
        if with_greedy:
            load = asyncio.create_task(run_load(port, args.greedy_connections, greedy_pick(a, port),
                                                seconds=args.greedy_seconds, warmup=ramp, timeout=args.timeout,
                                                honour_retry_after=greedy == "honour", seed=7))
            await asyncio.sleep(ramp)
        victim.go()
        b_samples = await victim.samples()
        if load is not None:
            tally, info = await load
            out["a"] = {**tally.summary(args.greedy_seconds), **info}
    out["b"] = probe_summary(b_samples)
    out["b"]["rate_per_s"] = len(b_samples) / args.greedy_seconds
    out["healthz"] = probe_summary(await health.samples())
    out["cpu"] = cpu.result
    log(f"{out['phase']}: B p50 {_ms(out['b']['p50_ms'])} p99 {_ms(out['b']['p99_ms'])} ms {out['b']['statuses']}"
        + (f"; A {out['a']['statuses']}" if "a" in out else ""))
    return out


async def run(args: argparse.Namespace, project: Project, workdir: Path) -> dict[str, Any]:
    api_port, base_port = free_port(), free_port()
    storage = workdir / "storage"
    storage.mkdir()

    def env_for(url: str) -> dict[str, str]:
        return api_env(project, url, api_port, storage)

    servers: list[Server] = []
    try:
        with project_database(project, env_for) as database_url:
            env = env_for(database_url)
            info = introspect(project, env)
            log(f"API of {args.project_label}: pool {info['api_pool_size']}, admission {info['admission']}")
            api = Server("recalq-api", [project.python, "-m", "recalq", "--log-level", args.log_level, "api"], env,
                         project.dir, api_port, workdir)
            servers.append(api)
            api.wait_ready()
            names = [f"tenant-{k}" for k in range(args.tenants)] + ["greedy-A", "steady-B"]
            t0 = time.perf_counter()
            tenants = await provision(api_port, names, args.properties, args.documents)
            a, b = tenants.pop("greedy-A"), tenants.pop("steady-B")
            await add_heavy(api_port, a, args.heavy_mib)
            mixed = list(tenants.values())
            log(f"provisioned {len(names)} tenants in {time.perf_counter() - t0:.1f} s")

            base_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                        "BENCH_BASELINE_DATABASE_URL": database_url, "BENCH_BASELINE_PORT": str(base_port),
                        "BENCH_BASELINE_POOL_SIZE": str(info["api_pool_size"]),
                        "BENCH_BASELINE_POOL_MIN": str(info["db_pool_min_size"]),
                        "BENCH_BASELINE_POOL_TIMEOUT": str(info["db_pool_timeout_seconds"]),
                        "BENCH_BASELINE_LOG_LEVEL": args.log_level}
            baseline = Server("baseline", [sys.executable, str(Path(__file__).resolve()), "--serve-baseline"],
                              base_env, ROOT, base_port, workdir)
            servers.append(baseline)
            baseline.wait_ready()

            all_ids = [pid for t in mixed for pid in t.property_ids]
            recalq_mix = mixed_pick(mixed, api_port)
            base_mix = baseline_pick(all_ids, base_port)
            recalq_settle = http_request("GET", f"/api/properties/{mixed[0].property_ids[0]}", api_port, mixed[0].auth)
            base_settle = http_request("GET", f"/baseline/properties/{all_ids[0]}", base_port)
            levels = []
            for n, connections in enumerate(args.levels):
                levels.append(await measure_level("recalq", api, database_url, connections, recalq_mix,
                                                  recalq_settle, args, n))
                levels.append(await measure_level("baseline", baseline, database_url, connections, base_mix,
                                                  base_settle, args, n))
            greedy = [await greedy_phase(api, database_url, a, b, args, None)]
            for mode in args.greedy_modes:
                greedy.append(await greedy_phase(api, database_url, a, b, args, mode))
            tracebacks = {s.name: s.errors_logged() for s in servers}
            for s in servers:
                s.stop()
            return {"levels": levels, "greedy": greedy, "settings": info, "server_tracebacks": tracebacks,
                    "server_restarts": {s.name: s.restarts for s in servers},
                    "first_tracebacks": {s.name: s.first_traceback() for s in servers},
                    "logs": {s.name: s.output(15) for s in servers}}
    except BaseException:
        for s in servers:
            log(f"--- {s.name}:\n{s.output()}")
        raise
    finally:
        for s in servers:
            s.stop()


# -- report ---------------------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cpu(c: dict[str, float]) -> str:
    return f"{c['loadgen']:.0f}/{c['api']:.0f}/{c['postgres']:.0f}/{c.get('other', 0):.0f}"


def _statuses(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"


def evaluate(data: dict[str, Any], levels: list[int]) -> list[dict[str, Any]]:
    """The targets, each with what was measured and whether it was met."""
    rec = {e["connections"]: e for e in data["levels"] if e["side"] == "recalq"}
    base = {e["connections"]: e for e in data["levels"] if e["side"] == "baseline"}
    checks: list[dict[str, Any]] = []

    bad = {n: e["classes"].get("5xx", 0) + e["classes"].get("err", 0) for n, e in rec.items()}
    slow_503 = {n: e["p99_503_ms"] for n, e in rec.items()
                if e["p99_503_ms"] and e["p99_503_ms"] > FAST_REFUSAL_S * 1000}
    checks.append({"target": "no 5xx or errors at any level (fast 503/429 fine)",
                   "measured": ", ".join(f"@{n}: {v}" for n, v in bad.items())
                   + (f"; slow 503 p99 {', '.join(f'@{n}: {v / 1000:.1f} s' for n, v in slow_503.items())}"
                      if slow_503 else ""),
                   "met": not any(bad.values()) and not slow_503,
                   "row": row("5xx + errors, all levels", sum(bad.values()), "requests", target="0",
                              met=not any(bad.values()) and not slow_503,
                              note="5xx except 503, timeouts and resets; a 503 must come within "
                                   f"{FAST_REFUSAL_S:g} s (p99)")})

    best_n, best = max(((n, e["ok_per_s"]) for n, e in rec.items()), key=lambda x: x[1])
    for n in (200, 500):
        if n in rec:
            share = rec[n]["ok_per_s"] / best if best else 0.0
            checks.append({"target": f"2xx/s at {n} >= {TARGET_THROUGHPUT_SHARE:.0%} of best level",
                           "measured": f"{rec[n]['ok_per_s']:.0f}/s = {share:.0%} of {best:.0f}/s (@{best_n})",
                           "met": share >= TARGET_THROUGHPUT_SHARE,
                           "row": row(f"2xx/s @{n} / best level's", share, "x", target=f">= {TARGET_THROUGHPUT_SHARE}",
                                      met=share >= TARGET_THROUGHPUT_SHARE,
                                      note=f"best: {best:.0f}/s at {best_n} connections")})
    if 200 in rec and 200 in base:
        mine, bare = rec[200]["ok"]["p99_ms"], base[200]["ok"]["p99_ms"]
        ratio = mine / bare if mine is not None and bare else None
        checks.append({"target": f"2xx p99 at 200 <= {TARGET_P99_VS_BARE:g}x bare endpoint's",
                       "measured": f"{_ms(mine)} ms vs {_ms(bare)} ms"
                                   + (f" = {ratio:.1f}x" if ratio is not None else ""),
                       "met": ratio is not None and ratio <= TARGET_P99_VS_BARE,
                       "row": row("2xx p99 @200", mine, "ms", baseline=bare, baseline_name="bare FastAPI endpoint",
                                  target=f"<= {TARGET_P99_VS_BARE:g}x baseline",
                                  met=ratio is not None and ratio <= TARGET_P99_VS_BARE)})
    probes = [e["healthz"] for e in rec.values()] + [g["healthz"] for g in data["greedy"]]
    worst = max((p["max_ms"] for p in probes if p["max_ms"] is not None), default=None)
    worst_p99 = max((p["p99_ms"] for p in probes if p["p99_ms"] is not None), default=None)
    not_ok = sum(n for p in probes for k, n in p["statuses"].items() if k != "200")
    met = worst is not None and worst <= TARGET_HEALTHZ_MS and not not_ok
    checks.append({"target": f"/healthz <= {TARGET_HEALTHZ_MS:g} ms throughout (max)",
                   "measured": f"max {_ms(worst)} ms, worst p99 {_ms(worst_p99)} ms"
                               + (f", {not_ok} not 200" if not_ok else ""),
                   "met": met,
                   "row": row("/healthz max, every level and phase", worst, "ms",
                              target=f"<= {TARGET_HEALTHZ_MS:g} ms", met=met)})
    alone = data["greedy"][0]["b"]
    for phase in data["greedy"][1:]:
        loaded, mode = phase["b"], phase["greedy"]
        ratio = loaded["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] and loaded["p99_ms"] is not None else None
        met = ratio is not None and ratio <= TARGET_VICTIM_P99_RATIO
        if set(alone["statuses"]) != {"200"}:
            met = None  # no clean unloaded value to compare with
        checks.append({"target": f"tenant B p99 beside A ({mode}s Retry-After) <= {TARGET_VICTIM_P99_RATIO:g}x alone",
                       "measured": f"{_ms(loaded['p99_ms'])} ms vs {_ms(alone['p99_ms'])} ms"
                                   + (f" = {ratio:.1f}x" if ratio is not None else ""),
                       "met": met,
                       "row": row(f"tenant B p99 beside greedy A ({mode}s Retry-After)", loaded["p99_ms"], "ms",
                                  baseline=alone["p99_ms"], baseline_name="B alone",
                                  target=f"<= {TARGET_VICTIM_P99_RATIO:g}x baseline", met=met)})
    return checks


def print_report(data: dict[str, Any], args: argparse.Namespace, checks: list[dict[str, Any]]) -> None:
    info = data["settings"]
    print(f"\nHTTP API under load: {args.project_label}")
    admission = info["admission"] or "none (this version has none)"
    print(f"API pool {info['api_pool_size']} connections; admission: {admission}; "
          f"log level {args.log_level}; {args.seconds:g} s per level after {args.warmup:g} s warm-up; "
          f"Retry-After {'ignored' if args.ignore_retry_after else 'honoured'} by the mixed clients; "
          f"CPU % of one core (load generator / server process / its Postgres backends / everything else on the "
          f"machine), {os.cpu_count()} cores; load average {_loadavg()}")
    rows = []
    for e in data["levels"]:
        c = e["classes"]
        h = e["healthz"]
        rows.append([str(e["connections"]), e["side"], f"{e['ok_per_s']:.0f}", _ms(e["ok"]["p50_ms"]),
                     _ms(e["ok"]["p99_ms"]), _ms(e["all"]["p99_ms"]),
                     _ms(e["by_kind"].get("get", {}).get("p99_ms")),
                     *(str(c.get(k, 0)) for k in ("200", "201", "429", "503", "5xx", "err")),
                     f"{_ms(h['p50_ms'])}/{_ms(h['p99_ms'])}/{_ms(h['max_ms'])}", _cpu(e["cpu"])])
    print()
    print_table(["conns", "server", "2xx/s", "p50 ms", "p99 ms", "p99 all", "p99 GET prop", "200", "201", "429",
                 "503", "5xx", "err", "healthz p50/p99/max", "CPU %"], rows)

    grows = []
    for g in data["greedy"]:
        bb = g["b"]
        a = g.get("a")
        grows.append([g["phase"], f"{bb['rate_per_s']:.0f}/s", _ms(bb["p50_ms"]), _ms(bb["p99_ms"]), _ms(bb["max_ms"]),
                      _statuses(bb["statuses"]), _statuses(a["statuses"]) if a else "-",
                      str(a["refusals_without_retry_after"]) if a else "-",
                      f"{_ms(g['healthz']['p99_ms'])}/{_ms(g['healthz']['max_ms'])}", _cpu(g["cpu"])])
    print(f"\nGreedy tenant: B reads at {args.victim_rate:g}/s on 4 connections; A: {args.greedy_connections} "
          f"connections, ai-suggestion of a {args.heavy_mib:g} MiB text (80 %) and small uploads")
    print_table(["phase", "B rate", "B p50 ms", "B p99 ms", "B max ms", "B statuses", "A statuses",
                 "A 429/503 w/o Retry-After", "healthz p99/max", "CPU %"], grows)

    print("\nTargets (informational)")
    print_table(["target", "measured", "result"],
                [[c["target"], c["measured"], "n/a" if c["met"] is None else "PASS" if c["met"] else "MISS"]
                 for c in checks])
    for note in notes(data):
        print(f"  * {note}")


def notes(data: dict[str, Any]) -> list[str]:
    """Who the bottleneck was, per level and phase, from the CPU each side used."""
    cores = os.cpu_count() or 1
    loadgen, api, saturated, restarted, out = [], [], [], [], []
    for e in data["levels"] + data["greedy"]:
        where = f"{e['side']} @{e['connections']}" if "side" in e else e["phase"]
        cpu = e["cpu"]
        if cpu["loadgen"] >= 85:
            loadgen.append(f"{where} ({cpu['loadgen']:.0f} %)")
        if cpu["api"] >= 90:
            api.append(where)
        if sum(cpu.values()) >= 0.85 * 100 * cores:
            saturated.append(where)
        if e.get("open_failures"):
            out.append(f"{where}: {e['open_failures']} connections could not be opened")
        if e.get("restarted_before"):
            restarted.append(where)
    if api:
        out.append("the server process used >= 90 % of one core (one process, one GIL: the bottleneck) at: "
                   + ", ".join(api))
    if loadgen:
        out.append("the load generator (one process) used >= 85 % of a core, so the rate is a lower bound and "
                   "latencies include its own lag, at: " + ", ".join(loadgen))
    if saturated:
        out.append(f"the machine's {cores} cores were >= 85 % busy (all processes, ours and others') at: "
                   + ", ".join(saturated))
    if restarted:
        out.append("the server had not recovered (no quick answer) 20 s after the previous level or phase, so it was "
                   "restarted before: " + ", ".join(restarted))
    tracebacks = {k: v for k, v in data.get("server_tracebacks", {}).items() if v}
    if tracebacks:
        out.append(f"tracebacks in the server logs: {tracebacks}")
    return out


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive integers, comma-separated")
    return levels


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=parse_levels, default=None,
                        help="concurrent connections per level, comma-separated (default 10,50,200,500; "
                             "10,200 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per level (default 10; 3 quick)")
    parser.add_argument("--warmup", type=float, default=None, help="uncounted seconds first (default 1; 0.5 quick)")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="a request unanswered this long is an error (default 15 s: above the API's 10 s "
                             "pool timeout, so its 503s show)")
    parser.add_argument("--tenants", type=int, default=20, help="clients of the mixed traffic (default 20)")
    parser.add_argument("--properties", type=int, default=5, help="properties per client (default 5)")
    parser.add_argument("--documents", type=int, default=2, help="documents per property at the start (default 2)")
    parser.add_argument("--ignore-retry-after", action="store_true",
                        help="mixed clients retry a 429/503 at once instead of after its Retry-After")
    parser.add_argument("--greedy-connections", type=int, default=64, help="tenant A's connections (default 64)")
    parser.add_argument("--greedy-seconds", type=float, default=None,
                        help="length of each greedy-tenant phase (default 10; 3 quick)")
    parser.add_argument("--greedy-modes", type=lambda t: [m for m in t.split(",") if m], default=["ignore", "honour"],
                        help="greedy phases: A ignores and/or honours Retry-After (default ignore,honour)")
    parser.add_argument("--heavy-mib", type=float, default=2.0, help="size of A's large text document (default 2)")
    parser.add_argument("--victim-rate", type=float, default=40.0, help="tenant B's requests per second (default 40)")
    parser.add_argument("--log-level", default=DEFAULT_LOG_LEVEL, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the servers' log level (default INFO, as `recalq api`: one access line per request)")
    parser.add_argument("--project-dir", type=Path, default=ROOT,
                        help="the checkout whose API is measured (default this one); its .venv if it has one, "
                             "else this interpreter with PYTHONPATH=DIR")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (levels 10,200, 3 s each)")
    args = parser.parse_args(argv)
    args.levels = args.levels or list(QUICK_LEVELS if args.quick else DEFAULT_LEVELS)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.greedy_seconds = args.greedy_seconds or (3.0 if args.quick else 10.0)
    if args.quick:
        args.tenants = min(args.tenants, 8)
    project = Project.of(args.project_dir.resolve())
    args.project_label = project.describe()
    args.load_at_start = _loadavg()

    workdir = Path(tempfile.mkdtemp(prefix="recalq-bench-apiload-"))
    try:
        data = asyncio.run(run(args, project, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    checks = evaluate(data, args.levels)
    print_report(data, args, checks)

    rows = []
    base = {e["connections"]: e for e in data["levels"] if e["side"] == "baseline"}
    for e in data["levels"]:
        if e["side"] == "recalq":
            b = base.get(e["connections"])
            rows.append(row(f"2xx/s @{e['connections']} connections", e["ok_per_s"], "/s",
                            baseline=b["ok_per_s"] if b else None, baseline_name="bare FastAPI endpoint",
                            note="recalq: mixed client traffic; baseline: one indexed SELECT"))
    rows.extend(c["row"] for c in checks)
    params = {"levels": args.levels, "seconds": args.seconds, "warmup": args.warmup, "timeout": args.timeout,
              "tenants": args.tenants, "properties": args.properties, "documents": args.documents,
              "honour_retry_after": not args.ignore_retry_after, "greedy_connections": args.greedy_connections,
              "greedy_seconds": args.greedy_seconds, "heavy_mib": args.heavy_mib, "victim_rate": args.victim_rate,
              "log_level": args.log_level, "project": args.project_label,
              "load_at_start": args.load_at_start, "cpus": os.cpu_count()}
    res = {"name": NAME, "title": TITLE, "params": params, "rows": rows,
           "details": {**data, "targets": [{k: v for k, v in c.items() if k != "row"} for c in checks],
                       "notes": notes(data)}}
    path = write_result(NAME, res)
    print(f"\nwrote {path}")
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-baseline":
        serve_baseline()
    elif len(sys.argv) > 2 and sys.argv[1] == "--probe":
        asyncio.run(_probe_main(json.loads(sys.argv[2])))
    else:
        main()
