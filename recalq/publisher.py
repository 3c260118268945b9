"""Publishes outbox messages as Celery tasks: the `publish` callable the relay is handed.

Each message keeps the task id fixed when its job was inserted, so Flower, logs and Postgres
all name a job the same way, and a re-publication is recognisably the same job.

`app.send_task` with `confirm_publish` waits for the broker's basic.ack after every message, a
round trip each: about 800 rows/s. `CeleryPublisher` builds the very message send_task would
(Celery protocol 2, same headers, properties, routing and task-sent event) and publishes a
whole batch before waiting:

- RabbitMQ: the channel is in confirm mode and publishes go out back to back; then the
  publisher reads basic.ack/basic.nack frames until every message is answered or
  `confirm_timeout` passes. Only acked messages count as published; nacked and unanswered
  ones are left out of `PublishFailed.published`, so the relay releases them and a later pass
  sends them again under the same task id (a duplicate is a no-op at the worker's fenced start).
- Redis has no confirms: the batch goes out in one pipeline (kombu's `Producer.batch`), and a
  message counts as published once Redis executed the pipeline. A pipeline that failed is
  "delivery uncertain", so nothing of it counts: re-sending is safe, losing is not.

Only broker errors (kombu's, the transport's connection and channel errors, socket errors)
become PublishFailed; anything else is a bug and propagates.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from amqp import spec
from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Connection, Producer
from kombu.exceptions import KombuError

from outbox.errors import PublishFailed
from outbox.relay import OutboxMessage

#: The argsrepr header of a message without positional arguments.
NO_ARGS_REPR = saferepr(())

#: While a batch is written, the socket is read for the broker's answers every this many messages.
READ_EVERY = 128


class CeleryPublisher:
    """Publishes relay batches on one broker connection of its own (one relay thread uses it).

    `confirms=True` is for RabbitMQ (publisher confirms, pipelined per batch); `False` for
    transports without confirms, where a batch is one Redis pipeline when kombu can batch it.
    None decides by the app's transport. `confirm_timeout` bounds the wait for a batch's
    answers; None takes the app's broker_connection_timeout.
    """

    def __init__(
        self, app: Celery, queue: str, *, confirms: bool | None = None, confirm_timeout: float | None = None
    ) -> None:
        self._app = app
        self._queue = queue
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._socket: socket.socket | None = None
        #: Publishes written on the current channel: in confirm mode, a message's delivery tag.
        self._written = 0
        #: Delivery tag -> job id of the task messages awaiting an answer (tags ascend).
        self._unanswered: OrderedDict[int, int] = OrderedDict()
        self._acked: list[int] = []
        #: Queues declared on the current channel.
        self._declared: set[str] = set()
        self._nacked: list[int] = []
        # Settings send_task reads per message, read once (a settings lookup is not free).
        conf = app.conf
        self._confirm_timeout = confirm_timeout or float(conf.broker_connection_timeout or 10.0)
        self._send_sent_event = bool(conf.task_send_sent_event)
        self._serializer = conf.task_serializer
        self._compression = conf.task_compression
        self._delivery_mode = conf.task_default_delivery_mode
        self._routing_key = conf.task_default_routing_key
        self._retry_policy = dict(conf.task_publish_retry_policy or {})
        self._origin = anon_nodename()
        probe = app.connection_for_write()  # not connected: names the transport and its errors
        try:
            self._confirms = probe.transport.driver_type == "amqp" if confirms is None else confirms
            #: Broker errors that mean "not published": transport, channel and socket failures.
            self._errors: tuple[type[BaseException], ...] = (
                KombuError,
                OSError,
                *probe.connection_errors,
                *probe.channel_errors,
            )
            # send_task publishes its task-sent events through a dispatcher that is not enabled:
            # only publish(), with the caller's producer, is used.
            self._events = app.events.Dispatcher(connection=probe, enabled=False)
        finally:
            probe.release()

    # -- the relay's interface ------------------------------------------------------------
    def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        if not messages:
            return
        self._origin = anon_nodename()  # names the process by its pid, so a forked child is itself
        if self._confirms:
            self._publish_confirmed(messages)
        else:
            self._publish_pipelined(messages)

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            except self._errors:
                pass  # closing a broken connection; nothing to save
        self._connection = self._producer = self._socket = None

    def _discard(self) -> None:
        """Drops the connection after a failure, without the closing handshake (a broker that
        stopped answering would make it wait out the read timeout). The next batch reconnects."""
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        self.close()

    # -- RabbitMQ -------------------------------------------------------------------------
    def _publish_confirmed(self, messages: Sequence[OutboxMessage]) -> None:
        self._acked, self._nacked = [], []
        self._unanswered.clear()
        try:
            producer = self._open()
            with self._corked():
                for message in messages:
                    self._unanswered[self._send(producer, message)] = message.job_id
            self._await_answers()
        except self._errors as exc:
            self._discard()
            raise PublishFailed(
                f"broker connection failed ({len(self._acked)} of {len(messages)} confirmed): {exc!r}",
                self._acked,
            ) from exc
        if self._unanswered or self._nacked:
            unanswered = len(self._unanswered)
            if unanswered:
                # Late answers would arrive for tags this publisher no longer tracks.
                self._discard()
            raise PublishFailed(
                f"broker confirmed {len(self._acked)} of {len(messages)} messages "
                f"({len(self._nacked)} nacked, {unanswered} unanswered after "
                f"{self._confirm_timeout:g}s)",
                self._acked,
            )

    @contextmanager
    def _corked(self) -> Iterator[None]:
        """Holds back partial TCP segments while the batch is written (Linux TCP_CORK).

        Each message is its own write; on loopback every small write also runs the receiving
        side's TCP path and wakes the broker. Corked, the kernel sends full segments instead,
        and uncorking sends the rest. Without TCP_CORK (not Linux) writes go out as they are.
        """
        sock, cork = self._socket, getattr(socket, "TCP_CORK", None)
        if sock is None or cork is None:
            yield
            return
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        try:
            yield
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _await_answers(self) -> None:
        assert self._connection is not None
        deadline = time.monotonic() + self._confirm_timeout
        while self._unanswered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError:
                return

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._answer(delivery_tag, multiple, self._acked)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._answer(delivery_tag, multiple, self._nacked)

    def _answer(self, delivery_tag: int, multiple: bool, into: list[int]) -> None:
        unanswered = self._unanswered
        if not multiple:
            job_id = unanswered.pop(delivery_tag, None)
            if job_id is not None:
                into.append(job_id)
            return
        # `multiple`: every tag up to this one. Task-sent events have tags too, not tracked.
        while unanswered:
            tag = next(iter(unanswered))
            if tag > delivery_tag:
                return
            into.append(unanswered.popitem(last=False)[1])

    # -- Redis and other transports without confirms -------------------------------------
    def _publish_pipelined(self, messages: Sequence[OutboxMessage]) -> None:
        sent: list[int] = []
        producer: Producer | None = None
        try:
            producer = self._open()
            # Room for every command of the batch (a task and an event each), so the pipeline
            # runs once, at the end: a failure then leaves nothing half-counted.
            with producer.batch(max_size=4 * len(messages) + 16):
                for message in messages:
                    self._send(producer, message)
                    sent.append(message.job_id)
        except self._errors as exc:
            # Written one by one (no batching): what was sent got through. In a pipeline:
            # uncertain, so none of it counts.
            batched = producer is not None and producer.supports_batch_publish
            published = [] if batched else sent
            self._discard()
            raise PublishFailed(
                f"broker did not take the batch ({len(published)} of {len(messages)} sent): {exc!r}",
                published,
            ) from exc

    # -- shared ---------------------------------------------------------------------------
    def _new_connection(self) -> Connection:
        if self._confirms:
            # Confirm mode is switched on per channel below; py-amqp's confirm_publish would
            # instead wait for each message's ack inside basic_publish.
            return self._app.connection_for_write(transport_options={"confirm_publish": False})
        return self._app.connection_for_write()

    def _open(self) -> Producer:
        if self._producer is not None:
            return self._producer
        connection = self._new_connection()
        try:
            connection.ensure_connection(max_retries=0)  # one attempt: the relay backs off itself
            channel = connection.channel()
            if self._confirms:
                channel.confirm_select()
                channel.events["basic_ack"].add(self._on_ack)
                channel.events["basic_nack"].add(self._on_nack)
                channel.basic_publish = self._pipelined_publish(channel)
            self._written = 0
            producer = Producer(channel, auto_declare=False)
            # send_task declares the task queue with every message; once per channel will do.
            producer.maybe_declare(self._app.amqp.queues[self._queue])
            self._declared = {self._queue}
            if self._send_sent_event:
                # Bound to this channel, the event exchange's per-event declaration is a cache
                # hit instead of a copy of the entity.
                self._events.exchange = self._events.exchange(channel)
                producer.maybe_declare(self._events.exchange)
        except BaseException:
            connection.release()
            raise
        self._connection, self._producer = connection, producer
        # The TCP socket under py-amqp (Redis: none here; its clients live in a pool).
        self._socket = getattr(getattr(connection.connection, "transport", None), "sock", None)
        return producer

    def _pipelined_publish(self, channel: Any) -> Callable[..., None]:
        """The confirm channel's basic.publish: writes the frames and counts the delivery tag.

        py-amqp's own basic_publish also polls the socket before every message (to notice a
        connection.blocked early; it publishes regardless). Here the socket is read every
        READ_EVERY messages instead, and throughout the wait for answers, so the acks the
        broker sends meanwhile are taken in and never pile up in the socket buffers.
        """
        send_method = channel.send_method

        def basic_publish(
            msg: Any, exchange: str = "", routing_key: str = "", mandatory: bool = False,
            immediate: bool = False, timeout: float | None = None, confirm_timeout: float | None = None,
        ) -> None:
            send_method(spec.Basic.Publish, "Bssbb", (0, exchange, routing_key, mandatory, immediate), msg)
            self._written += 1
            if self._written % READ_EVERY == 0:
                self._read_ready()

        return basic_publish

    def _read_ready(self) -> None:
        """Handles the frames already received (acks, nacks), without waiting for more."""
        assert self._connection is not None
        try:
            while True:
                self._connection.drain_events(timeout=0)
        except TimeoutError:
            pass

    def _send(self, producer: Producer, message: OutboxMessage) -> int:
        """Publishes what `app.send_task(task, kwargs=..., task_id=..., queue=..., retry=False)`
        would publish.

        The steps are send_task's and send_task_message's (Celery 5.x), for a message with
        keyword arguments only and no countdown, eta, links or parent task; the integration
        test compares the result with a real send_task's message field by field. Answers the
        task message's delivery tag (in confirm mode; its task-sent event has the next one).
        """
        amqp = self._app.amqp
        name = message.task
        task_id = str(message.task_id)
        kwargs = {"job_id": message.job_id, "payload": message.payload}
        task, options = self._task_options(name, message.queue)
        # The task's policy in Postgres decides its limits; a task option is the fallback.
        time_limit = message.time_limit or options.pop("time_limit", None)
        soft_time_limit = message.soft_time_limit or options.pop("soft_time_limit", None)
        options.pop("time_limit", None)
        options.pop("soft_time_limit", None)
        expires = options.pop("expires", None)
        if expires is not None:
            options["expiration"] = expires
        options = amqp.router.route(options, name, None, kwargs, task)
        headers, properties, body, sent_event = amqp.create_task_message(
            task_id, name, None, kwargs, None, None, None, None, expires, 0, None, None, None,
            self._app.thread_oid, time_limit, soft_time_limit, self._send_sent_event,
            None, None, None, None, ignore_result=None, replaced_task_nesting=0,
            # What as_task_v2 would compute for each message, computed once per batch.
            origin=self._origin, argsrepr=NO_ARGS_REPR, **options,
        )
        # send_task_message from here on.
        queue = options.pop("queue")
        exchange = options.pop("exchange", None)
        routing_key = options.pop("routing_key", None)
        exchange_type = options.pop("exchange_type", None) or queue.exchange.type
        delivery_mode = (
            options.pop("delivery_mode", None) or queue.exchange.delivery_mode
            or self._delivery_mode
        )
        serializer = options.pop("serializer", None) or self._serializer
        compression = options.pop("compression", None) or self._compression
        headers.update(options.pop("headers", None) or {})
        options.pop("retry", None)
        options.pop("retry_policy", None)
        properties.update(options)
        if (not exchange or not routing_key) and exchange_type == "direct":
            exchange, routing_key = "", queue.name
        elif exchange is None:
            exchange = queue.exchange.name or amqp.default_exchange
            routing_key = routing_key or queue.routing_key or self._routing_key
        if queue.name not in self._declared:
            producer.maybe_declare(queue)  # send_task declares with every message; once will do
            self._declared.add(queue.name)
        signals.before_task_publish.send(
            sender=name, body=body, exchange=exchange, routing_key=routing_key, declare=[queue],
            headers=headers, properties=properties, retry_policy=dict(self._retry_policy),
        )
        producer.publish(
            body, exchange=exchange, routing_key=routing_key, serializer=serializer,
            compression=compression, delivery_mode=delivery_mode, headers=headers, **properties,
        )
        delivery_tag = self._written
        signals.after_task_publish.send(
            sender=name, body=body, headers=headers, exchange=exchange, routing_key=routing_key,
        )
        if sent_event:
            sent_event.update({"queue": queue.name, "exchange": exchange, "routing_key": routing_key})
            self._events.publish("task-sent", sent_event, producer)
        return delivery_tag

    def _task_options(self, name: str, queue: str | None) -> tuple[Any, dict[str, Any]]:
        """The task if registered in this process, and its execution options as send_task
        merges them under ours (the queue is the job's task's, else the default)."""
        options: dict[str, Any] = {"queue": queue or self._queue, "retry": False}
        task = self._app._tasks.get(name)  # send_task's lookup: no finalize, no import
        if task is not None and hasattr(task, "_get_exec_options"):
            defaults = {k: v for k, v in task._get_exec_options().items() if v is not None}
            options = {**defaults, **options}
        return task, options
