"""The settings object: safe defaults, the environment names ops use, and refusal of knob
combinations that would break a guarantee at run time instead of at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from recalq.settings import Settings

PG = "postgresql://app@db.example:5432/recalq"
AMQP = "amqp://guest:guest@mq.example:5672//"
REDIS = "redis://cache.example:6379/0"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Runs every test as on a fresh machine, whatever the developer's shell exports."""
    for name in list(os.environ):
        if name.upper().startswith("RECALQ_") or name.upper() in {"DATABASE_URL", "BROKER_URL"}:
            monkeypatch.delenv(name)


def make(**overrides) -> Settings:
    return Settings(**{"database_url": PG, "broker_url": AMQP, **overrides})


def test_with_nothing_configured_every_knob_has_its_documented_default():
    s = Settings()
    assert s.database_url is None and s.broker_url is None
    assert s.embedded
    assert s.data_dir == Path("var")
    assert s.queue == "recalq"
    assert s.max_attempts == 5
    assert (s.retry_base_seconds, s.retry_max_seconds, s.retry_jitter) == (10.0, 600.0, 0.2)
    assert s.infra_retry_max_seconds == 30.0
    assert s.task_soft_time_limit < s.task_time_limit < s.job_lease_seconds
    assert (s.task_soft_time_limit, s.task_time_limit, s.job_lease_seconds) == (60.0, 90.0, 120.0)
    assert s.lock_timeout_ms == 5000
    assert (s.relay_batch_size, s.relay_poll_seconds, s.relay_claim_lease_seconds) == (500, 1.0, 30.0)
    assert s.broker_timeout_seconds == 10.0
    assert (s.db_pool_min_size, s.db_pool_max_size) == (1, 4)
    assert s.worker_concurrency == 2
    assert s.fault is None


@pytest.mark.parametrize("variable", ["DATABASE_URL", "RECALQ_DATABASE_URL"])
def test_the_database_url_is_read_from_either_environment_name(monkeypatch, variable):
    monkeypatch.setenv(variable, PG)
    assert Settings().database_url == PG


@pytest.mark.parametrize("variable", ["BROKER_URL", "RECALQ_BROKER_URL"])
def test_the_broker_url_is_read_from_either_environment_name(monkeypatch, variable):
    monkeypatch.setenv(variable, REDIS)
    assert Settings().broker_url == REDIS


def test_the_recalq_prefixed_name_wins_over_the_generic_one(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://generic/db")
    monkeypatch.setenv("RECALQ_DATABASE_URL", PG)
    monkeypatch.setenv("BROKER_URL", REDIS)
    monkeypatch.setenv("RECALQ_BROKER_URL", AMQP)
    s = Settings()
    assert (s.database_url, s.broker_url) == (PG, AMQP)


def test_explicit_arguments_override_the_environment(monkeypatch):
    monkeypatch.setenv("RECALQ_DATABASE_URL", "postgresql://from-env/db")
    monkeypatch.setenv("RECALQ_MAX_ATTEMPTS", "9")
    s = Settings(database_url=PG, max_attempts=3)
    assert (s.database_url, s.max_attempts) == (PG, 3)


def test_other_knobs_are_read_from_recalq_prefixed_variables_and_converted(monkeypatch):
    monkeypatch.setenv("RECALQ_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("RECALQ_RETRY_JITTER", "0.1")
    monkeypatch.setenv("RECALQ_DATA_DIR", "/srv/recalq")
    monkeypatch.setenv("RECALQ_FAULT", "relay.after_publish=kill")
    monkeypatch.setenv("MAX_ATTEMPTS", "99")  # unprefixed: not ours
    s = Settings()
    assert (s.max_attempts, s.retry_jitter, s.data_dir) == (7, 0.1, Path("/srv/recalq"))
    assert s.fault == "relay.after_publish=kill"


def test_a_value_that_does_not_parse_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("RECALQ_MAX_ATTEMPTS", "five")
    with pytest.raises(ValidationError, match="max_attempts"):
        Settings()


def test_settings_cannot_be_changed_after_start_up():
    s = make()
    with pytest.raises(ValidationError):
        s.max_attempts = 50  # type: ignore[misc]


# -- the consistency validator ------------------------------------------------------------

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"task_soft_time_limit": 90, "task_time_limit": 90}, "task_soft_time_limit must be below",
                     id="soft-equal-to-hard"),
        pytest.param({"task_soft_time_limit": 100, "task_time_limit": 90}, "task_soft_time_limit must be below",
                     id="soft-above-hard"),
        pytest.param({"task_time_limit": 120, "job_lease_seconds": 120}, "job_lease_seconds must exceed",
                     id="lease-equal-to-time-limit"),
        pytest.param({"task_time_limit": 100, "job_lease_seconds": 95}, "job_lease_seconds must exceed",
                     id="lease-below-time-limit"),
        pytest.param({"retry_base_seconds": 700, "retry_max_seconds": 600}, "retry_base_seconds must not exceed",
                     id="base-above-cap"),
        pytest.param({"db_pool_min_size": 5, "db_pool_max_size": 4}, "db_pool_min_size must not exceed",
                     id="pool-min-above-max"),
        pytest.param({"database_url": "db.example/recalq"}, "database_url must be a URL with a scheme",
                     id="database-url-without-scheme"),
        pytest.param({"database_url": "localhost:5432/recalq"}, "database_url must be a URL with a scheme",
                     id="database-host-port-without-scheme"),
        pytest.param({"database_url": "host=db dbname=recalq"}, "database_url must be a URL with a scheme",
                     id="database-keyword-string"),
        pytest.param({"broker_url": "localhost:5672"}, "broker_url must be a URL with a scheme",
                     id="broker-host-port-without-scheme"),
        pytest.param({"broker_url": "mq.example"}, "broker_url must be a URL with a scheme",
                     id="broker-host-only"),
        pytest.param({"retry_max_seconds": 1750}, "longest retry countdown", id="retry-cap-near-consumer-timeout"),
        pytest.param({"retry_max_seconds": float("inf")}, "longest retry countdown", id="infinite-retry-cap"),
        pytest.param({"infra_retry_max_seconds": 1800}, "longest retry countdown", id="infra-retry-cap"),
        pytest.param({"busy_retry_seconds": 1500}, "longest retry countdown", id="busy-retry"),
        pytest.param({"task_soft_time_limit": 1100, "task_time_limit": 1200, "job_lease_seconds": 1300},
                     "longest retry countdown", id="time-limit-plus-countdown"),
    ],
)
def test_inconsistent_settings_are_refused_at_start_up_with_a_reason(overrides, message):
    with pytest.raises(ValidationError, match=message):
        make(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"max_attempts": 0}, id="no-attempts"),
        pytest.param({"retry_base_seconds": 0}, id="zero-retry-base"),
        pytest.param({"retry_jitter": 1}, id="full-jitter"),
        pytest.param({"retry_jitter": -0.1}, id="negative-jitter"),
        pytest.param({"retry_max_seconds": float("nan")}, id="nan-retry-cap"),
        pytest.param({"db_pool_max_size": 0}, id="empty-pool"),
        pytest.param({"db_pool_min_size": -1}, id="negative-pool-min"),
        pytest.param({"relay_batch_size": 0}, id="empty-batch"),
        pytest.param({"lock_timeout_ms": -1}, id="negative-lock-timeout"),
    ],
)
def test_out_of_range_knobs_are_refused(overrides):
    with pytest.raises(ValidationError):
        make(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"db_pool_min_size": 0, "db_pool_max_size": 1}, id="empty-pool-minimum"),
        pytest.param({"db_pool_min_size": 4, "db_pool_max_size": 4}, id="fixed-pool"),
        pytest.param({"retry_base_seconds": 600, "retry_max_seconds": 600}, id="base-equal-to-cap"),
        pytest.param({"task_soft_time_limit": 8, "task_time_limit": 10, "job_lease_seconds": 12,
                      "retry_base_seconds": 0.2, "retry_max_seconds": 1, "busy_retry_seconds": 0.05},
                     id="the-test-harness-knobs"),
        pytest.param({"retry_max_seconds": 1500, "task_time_limit": 299, "job_lease_seconds": 300}, id="just-below"),
        pytest.param({"database_url": "postgresql+psycopg://u@h/d", "broker_url": "redis+socket:///tmp/r.sock"},
                     id="compound-schemes"),
    ],
)
def test_consistent_edge_values_are_accepted(overrides):
    make(**overrides)


