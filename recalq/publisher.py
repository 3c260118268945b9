"""Publishes outbox messages as Celery tasks: the `publish` callable the relay is handed.

Each message keeps the task id fixed when its job was inserted, so Flower, logs and Postgres
all name a job the same way, and a re-publication is recognisably the same job.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError

from outbox.errors import PublishFailed
from outbox.relay import OutboxMessage


class CeleryPublisher:
    def __init__(self, app: Celery, queue: str) -> None:
        self._app = app
        self._queue = queue
        connection = app.connection_for_write()
        #: Broker errors that mean "not published": transport, channel and socket failures.
        self._errors: tuple[type[BaseException], ...] = (
            KombuError,
            OSError,
            *connection.connection_errors,
            *connection.channel_errors,
        )
        connection.release()

    def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        published: list[int] = []
        current: OutboxMessage | None = None
        try:
            with self._app.producer_or_acquire() as producer:
                for current in messages:
                    self._app.send_task(
                        current.task,
                        kwargs={"job_id": current.job_id, "payload": current.payload},
                        task_id=str(current.task_id),
                        queue=self._queue,
                        producer=producer,
                        # The relay retries a refused batch itself, with backoff; Celery's
                        # own publish retries would stretch one failure past the claim lease.
                        retry=False,
                    )
                    published.append(current.job_id)
        except self._errors as exc:
            job = current.job_id if current is not None else "?"
            raise PublishFailed(f"broker did not take job {job}: {exc!r}", published) from exc
