"""The one settings object, read from the environment once per process.

Every knob has a safe default so a fresh machine runs with none set. With no DATABASE_URL or
BROKER_URL, `recalq up` starts embedded PostgreSQL and Redis and fills these in for its
child processes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: RabbitMQ's default consumer_timeout (30 min): a delivery left unacknowledged longer closes its
#: channel. A late-acked retry stays unacknowledged through its countdown and then its run.
RABBITMQ_CONSUMER_TIMEOUT_SECONDS = 1800.0
#: `scheme://`: urlsplit alone would take "localhost:5432/db" for a URL with scheme "localhost".
_URL_WITH_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECALQ_", extra="ignore", frozen=True)

    #: libpq URL of the database, e.g. postgresql://app@db:5432/recalq. None: embedded.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("RECALQ_DATABASE_URL", "DATABASE_URL")
    )
    #: Celery broker URL: amqp://... (RabbitMQ, recommended) or redis://... None: embedded.
    broker_url: str | None = Field(
        default=None, validation_alias=AliasChoices("RECALQ_BROKER_URL", "BROKER_URL")
    )
    #: Where embedded services keep their data, and other local state.
    data_dir: Path = Path("var")
    #: Celery queue the recalculations travel on.
    queue: str = "recalq"

    #: Attempts before a recalculation is DEAD (G5); applied to its task by `recalq migrate`.
    max_attempts: int = Field(default=5, ge=1, le=100)
    #: Retry delay after the first failed attempt; doubles per attempt up to retry_max_seconds.
    retry_base_seconds: float = Field(default=10.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    #: Jitter as a fraction of the delay: 0.2 spreads each delay over +-20 %.
    retry_jitter: float = Field(default=0.2, ge=0, lt=1)
    #: Cap on the wait between retries after infrastructure errors (these never count).
    infra_retry_max_seconds: float = Field(default=30.0, gt=0)
    #: How soon a job retries when another job of its key is running.
    busy_retry_seconds: float = Field(default=0.25, gt=0)
    #: Least time between the starts of two recalculations of one property. A change commits a
    #: job due at once unless the property's last recalculation started less than this long
    #: ago; then the job is due this long after that start, and the changes that follow join
    #: it. 0: every job is due at once (each property is recalculated about once per pipeline
    #: cycle while a burst lasts). Raise it for bursty imports: a burst of B seconds then costs
    #: about B / this + 2 recalculations per property, and a second edit waits up to this long.
    #: Applied to the recalculation task by `recalq migrate`.
    recalc_min_interval_seconds: float = Field(default=0.0, ge=0, le=3600)

    #: The recalculation's running attempt lease (after it, the job may be taken over; above
    #: task_time_limit) and its Celery time limits. Applied to its outbox_task row by
    #: `recalq migrate`; each message carries its task's limits, and the worker's task_time_limit
    #: is only the fallback for a message without them.
    job_lease_seconds: float = Field(default=120.0, gt=0)
    task_soft_time_limit: float = Field(default=60.0, gt=0)
    task_time_limit: float = Field(default=90.0, gt=0)
    #: How long a recalculation waits for a property's row lock before the attempt fails.
    lock_timeout_ms: int = Field(default=5000, ge=0)

    #: Relay: rows claimed per batch, fallback poll interval, and the claim lease that lets
    #: another relay re-publish rows of a relay that died mid-batch.
    relay_batch_size: int = Field(default=500, ge=1, le=10000)
    relay_poll_seconds: float = Field(default=1.0, gt=0)
    relay_claim_lease_seconds: float = Field(default=30.0, gt=0)
    #: Rescue (G7): a job published or due this long ago that has not started is presumed
    #: lost and its message re-sent; relays look for such jobs every rescue_interval_seconds.
    rescue_after_seconds: float = Field(default=300.0, gt=0)
    rescue_interval_seconds: float = Field(default=30.0, gt=0)
    #: Bound on one publish attempt when the broker hangs.
    broker_timeout_seconds: float = Field(default=10.0, gt=0)

    #: celery beat (all times UTC). Expiry rollover runs daily at rollover_hour_utc:05.
    rollover_hour_utc: int = Field(default=0, ge=0, le=23)
    #: Finished (done/superseded) jobs and their requests are pruned this long after they
    #: finished; a request's correlation id is refused as a repeat only while it is kept.
    #: DEAD jobs are never pruned.
    prune_after_days: float = Field(default=14.0, gt=0)
    #: Drift sweep: verification runs for every scored property, daily at drift_sweep_hour_utc:00,
    #: this many properties per task so the sweep never holds a worker for long.
    drift_sweep_hour_utc: int = Field(default=3, ge=0, le=23)
    drift_sweep_batch_size: int = Field(default=500, ge=1, le=10000)
    #: Hard time limit of one maintenance task (rollover, rescue, prune, one drift sweep batch);
    #: the soft limit is 90 % of it. Well below RabbitMQ's consumer_timeout (late acks).
    maintenance_time_limit_seconds: float = Field(default=600.0, gt=0)

    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=4, ge=1)
    #: How long a task waits for a pooled connection before treating the database as unavailable.
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    worker_concurrency: int = Field(default=2, ge=1)

    #: HTTP API (`recalq api`, and part of `recalq up`). Loopback unless told otherwise.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    #: Database connections of one API process (workers use db_pool_max_size per child).
    api_db_pool_size: int = Field(default=8, ge=1, le=200)
    #: Requests one API process runs at once; None: api_db_pool_size, so no request ever waits
    #: for a connection. The next api_max_waiting wait at most api_max_wait_seconds for a turn;
    #: past that the API answers 503 with Retry-After at once (api/admission.py).
    api_max_in_flight: int | None = Field(default=None, ge=1, le=1000)
    api_max_waiting: int = Field(default=128, ge=0, le=100_000)
    api_max_wait_seconds: float = Field(default=2.0, ge=0, le=60)
    #: One caller (one token or key) may run this share of the slots, and have this share of
    #: api_max_waiting waiting, and start this many requests per second (bursts of
    #: api_caller_burst); past the queue or the rate it gets 429 with Retry-After while other
    #: callers go on. A freed slot goes to the caller running the fewest requests.
    api_caller_share: float = Field(default=0.5, gt=0, le=1)
    api_caller_rate_per_second: float = Field(default=100.0, gt=0)
    api_caller_burst: int = Field(default=200, ge=1)
    #: Job streams (GET /api/jobs/{id}/events): open streams one owner may hold in one API
    #: process, how often a stream's job is polled when a notification may have been lost, the
    #: heartbeat comment's interval, and how long a send may wait on a client that stopped reading.
    api_max_streams_per_owner: int = Field(default=20, ge=1, le=10_000)
    api_stream_poll_seconds: float = Field(default=2.0, gt=0, le=60)
    api_stream_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    api_stream_send_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    #: Admin API keys (X-API-Key), comma-separated. Several at once let a key be rotated
    #: without downtime: add the new one, move callers, remove the old one. Kept in memory only
    #: as SHA-256 digests. Empty: admin endpoints answer 503 until one is set.
    admin_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    #: Property evaluations: the providers' base URL (`GET {url}/lookup/{stage}?address=`); unset,
    #: the provider simulator on 127.0.0.1:8099, which `recalq up` and `recalq demo` start. Each
    #: look-up waits this long for an answer and is tried this many times (short backoff) before
    #: its stage fails the attempt.
    evaluation_provider_url: str | None = None
    evaluation_provider_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    evaluation_provider_tries: int = Field(default=3, ge=1, le=10)
    #: A web page session (sign-in with a client token or an admin key) lasts this long; the
    #: cookie and its signature both expire then, and signing out or revoking ends it sooner.
    web_session_seconds: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)
    #: Flower (`recalq flower`, and part of `recalq up`): loopback unless told otherwise, and
    #: never without HTTP basic auth, "user:password" (password of at least 12 characters, no
    #: comma). Unset: `recalq flower` refuses to start and `recalq up` makes a password in
    #: DATA_DIR/flower-password (user admin).
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=0, le=65535)
    flower_basic_auth: SecretStr | None = None
    #: Celery's task-sent event: one more message per published job, so Flower lists a job as
    #: SENT while it waits in the queue. It costs the relay about a fifth of its publish rate
    #: (bench/relay_throughput.py); turn it off where nobody watches the queue in Flower.
    task_sent_events: bool = True
    #: Uploaded documents, content-addressed by SHA-256. Default: DATA_DIR/documents.
    storage_dir: Path | None = None
    #: Upload limits: one file, one whole request (multipart or ZIP), and a ZIP's contents.
    max_file_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(default=60 * 1024 * 1024, ge=1)
    #: A request body whose next part does not arrive within this long, or that is not all
    #: there within the total, is cut off with 408 (a stalled client gives its slot back).
    api_body_idle_timeout_seconds: float = Field(default=30.0, gt=0)
    api_body_total_timeout_seconds: float = Field(default=300.0, gt=0)
    max_zip_total_uncompressed_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    max_zip_ratio: float = Field(default=100.0, gt=1)

    #: Test hook, e.g. "relay.after_publish=kill"; see recalq/faults.py. Never set in production.
    fault: str | None = None

    @field_validator("admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("admin_api_keys")
    @classmethod
    def _keys_are_long_enough(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for key in value:
            if len(key.get_secret_value()) < 24:
                raise ValueError("every admin API key must be at least 24 characters (use `recalq new-key`)")
        return value

    @field_validator("flower_basic_auth", mode="before")
    @classmethod
    def _blank_basic_auth_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("flower_basic_auth")
    @classmethod
    def _basic_auth_is_user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        # Flower splits its basic_auth option at commas: a comma would silently break the login.
        if value is not None:
            user, colon, password = value.get_secret_value().partition(":")
            if not colon or not user.strip() or len(password) < 12 or "," in value.get_secret_value():
                raise ValueError("flower_basic_auth must be user:password, the password at least 12 characters, "
                                 "no comma")
        return value

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("task_soft_time_limit must be below task_time_limit")
        if self.task_time_limit >= self.job_lease_seconds:
            raise ValueError(
                "job_lease_seconds must exceed task_time_limit, or a slow but live attempt "
                "could be taken over"
            )
        if self.retry_base_seconds > self.retry_max_seconds:
            raise ValueError("retry_base_seconds must not exceed retry_max_seconds")
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError("db_pool_min_size must not exceed db_pool_max_size")
        longest_countdown = self.longest_retry_countdown
        if longest_countdown + self.task_time_limit >= RABBITMQ_CONSUMER_TIMEOUT_SECONDS:
            raise ValueError(
                f"the longest retry countdown ({longest_countdown:g} s) plus task_time_limit must stay below "
                f"{RABBITMQ_CONSUMER_TIMEOUT_SECONDS:g} s (RabbitMQ's consumer_timeout, and well below the Redis "
                "visibility timeout), or a waiting retry is redelivered and runs twice"
            )
        if self.maintenance_time_limit_seconds >= RABBITMQ_CONSUMER_TIMEOUT_SECONDS:
            raise ValueError(
                f"maintenance_time_limit_seconds must stay below {RABBITMQ_CONSUMER_TIMEOUT_SECONDS:g} s "
                "(RabbitMQ's consumer_timeout), or a long maintenance task is redelivered and runs twice"
            )
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError("max_file_bytes must not exceed max_request_bytes")
        for name in ("database_url", "broker_url"):
            url = getattr(self, name)
            if url is not None and not _URL_WITH_SCHEME.match(url):
                raise ValueError(f"{name} must be a URL with a scheme, got {url!r}")
        return self

    @property
    def longest_retry_countdown(self) -> float:
        """The longest countdown a retry message can carry. Busy retries are jittered up to
        +20 % (outbox/runner.py)."""
        return max(self.retry_max_seconds, self.infra_retry_max_seconds, 1.2 * self.busy_retry_seconds)

    @property
    def document_dir(self) -> Path:
        return self.storage_dir if self.storage_dir is not None else self.data_dir / "documents"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.broker_url is None

    @property
    def conninfo(self) -> str:
        """The database URL as libpq understands it."""
        return _libpq_url(self._require("database_url"))

    @property
    def sqlalchemy_url(self) -> str:
        url = _libpq_url(self._require("database_url"))
        return "postgresql+psycopg://" + url.split("://", 1)[1]

    @property
    def broker_is_rabbitmq(self) -> bool:
        return self._require("broker_url").split("://", 1)[0] in {"amqp", "pyamqp", "amqps"}

    def _require(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"{name} is not set; run `recalq up` for the embedded defaults or set "
                f"{name.upper()}"
            )
        return value


def _libpq_url(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if scheme in {"postgresql+psycopg", "postgres", "postgresql"}:
        return "postgresql://" + rest
    raise ValueError(f"database_url must be a postgresql:// URL, got scheme {scheme!r}")