# -- derived values ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("url", "conninfo", "sqlalchemy"),
    [
        (PG, PG, "postgresql+psycopg://app@db.example:5432/recalq"),
        ("postgres://u:p@h/d?sslmode=require", "postgresql://u:p@h/d?sslmode=require",
         "postgresql+psycopg://u:p@h/d?sslmode=require"),
        ("postgresql+psycopg://u@h:5433/d", "postgresql://u@h:5433/d", "postgresql+psycopg://u@h:5433/d"),
    ],
)
def test_the_database_url_converts_to_libpq_and_sqlalchemy_forms(url, conninfo, sqlalchemy):
    s = make(database_url=url)
    assert s.conninfo == conninfo
    assert s.sqlalchemy_url == sqlalchemy


def test_a_database_url_that_is_not_postgresql_is_refused_when_used():
    s = make(database_url="mysql://u@h/d")
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        s.conninfo  # noqa: B018
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        s.sqlalchemy_url  # noqa: B018


@pytest.mark.parametrize("attribute", ["conninfo", "sqlalchemy_url"])
def test_using_an_unset_database_url_says_how_to_set_it(attribute):
    s = Settings(broker_url=AMQP)
    with pytest.raises(RuntimeError, match=r"database_url is not set.*recalq up.*DATABASE_URL"):
        getattr(s, attribute)


@pytest.mark.parametrize(
    ("url", "rabbitmq"),
    [
        ("amqp://guest:guest@localhost:5672//", True),
        ("pyamqp://guest@localhost//", True),
        ("amqps://guest@mq.example//", True),
        ("redis://localhost:6379/0", False),
        ("rediss://cache.example:6380/0", False),
        ("redis+socket:///tmp/redis.sock", False),
    ],
)
def test_the_broker_kind_follows_the_url_scheme(url, rabbitmq):
    assert make(broker_url=url).broker_is_rabbitmq is rabbitmq


def test_asking_the_broker_kind_without_a_broker_url_says_how_to_set_it():
    with pytest.raises(RuntimeError, match="broker_url is not set"):
        Settings(database_url=PG).broker_is_rabbitmq  # noqa: B018


@pytest.mark.parametrize(
    ("database", "broker", "embedded"),
    [(None, None, True), (PG, None, True), (None, AMQP, True), (PG, AMQP, False), (PG, REDIS, False)],
)
def test_the_system_runs_embedded_services_unless_both_urls_are_set(database, broker, embedded):
    assert Settings(database_url=database, broker_url=broker).embedded is embedded
