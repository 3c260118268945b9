"""The relay's publisher on the real brokers: it sends what `send_task` sends, and on RabbitMQ a
job counts as published only once the broker acked its message (publisher confirms, pipelined
per batch). Nacks come from a real RabbitMQ queue that refuses messages once full
(x-overflow=reject-publish); connection drops come from a TCP proxy between the publisher and
the shared broker, which keeps serving everyone else.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from outbox import PublishFailed, enqueue
from outbox.relay import OutboxMessage, Relay
from recalq.bootstrap import Runtime
from recalq.publisher import CeleryPublisher
from recalq.settings import Settings
from services.vocabulary import RECALCULATE_TASK
from tests.harness.services import brokers
from tests.harness.system import wait_until
from tests.harness.tcp_proxy import TcpProxy, broker_address

pytestmark = pytest.mark.broker

CONFIRM_TIMEOUT = 5.0
#: For tests that only publish: Settings needs a database URL, nothing here connects to it.
NO_DATABASE = "postgresql://unused@127.0.0.1:5432/unused"


def make_app(database_url: str, broker_url: str, queue: str, max_length: int | None = None) -> Celery:
    """The Celery app a relay process builds; `max_length` makes its queue refuse overflow."""
    settings = Settings(database_url=database_url, broker_url=broker_url, queue=queue,
                        broker_timeout_seconds=CONFIRM_TIMEOUT)
    app = Runtime(settings).celery_app
    if max_length is not None:
        app.conf.task_queues = [Queue(queue, Exchange(queue), routing_key=queue, queue_arguments={
            "x-max-length": max_length, "x-overflow": "reject-publish"})]
    return app


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"recalq-test-pub-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue(broker_url, name)


@pytest.fixture
def rabbitmq_url() -> str:
    url = brokers().get("rabbitmq")
    if url is None:  # CI requires RabbitMQ (tests/harness/services.py); a laptop may not have it
        pytest.skip("publisher confirms are RabbitMQ's and this machine has no RabbitMQ")
    return url


@pytest.fixture
def rabbitmq_queue(rabbitmq_url: str) -> Iterator[str]:
    name = f"recalq-test-pub-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue(rabbitmq_url, name)


def delete_queue(broker_url: str, name: str) -> None:
    with Connection(broker_url, connect_timeout=5) as conn:
        conn.default_channel.queue_delete(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def outbox_messages(n: int) -> list[OutboxMessage]:
    return [
        OutboxMessage(job_id=i, task=RECALCULATE_TASK, task_id=uuid.uuid4(),
                      payload={"property_id": i, "note": f"caf\u00e9 #{i}", "nested": {"ok": True}})
        for i in range(1, n + 1)
    ]


def take(broker_url: str, app: Celery, queue: str, n: int) -> list[Message]:
    """Takes exactly n messages off the queue (a bounded poll), and checks none is left."""
    taken: list[Message] = []
    with Connection(broker_url, connect_timeout=5) as conn:
        bound = app.amqp.queues[queue].bind(conn.default_channel)

        def pull() -> bool:
            while (message := bound.get(no_ack=True)) is not None:
                taken.append(message)
            return len(taken) >= n

        wait_until(pull, timeout=10, what=f"{n} messages in {queue} (have {len(taken)})")
        assert bound.get(no_ack=True) is None, f"more than {n} messages in {queue}"
    return taken


def as_sent(message: Message) -> dict[str, Any]:
    """Everything a worker sees of a message, less what the broker stamps on each delivery."""
    properties = {k: v for k, v in message.properties.items() if k not in ("delivery_tag", "delivery_info")}
    return {
        "headers": message.headers,
        "properties": properties,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "body": message.decode(),
        "exchange": message.delivery_info.get("exchange"),
        "routing_key": message.delivery_info.get("routing_key"),
    }


def send_task_all(app: Celery, queue: str, messages: Sequence[OutboxMessage]) -> None:
    """What the relay used to do: one send_task per message (the reference for the message)."""
    with app.producer_or_acquire() as producer:
        for m in messages:
            app.send_task(m.task, kwargs={"job_id": m.job_id, "payload": m.payload}, task_id=str(m.task_id),
                          queue=queue, producer=producer, retry=False)


def enqueue_jobs(db: psycopg.Connection, n: int) -> list[int]:
    """n committed jobs of distinct keys, in one transaction (ids ascend in enqueue order)."""
    with db.transaction():
        return [
            enqueue(db, task=RECALCULATE_TASK, coalescing_key=f"test:{uuid.uuid4().hex}",
                    payload={"property_id": i}, correlation_id=f"cid-{uuid.uuid4()}",
                    trigger_reason="manual_recalculation", actor_type="system").job_id
            for i in range(n)
        ]


def statuses(db: psycopg.Connection, ids: Sequence[int]) -> dict[int, tuple[str, int, bool]]:
    """job id -> (status, publish_count, still claimed)."""
    rows = db.execute(
        "SELECT id, status::text, publish_count, claimed_until IS NOT NULL FROM outbox_job WHERE id = ANY(%s)",
        [list(ids)],
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def relay_with(database_url: str, publish: Callable[[Sequence[OutboxMessage]], None]) -> Relay:
    return Relay(connect=lambda: psycopg.connect(database_url), publish=publish, claim_lease_seconds=600)


# -- the message ------------------------------------------------------------------------------


def test_a_batch_arrives_as_exactly_the_messages_send_task_publishes(broker_url: str, queue: str) -> None:
    app = make_app(NO_DATABASE, broker_url, queue)
    messages = outbox_messages(25)
    publisher = CeleryPublisher(app, queue)
    try:
        publisher(messages)
    finally:
        publisher.close()
    ours = take(broker_url, app, queue, len(messages))
    send_task_all(app, queue, messages)
    theirs = take(broker_url, app, queue, len(messages))

    assert [as_sent(m) for m in ours] == [as_sent(m) for m in theirs]
    for message, sent in zip(messages, ours, strict=True):
        task_id = str(message.task_id)
        assert sent.headers["id"] == sent.headers["root_id"] == sent.properties["correlation_id"] == task_id
        assert sent.headers["task"] == RECALCULATE_TASK
        assert sent.decode() == [[], {"job_id": message.job_id, "payload": message.payload},
                                 {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        assert sent.content_type == "application/json"
        assert sent.properties["delivery_mode"] == 2
        assert sent.delivery_info["routing_key"] == queue


def test_each_task_message_is_announced_by_the_task_sent_event_send_task_would_send(
    rabbitmq_url: str, rabbitmq_queue: str
) -> None:
    app = make_app(NO_DATABASE, rabbitmq_url, rabbitmq_queue)
    messages = outbox_messages(5)
    ours_ids = {str(m.task_id) for m in messages}
    with Connection(rabbitmq_url, connect_timeout=5) as conn:
        events = Queue(f"{rabbitmq_queue}-events", Exchange("celeryev", type="topic"), routing_key="task.sent",
                       auto_delete=True, exclusive=True)(conn.default_channel)
        events.declare()

        def sent_events() -> list[dict[str, Any]]:
            received: list[dict[str, Any]] = []

            def pull() -> bool:
                while (event := events.get(no_ack=True)) is not None:
                    if event.decode().get("uuid") in ours_ids:  # the broker is shared: others send too
                        received.append(event.decode())
                return len(received) >= len(messages)

            wait_until(pull, timeout=10, what="the task-sent events")
            assert len(received) == len(messages)
            stamped = ("timestamp", "clock", "utcoffset", "pid", "local_received")
            return [{k: v for k, v in e.items() if k not in stamped} for e in received]

        publisher = CeleryPublisher(app, rabbitmq_queue)
        try:
            publisher(messages)
        finally:
            publisher.close()
        ours = sent_events()
        send_task_all(app, rabbitmq_queue, messages)
        theirs = sent_events()

    assert ours == theirs
    assert [e["uuid"] for e in ours] == [str(m.task_id) for m in messages]
    assert {(e["type"], e["queue"], e["routing_key"]) for e in ours} == {("task-sent", rabbitmq_queue, rabbitmq_queue)}


# -- publisher confirms (RabbitMQ) ------------------------------------------------------------


def test_jobs_whose_messages_the_broker_nacked_are_not_published_and_the_relay_sends_them_again(
    database_url: str, db: psycopg.Connection, rabbitmq_url: str, rabbitmq_queue: str
) -> None:
    room = 4
    app = make_app(database_url, rabbitmq_url, rabbitmq_queue, max_length=room)
    ids = enqueue_jobs(db, 10)
    publisher = CeleryPublisher(app, rabbitmq_queue, confirms=True, confirm_timeout=CONFIRM_TIMEOUT)
    relay = relay_with(database_url, publisher)
    try:
        with pytest.raises(PublishFailed) as raised:
            relay.run_pass(db)
        assert sorted(raised.value.published) == ids[:room]
        assert "6 nacked" in str(raised.value)
        after = statuses(db, ids)
        assert all(after[i] == ("published", 1, False) for i in ids[:room]), after
        assert all(after[i] == ("pending", 0, False) for i in ids[room:]), after  # released, not leased
        queued = take(rabbitmq_url, app, rabbitmq_queue, room)
        assert [m.decode()[1]["job_id"] for m in queued] == ids[:room]

        # The queue has room again: the next passes send the released jobs, same publisher.
        with pytest.raises(PublishFailed) as again:
            relay.run_pass(db)
        assert sorted(again.value.published) == ids[room:2 * room]
        take(rabbitmq_url, app, rabbitmq_queue, room)
        assert relay.run_pass(db).published == 2
    finally:
        publisher.close()
    assert {s for s, _, _ in statuses(db, ids).values()} == {"published"}
    assert [m.decode()[1]["job_id"] for m in take(rabbitmq_url, app, rabbitmq_queue, 2)] == ids[2 * room:]


class CutBefore(Sequence[OutboxMessage]):
    """A batch that drops the broker connection when iteration reaches message number `at`."""

    def __init__(self, messages: Sequence[OutboxMessage], at: int, cut: Callable[[], None]) -> None:
        self._messages, self._at, self._cut = list(messages), at, cut

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._messages[index]

    def __iter__(self) -> Iterator[OutboxMessage]:
        for i, message in enumerate(self._messages):
            if i == self._at:
                self._cut()
            yield message


def queue_depth(broker_url: str, queue: str) -> int:
    with Connection(broker_url, connect_timeout=5) as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def test_a_connection_dropped_mid_batch_reports_only_acked_jobs_and_the_rest_are_sent_after_reconnecting(
    database_url: str, db: psycopg.Connection, rabbitmq_url: str, rabbitmq_queue: str
) -> None:
    ids = enqueue_jobs(db, 300)
    at = 100
    with TcpProxy(broker_address(rabbitmq_url)) as proxy:
        app = make_app(database_url, proxy.url_for(rabbitmq_url), rabbitmq_queue)
        publisher = CeleryPublisher(app, rabbitmq_queue, confirms=True, confirm_timeout=CONFIRM_TIMEOUT)

        def cut() -> None:
            wait_until(lambda: queue_depth(rabbitmq_url, rabbitmq_queue) >= at, timeout=10,
                       what="the first part of the batch to reach the broker")
            proxy.cut()

        cut_mid_batch = True

        def publish(messages: Sequence[OutboxMessage]) -> None:
            publisher(CutBefore(messages, at, cut) if cut_mid_batch else messages)

        relay = relay_with(database_url, publish)
        try:
            with pytest.raises(PublishFailed) as raised:
                relay.run_pass(db)
            published = set(raised.value.published)
            assert published <= set(ids[:at]), "a job sent after the drop was reported published"
            after = statuses(db, ids)
            assert {i for i, (s, _, _) in after.items() if s == "published"} == published
            assert all(after[i] == ("pending", 0, False) for i in set(ids) - published), "not released"

            proxy.restore()
            cut_mid_batch = False
            assert relay.run_pass(db).published == len(ids) - len(published)
        finally:
            publisher.close()
    assert {s for s, _, _ in statuses(db, ids).values()} == {"published"}
    queued = take(rabbitmq_url, app, rabbitmq_queue, queue_depth(rabbitmq_url, rabbitmq_queue))
    in_queue = [m.decode()[1]["job_id"] for m in queued]
    assert set(in_queue) == set(ids)  # every job at least once; one the drop left unconfirmed, twice
    assert published <= set(in_queue[:at])


# -- both brokers -----------------------------------------------------------------------------


def test_a_batch_after_the_connection_dropped_publishes_nothing_and_the_next_one_reconnects(
    database_url: str, db: psycopg.Connection, broker_url: str, queue: str
) -> None:
    with TcpProxy(broker_address(broker_url)) as proxy:
        app = make_app(database_url, proxy.url_for(broker_url), queue)
        publisher = CeleryPublisher(app, queue)
        relay = relay_with(database_url, publisher)
        try:
            first = enqueue_jobs(db, 5)
            assert relay.run_pass(db).published == 5

            proxy.cut()
            second = enqueue_jobs(db, 5)
            with pytest.raises(PublishFailed) as raised:
                relay.run_pass(db)
            assert raised.value.published == ()
            assert all(s == ("pending", 0, False) for s in statuses(db, second).values())

            proxy.restore()
            assert relay.run_pass(db).published == 5
        finally:
            publisher.close()
    queued = take(broker_url, app, queue, 10)
    assert [m.decode()[1]["job_id"] for m in queued] == first + second
