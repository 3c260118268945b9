"""Reliability lint of the Celery configuration (research T09b).

Each setting here is what stands between a broker quirk and a lost or doubled job: pickle
means code execution for anyone who can write to the broker; early acks lose the task of a
killed worker; a visibility or consumer timeout shorter than a retry's wait redelivers it.
"""

from __future__ import annotations

import os

import pytest
from celery.app.defaults import DEFAULTS
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from recalq.celery_config import celery_config
from recalq.settings import Settings

PG = "postgresql://app@db.example:5432/recalq"
RABBITMQ = "amqp://guest:guest@mq.example:5672//"
REDIS = "redis://cache.example:6379/0"
#: RabbitMQ's default consumer_timeout since 3.8.17 (research/reliability.md).
RABBITMQ_CONSUMER_TIMEOUT_SECONDS = 30 * 60
BROKERS = pytest.mark.parametrize("broker", [RABBITMQ, REDIS], ids=["rabbitmq", "redis"])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("RECALQ_") or name.upper() in {"DATABASE_URL", "BROKER_URL"}:
            monkeypatch.delenv(name)


def config_for(broker: str, **overrides) -> dict:
    return celery_config(Settings(database_url=PG, broker_url=broker, **overrides))


def longest_countdown(s: Settings) -> float:
    """The longest wait a retry can ask for: the retry caps, and busy retries jittered by +20 %."""
    return max(s.retry_max_seconds, s.infra_retry_max_seconds, 1.2 * s.busy_retry_seconds)


@BROKERS
def test_every_key_is_a_setting_celery_knows(broker):
    # A misspelt key is silently ignored by Celery, so the reliability choice would not apply.
    assert sorted(set(config_for(broker)) - set(DEFAULTS)) == []


@BROKERS
def test_only_json_is_sent_or_accepted(broker):
    config = config_for(broker)
    assert config["accept_content"] == ["json"]
    assert config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == config["event_serializer"] == "json"


@BROKERS
def test_a_message_is_acknowledged_only_after_its_task_and_requeued_if_the_worker_dies(broker):
    config = config_for(broker)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["worker_cancel_long_running_tasks_on_connection_loss"] is True


def test_publishes_to_rabbitmq_wait_for_the_broker_confirm_with_bounded_timeouts():
    options = config_for(RABBITMQ, broker_timeout_seconds=7)["broker_transport_options"]
    assert options["confirm_publish"] is True
    assert options["connect_timeout"] == options["read_timeout"] == options["write_timeout"] == 7
    assert "visibility_timeout" not in options


def test_redis_gets_a_visibility_timeout_and_bounded_socket_timeouts():
    options = config_for(REDIS, broker_timeout_seconds=7)["broker_transport_options"]
    assert options["visibility_timeout"] > 0
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 7
    assert "confirm_publish" not in options


def test_with_default_settings_a_waiting_retry_outlives_neither_broker_timeout():
    s = Settings(database_url=PG, broker_url=REDIS)
    config = celery_config(s)
    held = longest_countdown(s) + config["task_time_limit"]
    assert config["broker_transport_options"]["visibility_timeout"] > held
    assert held < RABBITMQ_CONSUMER_TIMEOUT_SECONDS
    assert config["task_time_limit"] < RABBITMQ_CONSUMER_TIMEOUT_SECONDS


@st.composite
def knobs(draw) -> dict[str, float]:
    """Time knobs that pass the simple range checks, many of them near the broker timeouts."""
    hard = draw(st.floats(min_value=2, max_value=2_500))
    retry_max = draw(st.floats(min_value=1, max_value=2_500))
    return {
        "task_time_limit": hard,
        "task_soft_time_limit": hard * draw(st.floats(min_value=0.1, max_value=0.9)),
        "job_lease_seconds": hard + 1,
        "retry_max_seconds": retry_max,
        "retry_base_seconds": min(1.0, retry_max),
        "infra_retry_max_seconds": draw(st.floats(min_value=0.01, max_value=2_500)),
        "busy_retry_seconds": draw(st.floats(min_value=0.01, max_value=2_000)),
    }


@settings(max_examples=100, deadline=None)
@given(knobs(), st.sampled_from([RABBITMQ, REDIS]))
def test_no_accepted_settings_let_a_waiting_retry_outlive_a_broker_timeout(overrides, broker):
    try:
        s = Settings(database_url=PG, broker_url=broker, **overrides)
    except ValidationError as refused:
        assert "longest retry countdown" in str(refused)
        return
    config = celery_config(s)
    held = longest_countdown(s) + config["task_time_limit"]
    assert held < RABBITMQ_CONSUMER_TIMEOUT_SECONDS
    if not s.broker_is_rabbitmq:
        assert config["broker_transport_options"]["visibility_timeout"] > held


@BROKERS
def test_time_limits_come_from_settings_with_the_soft_limit_first(broker):
    config = config_for(broker, task_soft_time_limit=20, task_time_limit=30, job_lease_seconds=40)
    assert (config["task_soft_time_limit"], config["task_time_limit"]) == (20, 30)


@BROKERS
def test_schedules_and_timestamps_are_in_utc(broker):
    config = config_for(broker)
    assert config["timezone"] == "UTC"
    assert config["enable_utc"] is True


@BROKERS
def test_the_broker_queue_and_concurrency_come_from_settings(broker):
    config = config_for(broker, queue="q-test", worker_concurrency=3)
    assert config["broker_url"] == broker
    assert config["task_default_queue"] == "q-test"
    assert config["worker_concurrency"] == 3
    assert config["task_create_missing_queues"] is True


@BROKERS
def test_task_results_are_not_stored_since_postgres_holds_each_jobs_outcome(broker):
    assert config_for(broker)["task_ignore_result"] is True


@BROKERS
def test_workers_send_task_events_and_the_relay_a_task_sent_event_unless_turned_off(broker):
    assert config_for(broker)["worker_send_task_events"] is True
    assert config_for(broker)["task_send_sent_event"] is True
    assert config_for(broker, task_sent_events=False)["task_send_sent_event"] is False
