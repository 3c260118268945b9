"""How the API process is started and given its admin key: `recalq api`, `recalq new-key`, and
the key file and stop order of `recalq up` (the pieces that need no running system)."""

from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from recalq import supervisor
from recalq.cli import main
from recalq.settings import Settings
from tests.harness.system import wait_until


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Runs every test as on a fresh machine, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.upper().startswith("RECALQ_") or name.upper() in {"DATABASE_URL", "BROKER_URL"}:
            monkeypatch.delenv(name)


def test_new_key_prints_a_fresh_key_the_settings_accept_even_when_the_environment_holds_a_bad_one(
    monkeypatch, capsys
):
    monkeypatch.setenv("RECALQ_ADMIN_API_KEYS", "too-short")  # Settings() would refuse this

    assert main(["new-key"]) == 0
    first = capsys.readouterr().out
    assert main(["new-key"]) == 0
    second = capsys.readouterr().out

    keys = [first.strip(), second.strip()]
    assert first.endswith("\n") and first.count("\n") == 1, "only the key, on one line"
    assert keys[0] != keys[1]
    assert all(len(k) == 43 for k in keys), "32 random bytes in URL-safe base64"
    accepted = Settings(admin_api_keys=",".join(keys)).admin_api_keys
    assert [k.get_secret_value() for k in accepted] == keys


def test_new_key_help_says_where_the_key_goes_and_how_to_rotate(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["new-key", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "RECALQ_ADMIN_API_KEYS" in help_text
    assert "comma-separated" in help_text
    assert "X-API-Key" in help_text
    assert "rotate" in help_text


def test_api_refuses_to_start_without_a_database_url_in_one_sentence():
    with pytest.raises(SystemExit) as exit_:
        main(["api"])
    assert exit_.value.code == (
        "recalq api: DATABASE_URL is not set (or use `recalq up`, which starts embedded services and the API)"
    )


def test_up_makes_the_admin_key_file_once_private_to_its_owner_and_reuses_it(tmp_path):
    access = supervisor._api_access(Settings(data_dir=tmp_path / "var"), tmp_path / "var")
    key_file = tmp_path / "var" / "admin-api-key"

    key = access.env["RECALQ_ADMIN_API_KEYS"]
    assert key_file.read_text() == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert access.key_source == f"in {key_file}"
    assert key not in access.key_source
    assert Settings(admin_api_keys=key).admin_api_keys[0].get_secret_value() == key

    again = supervisor._api_access(Settings(data_dir=tmp_path / "var"), tmp_path / "var")
    assert again.env["RECALQ_ADMIN_API_KEYS"] == key
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["admin-api-key"], "no temporary file left"


def test_up_uses_the_keys_from_the_environment_and_makes_no_key_file(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", admin_api_keys="k" * 32)

    access = supervisor._api_access(settings, tmp_path / "var")

    assert "RECALQ_ADMIN_API_KEYS" not in access.env, "the API child inherits it from the environment"
    assert access.key_source == "from RECALQ_ADMIN_API_KEYS"
    assert not (tmp_path / "var" / "admin-api-key").exists()


@pytest.mark.parametrize(
    ("content", "mode", "complaint"),
    [
        ("short\n", 0o600, "does not hold one admin API key of at least 24 characters"),
        ("a" * 30 + "," + "b" * 30 + "\n", 0o600, "does not hold one admin API key of at least 24 characters"),
        ("k" * 43 + "\n", 0o644, "is readable by other users (mode 644)"),
    ],
    ids=["too-short", "two-keys", "world-readable"],
)
def test_up_refuses_a_key_file_it_cannot_trust_and_says_what_to_do(tmp_path, content, mode, complaint):
    key_file = tmp_path / "admin-api-key"
    key_file.write_text(content)
    key_file.chmod(mode)

    with pytest.raises(supervisor.StartupError) as error:
        supervisor._api_access(Settings(data_dir=tmp_path), tmp_path)

    assert str(error.value).startswith(f"{key_file} {complaint}")
    assert key_file.read_text() == content, "the file is left for the user to look at"


def test_the_api_child_gets_the_data_dir_up_resolved_so_its_documents_land_where_up_looks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    access = supervisor._api_access(Settings(admin_api_keys="k" * 32), Path("~/var"))

    assert access.env["RECALQ_DATA_DIR"] == str(tmp_path / "home" / "var")
    assert Settings(data_dir=access.env["RECALQ_DATA_DIR"]).document_dir == tmp_path / "home" / "var" / "documents"


def test_the_api_url_comes_from_uvicorns_start_up_line_also_for_a_port_the_os_picked():
    child = supervisor.Child("api", popen=None, ready_marker="Uvicorn running on")  # type: ignore[arg-type]
    child.ready_line = "2026-01-01 12:00:00,000 INFO uvicorn.error: Uvicorn running on http://127.0.0.1:41234 " \
                       "(Press CTRL+C to quit)"
    assert supervisor._api_url(child) == "http://127.0.0.1:41234"


_STOPPING_CHILD = """
import signal, sys, time
log, name, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
def on_term(*_):
    with open(log, "a") as f:
        f.write(name + " got SIGTERM\\n")
    if slow:
        time.sleep(0.5)  # a stage that takes a while to finish its in-flight work
        with open(log, "a") as f:
            f.write(name + " exited\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    signal.pause()  # idle until SIGTERM runs on_term
"""


def test_children_stop_stage_by_stage_so_the_relay_and_worker_get_sigterm_only_after_the_api_exited(tmp_path: Path):
    log = tmp_path / "stops.log"
    children = supervisor.Children(env=dict(os.environ), echo=False, log_dir=None, wake=threading.Event())
    children.start("relay", [sys.executable, "-c", _STOPPING_CHILD, str(log), "relay", "fast"], "ready")
    children.start("worker", [sys.executable, "-c", _STOPPING_CHILD, str(log), "worker", "fast"], "ready")
    children.start("api", [sys.executable, "-c", _STOPPING_CHILD, str(log), "api", "slow"], "ready", stop_stage=0)
    wait_until(children.all_ready, 30, "three children ready")

    children.stop(hurry=threading.Event())

    lines = log.read_text().splitlines()
    assert lines[:2] == ["api got SIGTERM", "api exited"], lines
    assert sorted(lines[2:]) == ["relay got SIGTERM", "worker got SIGTERM"], lines
    assert all(c.popen.returncode == 0 for c in children.children)
