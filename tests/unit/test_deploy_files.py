"""deploy/: the Procfile, the compose file, the systemd units and env.example say what the code
does. Docker and systemd do not run here, so the files are read as data and checked against
the CLI's subcommands and the Settings fields, which keeps them from falling behind."""

from __future__ import annotations

import argparse
import configparser
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from recalq import cli
from recalq.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROCESSES = ("api", "relay", "worker", "beat", "flower")
#: Variables env.example may set that are not recalq settings: compose builds its URLs from them.
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "RABBITMQ_PASSWORD"}
ALIASES = {"database_url": "DATABASE_URL", "broker_url": "BROKER_URL"}
#: Settings whose example value is an illustration, not the default.
EXAMPLE_VALUES = {"database_url", "broker_url"}


def subcommands() -> set[str]:
    [commands] = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(commands.choices)


def recalq_command(argv: list[str]) -> str:
    """The subcommand of a `recalq ...` command line, checked to exist."""
    assert Path(argv[0]).name == "recalq", argv
    assert argv[1] in subcommands(), f"`recalq {argv[1]}` is not a command: {argv}"
    return argv[1]


# -- Procfile --------------------------------------------------------------------------------


def procfile() -> dict[str, str]:
    lines = [line for line in (DEPLOY / "Procfile").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split(": ", 1) for line in lines)


def test_the_procfile_runs_each_process_with_its_recalq_command() -> None:
    processes = procfile()
    assert tuple(processes) == PROCESSES
    for name, command in processes.items():
        assert recalq_command(command.split()) == name


# -- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_the_databases_a_one_shot_migration_and_every_process(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "rabbitmq", "migrate", *PROCESSES}
    assert recalq_command(services["migrate"]["command"]) == "migrate"
    assert services["migrate"]["restart"] == "no"
    for name in PROCESSES:
        assert recalq_command(services[name]["command"]) == name
        assert services[name]["restart"] == "unless-stopped"


def test_compose_starts_processes_after_healthy_services_and_a_successful_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    conditions = {name: {dep: spec["condition"] for dep, spec in service.get("depends_on", {}).items()}
                  for name, service in services.items()}
    assert conditions["migrate"] == {"postgres": "service_healthy"}
    for name in ("api", "relay", "worker", "beat"):
        assert conditions[name]["migrate"] == "service_completed_successfully", name
    for name in ("relay", "worker", "beat", "flower"):
        assert conditions[name]["rabbitmq"] == "service_healthy", name
    for name in ("postgres", "rabbitmq", "api", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_compose_gives_every_recalq_container_the_env_file_and_the_service_urls(compose: dict[str, Any]) -> None:
    for name in ("migrate", *PROCESSES):
        service = compose["services"][name]
        assert service["env_file"] == ".env", name
        env = service["environment"]
        assert env["RECALQ_DATABASE_URL"].startswith("postgresql://recalq:${POSTGRES_PASSWORD:?"), name
        assert env["RECALQ_DATABASE_URL"].endswith("@postgres:5432/recalq"), name
        assert env["RECALQ_BROKER_URL"].endswith("@rabbitmq:5672/recalq"), name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_publishes_flower_and_every_other_port_on_loopback_only(compose: dict[str, Any]) -> None:
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published["flower"] == ["127.0.0.1:5555:5555"]
    assert compose["services"]["flower"]["environment"]["RECALQ_FLOWER_PORT"] == "5555"
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"


def test_compose_runs_exactly_one_beat_and_lets_workers_finish_their_tasks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["beat"]["deploy"]["replicas"] == 1
    grace = int(services["worker"]["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["task_time_limit"].default


def test_the_image_copies_every_package_the_wheel_ships() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "packages"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in packages:
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.MULTILINE), package


# -- systemd ---------------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_each_process_has_a_systemd_unit_in_recalq_target_running_its_command() -> None:
    wanted = unit("recalq.target")["Unit"]["Wants"].split()
    assert sorted(wanted) == sorted(["recalq-migrate.service", *(f"recalq-{p}.service" for p in PROCESSES)])
    for name in ("migrate", *PROCESSES):
        service = unit(f"recalq-{name}.service")
        assert service["Unit"]["PartOf"] == "recalq.target"
        assert service["Install"]["WantedBy"] == "recalq.target"
        assert recalq_command(service["Service"]["ExecStart"].split()) == name
        assert service["Service"]["EnvironmentFile"] == "/etc/recalq/recalq.env"
        assert service["Service"]["User"] == "recalq"
        if name != "migrate":
            assert service["Service"]["Restart"] == "on-failure"
    assert unit("recalq-migrate.service")["Service"]["Type"] == "oneshot"


def test_processes_that_use_the_database_wait_for_the_migration() -> None:
    for name in ("api", "relay", "worker"):
        service = unit(f"recalq-{name}.service")["Unit"]
        assert "recalq-migrate.service" in service["Requires"].split()
        assert "recalq-migrate.service" in service["After"].split()


def test_the_worker_unit_stops_warm_within_more_than_the_task_time_limit() -> None:
    service = unit("recalq-worker.service")["Service"]
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > Settings.model_fields["task_time_limit"].default


# -- env.example -----------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    """Every variable env.example names, set or commented out, with its example value."""
    found = re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$", (DEPLOY / "env.example").read_text(), re.MULTILINE)
    return dict(found)


def variable(field: str) -> str:
    return ALIASES.get(field, f"RECALQ_{field.upper()}")


def test_env_example_lists_every_setting() -> None:
    named = env_example()
    missing = [variable(field) for field in Settings.model_fields if variable(field) not in named]
    assert missing == [], f"add these settings to deploy/env.example: {missing}"


def test_env_example_names_no_variable_that_is_not_a_setting() -> None:
    settings = {variable(field) for field in Settings.model_fields}
    unknown = sorted(set(env_example()) - settings - COMPOSE_ONLY)
    assert unknown == [], f"deploy/env.example names variables recalq does not read: {unknown}"


def test_env_example_values_load_as_valid_settings_equal_to_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("RECALQ_") or n in {"DATABASE_URL", "BROKER_URL"}]:
        monkeypatch.delenv(name)
    example = Settings(_env_file=DEPLOY / "env.example")  # type: ignore[call-arg]
    defaults = Settings()
    differing = {field for field in Settings.model_fields if getattr(example, field) != getattr(defaults, field)}
    assert differing == EXAMPLE_VALUES
