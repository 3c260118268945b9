"""`recalq --help` and every subcommand's help, and the sentences the CLI answers bad settings
and bad arguments with. In-process: argparse and Settings only, no database."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from recalq import cli

OPERATOR_COMMANDS = ("status", "jobs", "requeue", "drain", "purge-dead", "cancel")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def words(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RECALQ_") or n in {"DATABASE_URL", "BROKER_URL"}]:
        monkeypatch.delenv(name)


def test_the_commands_ops_expect_are_all_there() -> None:
    assert {"up", "demo", "migrate", "relay", "worker", "api", "new-key", *OPERATOR_COMMANDS} <= set(subcommands())


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_subcommand_help_exits_0_and_shows_its_description(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    description = subcommands()[name].description
    assert description and len(description.split()) >= 8, f"`recalq {name}` needs a description of what it does"

    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])

    assert exited.value.code == 0
    shown = words(capsys.readouterr().out)
    assert shown.startswith(f"usage: recalq {name}")
    assert words(description) in shown


@pytest.mark.parametrize("name", OPERATOR_COMMANDS)
def test_the_operator_commands_help_ends_with_examples_that_use_the_command(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    examples = out.split("examples:\n", 1)[1]
    assert re.search(rf"^  recalq {name}\b", examples, re.MULTILINE), examples


def test_the_top_level_help_names_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in subcommands():
        assert re.search(rf"^    {re.escape(name)}\s", out, re.MULTILINE), f"{name} is missing from:\n{out}"


def test_an_invalid_setting_exits_2_with_a_sentence_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECALQ_MAX_ATTEMPTS", "500")

    assert cli.main(["status"]) == 2

    err = capsys.readouterr().err
    assert err == "recalq: invalid settings: RECALQ_MAX_ATTEMPTS: input should be less than or equal to 100.\n"


def test_settings_that_contradict_each_other_are_named_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECALQ_TASK_SOFT_TIME_LIMIT", "100")
    monkeypatch.setenv("RECALQ_TASK_TIME_LIMIT", "90")

    assert cli.main(["jobs"]) == 2

    assert capsys.readouterr().err == "recalq: invalid settings: task_soft_time_limit must be below task_time_limit.\n"


def test_a_bad_database_url_names_the_variable_with_its_alias(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "db.example.com/recalq")

    assert cli.main(["status"]) == 2

    assert "database_url must be a URL with a scheme, got 'db.example.com/recalq'" in capsys.readouterr().err


@pytest.mark.parametrize("name", OPERATOR_COMMANDS)
def test_an_operator_command_without_database_url_exits_2_saying_so(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RECALQ_DATA_DIR", str(tmp_path / "var"))  # no `recalq up` runs there
    argv = {"requeue": [name, "--all", "--yes"], "purge-dead": [name, "--all", "--yes"],
            "cancel": [name, "1"]}.get(name, [name])

    assert cli.main(argv) == 2

    assert capsys.readouterr().err.startswith(f"recalq {name}: DATABASE_URL is not set;")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs", "--status", "zombie"], "argument --status: invalid choice: 'zombie' (choose from 'pending', "
                                         "'published', 'running', 'retrying', 'done', 'dead', 'superseded', "
                                         "'cancelled')"),
        (["jobs", "--limit", "0"], "argument --limit: 0 is out of range; use 1 to 200"),
        (["jobs", "--limit", "lots"], "argument --limit: 'lots' is not a whole number"),
        (["requeue"], "one of the arguments JOB_ID --key --all is required"),
        (["requeue", "12", "--all"], "argument --all: not allowed with argument JOB_ID"),
        (["requeue", "-3"], "argument JOB_ID: -3 is out of range"),
        (["drain", "--timeout", "-1"], "argument --timeout: -1 must be a positive number of seconds"),
        (["drain", "--interval", "nan"], "argument --interval: nan must be a positive number of seconds"),
    ],
)
def test_bad_arguments_exit_2_with_a_sentence_naming_the_argument(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
