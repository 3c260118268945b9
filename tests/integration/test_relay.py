"""The relay against real PostgreSQL: real commits, real concurrent connections and threads.

The broker is not under test here, so the relay is handed a publish callable that records
what it was asked to send. Everything it reads and writes is a committed row.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
import pytest

from outbox import PublishFailed, enqueue, lifecycle
from outbox.relay import OutboxMessage, Relay
from tests.harness.system import wait_until

TASK = "compliance.recalculate_property"


class Recorder:
    """A publish callable that remembers every message it was handed (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[OutboxMessage] = []
        self._lock = threading.Lock()

    def __call__(self, messages: Sequence[OutboxMessage]) -> None:
        with self._lock:
            self.messages.extend(messages)

    def job_ids(self) -> list[int]:
        with self._lock:
            return [m.job_id for m in self.messages]


class RelayDied(BaseException):
    """Stands in for SIGKILL at a probe point: nothing after it runs."""


def died_at(point: str) -> Callable[[str], None]:
    def probe(reached: str) -> None:
        if reached == point:
            raise RelayDied(point)
    return probe


def connect(database_url: str, name: str = "recalq-test") -> Callable[[], psycopg.Connection]:
    return lambda: psycopg.connect(database_url, application_name=name, connect_timeout=10)


def make_relay(database_url: str, publish: Callable[[Sequence[OutboxMessage]], None], **options: object) -> Relay:
    return Relay(connect=connect(database_url), publish=publish, **options)  # type: ignore[arg-type]


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection: each statement is its own committed transaction."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def enqueue_job(conn: psycopg.Connection, key: str | None = None) -> int:
    """Enqueues one job inside whatever transaction `conn` is in (autocommit: commits it)."""
    key = key or f"test:{uuid.uuid4().hex}"
    return enqueue(
        conn,
        task=TASK,
        coalescing_key=key,
        payload={"property_id": 1},
        correlation_id=f"cid-{uuid.uuid4()}",
        trigger_reason="manual_recalculation",
        actor_type="system",
    ).job_id


def job(conn: psycopg.Connection, job_id: int) -> dict:
    row = conn.execute(
        "SELECT status::text, publish_count, claimed_until, claimed_until > now() AS claimed, "
        "rescue_count, rescued_at, celery_task_id FROM outbox_job WHERE id = %s",
        [job_id],
    ).fetchone()
    assert row is not None
    keys = ("status", "publish_count", "claimed_until", "claimed", "rescue_count", "rescued_at", "task_id")
    return dict(zip(keys, row, strict=True))


# -- out-of-order commits ---------------------------------------------------------------------


def test_a_row_that_commits_after_a_higher_id_is_published_by_the_next_pass(database_url: str, db) -> None:
    recorder = Recorder()
    relay = make_relay(database_url, recorder)
    with psycopg.connect(database_url) as a:
        low = enqueue_job(a)  # A takes the lower id and keeps its transaction open
        high = enqueue_job(db)  # B commits a higher id at once
        assert low < high

        assert relay.run_pass(db).published == 1
        assert recorder.job_ids() == [high]

        a.commit()
    assert relay.run_pass(db).published == 1
    assert recorder.job_ids() == [high, low]
    assert job(db, low)["status"] == job(db, high)["status"] == "published"


def test_every_committed_row_is_published_exactly_once_while_commits_race_the_relay(database_url: str) -> None:
    threads, per_thread = 8, 50
    recorder = Recorder()
    relay = make_relay(database_url, recorder, batch_size=16)
    committed: set[int] = set()
    rolled_back: set[int] = set()
    lock = threading.Lock()
    producers_done = threading.Event()
    late: list[int] = []  # ids published after a higher id had been published: out-of-order commits

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(database_url) as conn:
            for _ in range(per_thread):
                job_id = enqueue_job(conn)
                conn.execute("SELECT pg_sleep(%s)", [rng.uniform(0, 0.01)])  # hold the id uncommitted
                if rng.random() < 0.1:
                    conn.rollback()
                    with lock:
                        rolled_back.add(job_id)
                else:
                    conn.commit()
                    with lock:
                        committed.add(job_id)

    def relay_loop() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            highest = 0
            while True:
                finished = producers_done.is_set()
                relay.drain(conn)
                for job_id in recorder.job_ids():
                    if job_id < highest:
                        late.append(job_id)
                    highest = max(highest, job_id)
                if finished:
                    return
                producers_done.wait(0.005)

    relayer = threading.Thread(target=relay_loop)
    relayer.start()
    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(threads)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    producers_done.set()
    relayer.join(60)
    assert not relayer.is_alive()

    counts = Counter(recorder.job_ids())
    assert set(counts) == committed
    assert not set(counts) & rolled_back
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    assert len(committed) + len(rolled_back) == threads * per_thread
    assert late, "no row committed out of id order; the race this test is about did not happen"


# -- several relays ---------------------------------------------------------------------------


def test_two_relays_draining_together_publish_every_row_exactly_once(database_url: str, db) -> None:
    with psycopg.connect(database_url) as conn:
        ids = {enqueue_job(conn) for _ in range(300)}
        conn.commit()
    recorders = {"a": Recorder(), "b": Recorder()}
    b_published = threading.Event()

    def publish_a(messages: Sequence[OutboxMessage]) -> None:
        # A's first batch stays claimed and unmarked until B has published: B must skip it.
        assert b_published.wait(20), "relay B never published while A held a claimed batch"
        recorders["a"](messages)

    def publish_b(messages: Sequence[OutboxMessage]) -> None:
        recorders["b"](messages)
        b_published.set()

    relays = {
        "a": make_relay(database_url, publish_a, batch_size=10),
        "b": make_relay(database_url, publish_b, batch_size=10),
    }
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def drain(name: str) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                start.wait(10)
                while relays[name].drain(conn) > 0:
                    pass
        except BaseException as exc:
            errors.append(exc)
            raise

    workers = [threading.Thread(target=drain, args=(name,)) for name in relays]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in workers)

    counts = Counter(recorders["a"].job_ids() + recorders["b"].job_ids())
    assert set(counts) == ids
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n > 1}
    assert recorders["a"].job_ids() and recorders["b"].job_ids()
    published = db.execute("SELECT count(*) FROM outbox_job WHERE status = 'published' AND publish_count = 1")
    assert published.fetchone() == (300,)


# -- broker failures and relay deaths ---------------------------------------------------------


def test_a_partial_publish_marks_what_got_through_releases_the_rest_and_re_raises(database_url: str, db) -> None:
    ids = [enqueue_job(db) for _ in range(5)]
    failure = PublishFailed("broker went away mid-batch", published=ids[:2])

    def half_publish(messages: Sequence[OutboxMessage]) -> None:
        assert [m.job_id for m in messages] == ids
        raise failure

    with pytest.raises(PublishFailed) as raised:
        make_relay(database_url, half_publish, claim_lease_seconds=600).run_pass(db)
    assert raised.value is failure

    for job_id in ids[:2]:
        row = job(db, job_id)
        assert (row["status"], row["publish_count"], row["claimed_until"]) == ("published", 1, None)
    for job_id in ids[2:]:
        row = job(db, job_id)
        assert (row["status"], row["publish_count"], row["claimed_until"]) == ("pending", 0, None)

    recorder = Recorder()
    assert make_relay(database_url, recorder).run_pass(db).published == 3
    assert recorder.job_ids() == ids[2:]


def test_rows_of_a_relay_that_died_after_claiming_are_claimable_once_the_lease_passes_and_not_before(
    database_url: str, db
) -> None:
    ids = [enqueue_job(db) for _ in range(3)]
    dead = Recorder()
    with pytest.raises(RelayDied):
        make_relay(database_url, dead, claim_lease_seconds=60, probe=died_at("relay.after_claim")).run_pass(db)
    assert dead.job_ids() == []
    assert all(job(db, i)["claimed"] and job(db, i)["status"] == "pending" for i in ids)

    recorder = Recorder()
    other = make_relay(database_url, recorder, claim_lease_seconds=60)
    assert other.run_pass(db).claimed == 0

    db.execute("UPDATE outbox_job SET claimed_until = now() - interval '1 millisecond' WHERE id = ANY(%s)", [ids])
    assert other.run_pass(db).published == 3
    assert sorted(recorder.job_ids()) == ids


def test_a_relay_that_died_after_publishing_is_followed_by_a_republish_with_the_same_task_id(
    database_url: str, db
) -> None:
    job_id = enqueue_job(db)
    first = Recorder()
    lease = 1.0
    with pytest.raises(RelayDied):
        make_relay(database_url, first, claim_lease_seconds=lease, probe=died_at("relay.after_publish")).run_pass(db)
    died = time.monotonic()
    assert first.job_ids() == [job_id]
    assert job(db, job_id)["status"] == "pending"

    second = Recorder()
    relay = make_relay(database_url, second, claim_lease_seconds=lease)
    assert relay.run_pass(db).claimed == 0  # still under the dead relay's lease
    wait_until(lambda: relay.run_pass(db).published == 1, timeout=10, what="the lease to run out")
    assert time.monotonic() - died >= lease * 0.9

    assert second.job_ids() == [job_id]
    assert second.messages[0].task_id == first.messages[0].task_id == job(db, job_id)["task_id"]
    assert (job(db, job_id)["status"], job(db, job_id)["publish_count"]) == ("published", 1)


# -- rescue (G7) -----------------------------------------------------------------------------


GRACE = 60.0


def published_job(database_url: str, db: psycopg.Connection) -> int:
    job_id = enqueue_job(db)
    assert make_relay(database_url, Recorder()).run_pass(db).published == 1
    return job_id


def running_job(database_url: str, db: psycopg.Connection) -> int:
    job_id = published_job(database_url, db)
    started = lifecycle.start(db, job_id, redelivered=False, lease_seconds=GRACE)
    assert started.outcome == "started"
    return job_id


def retrying_job(database_url: str, db: psycopg.Connection) -> int:
    job_id = running_job(database_url, db)
    assert lifecycle.fail(db, job_id, 1, error="flaky", retryable=True, retry_in_seconds=0) == "retrying"
    return job_id


def backdate(db: psycopg.Connection, job_id: int, **columns: str) -> None:
    """Moves timestamps into the past instead of waiting for them to get there."""
    assignments = ", ".join(f"{column} = now() - interval '{ago}'" for column, ago in columns.items())
    db.execute(f"UPDATE outbox_job SET {assignments} WHERE id = %s", [job_id])


def test_rescue_resends_exactly_the_jobs_that_look_lost_with_their_task_ids(database_url: str, db) -> None:
    old_published = published_job(database_url, db)
    backdate(db, old_published, published_at="10 minutes")
    fresh_published = published_job(database_url, db)

    overdue_retrying = retrying_job(database_url, db)
    backdate(db, overdue_retrying, next_run_at="10 minutes")
    due_retrying = retrying_job(database_url, db)  # due now, but not past the grace period

    expired_running = running_job(database_url, db)
    backdate(db, expired_running, lease_expires_at="10 minutes")
    # Its worker may be about to resume the attempt after an outage: not taken over yet.
    just_expired_running = running_job(database_url, db)
    backdate(db, just_expired_running, lease_expires_at="1 second")
    live_running = running_job(database_url, db)

    done = running_job(database_url, db)
    assert lifecycle.complete(db, done, 1)
    dead = running_job(database_url, db)
    assert lifecycle.fail(db, dead, 1, error="bad data", retryable=False, retry_in_seconds=0) == "dead"
    for finished in (done, dead):
        backdate(db, finished, published_at="1 hour", next_run_at="1 hour", started_at="1 hour")
    old_pending = enqueue_job(db)  # the normal claim's business, not the rescue's
    backdate(db, old_pending, next_run_at="1 hour")

    before = {i: job(db, i) for (i,) in db.execute("SELECT id FROM outbox_job").fetchall()}
    assert len(before) == 10
    recorder = Recorder()
    relay = make_relay(database_url, recorder, rescue_after_seconds=GRACE, takeover_grace_seconds=GRACE)
    assert relay.rescue_pass(db).published == 3

    lost = {old_published, overdue_retrying, expired_running}
    assert sorted(recorder.job_ids()) == sorted(lost)
    for message in recorder.messages:
        assert message.task_id == before[message.job_id]["task_id"]
    for job_id, was in before.items():
        now = job(db, job_id)
        assert now["status"] == was["status"], f"job {job_id}: a rescue must not change the status"
        assert now["claimed_until"] is None
        if job_id in lost:
            assert (now["rescue_count"], now["publish_count"]) == (1, was["publish_count"] + 1)
            assert now["rescued_at"] is not None
        else:
            assert (now["rescue_count"], now["rescued_at"]) == (0, None), f"job {job_id} was rescued"
    assert {fresh_published, due_retrying, just_expired_running, live_running, done, dead, old_pending}.isdisjoint(
        recorder.job_ids()
    )


def test_a_rescued_job_is_resent_at_most_once_per_grace_period(database_url: str, db) -> None:
    job_id = published_job(database_url, db)
    backdate(db, job_id, published_at="10 minutes")
    recorder = Recorder()
    relay = make_relay(database_url, recorder, rescue_after_seconds=GRACE)

    assert relay.rescue_pass(db).published == 1
    assert relay.rescue_pass(db).published == 0
    assert job(db, job_id)["rescue_count"] == 1

    backdate(db, job_id, rescued_at="61 seconds")
    assert relay.rescue_pass(db).published == 1
    assert recorder.job_ids() == [job_id, job_id]
    assert job(db, job_id)["rescue_count"] == 2


def test_a_failed_rescue_releases_its_claim_and_records_no_rescue(database_url: str, db) -> None:
    job_id = published_job(database_url, db)
    backdate(db, job_id, published_at="10 minutes")

    def broker_down(messages: Sequence[OutboxMessage]) -> None:
        raise PublishFailed("connection refused")

    with pytest.raises(PublishFailed):
        make_relay(database_url, broker_down, rescue_after_seconds=GRACE, claim_lease_seconds=600).rescue_pass(db)
    row = job(db, job_id)
    assert (row["claimed_until"], row["rescue_count"], row["rescued_at"], row["publish_count"]) == (None, 0, None, 1)

    recorder = Recorder()
    assert make_relay(database_url, recorder, rescue_after_seconds=GRACE).rescue_pass(db).published == 1
    assert recorder.job_ids() == [job_id]


# -- the long-running loop --------------------------------------------------------------------


@contextmanager
def running(relay: Relay, database_url: str) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('outbox_job_pending', '')")  # wake it from its long poll
        thread.join(15)
        assert not thread.is_alive(), "the relay did not stop"


def listen_backends(db: psycopg.Connection, name: str) -> set[int]:
    rows = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database() "
        "AND query ILIKE 'LISTEN%%'",
        [name],
    ).fetchall()
    return {r[0] for r in rows}


def test_the_running_relay_wakes_on_notify_and_survives_its_connections_being_killed(
    database_url: str, db
) -> None:
    name = f"relay-{uuid.uuid4().hex[:8]}"
    recorder = Recorder()
    relay = Relay(connect=connect(database_url, name), publish=recorder, poll_seconds=30,
                  max_error_backoff_seconds=0.5)

    def published(job_id: int) -> Callable[[], bool]:
        return lambda: job_id in recorder.job_ids()

    with running(relay, database_url):
        sentinel = enqueue_job(db)
        wait_until(published(sentinel), timeout=10, what="the first pass")
        listening = listen_backends(db, name)
        assert len(listening) == 1

        woken = enqueue_job(db)
        began = time.monotonic()
        wait_until(published(woken), timeout=3, what="NOTIFY to wake the relay (its poll is 30 s)")
        assert time.monotonic() - began < 3

        killed = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            [name],
        ).fetchone()
        assert killed == (2,)  # its working connection and its LISTEN connection
        after_kill = enqueue_job(db)
        wait_until(published(after_kill), timeout=10, what="the relay to reconnect and publish")
        wait_until(lambda: bool(listen_backends(db, name) - listening), timeout=10, what="a new LISTEN")

        woken_again = enqueue_job(db)
        wait_until(published(woken_again), timeout=3, what="NOTIFY after the reconnect")

    counts = Counter(recorder.job_ids())
    assert counts == {sentinel: 1, woken: 1, after_kill: 1, woken_again: 1}


def test_a_job_a_worker_started_before_the_relay_marked_it_still_counts_its_publication(
    db: psycopg.Connection, database_url: str
) -> None:
    """The broker confirmed the message, then a fast worker started the job before the relay's
    mark: the publication happened, so it counts, and the job keeps the state the worker gave it."""
    job_id = enqueue_job(db)

    def publish_and_start(messages: Sequence[OutboxMessage]) -> None:
        with psycopg.connect(database_url, autocommit=True) as worker, worker.transaction():
            started = lifecycle.start(worker, messages[0].job_id, redelivered=False, lease_seconds=30)
        assert started.outcome is lifecycle.StartOutcome.STARTED

    with make_relay(database_url, publish_and_start)._connect() as conn:
        make_relay(database_url, publish_and_start).run_pass(conn)

    row = db.execute("SELECT status::text, publish_count, published_at IS NOT NULL, claimed_until "
                     "FROM outbox_job WHERE id = %s", [job_id]).fetchone()
    assert row == ("running", 1, True, None)


def test_a_claimed_job_carries_its_tasks_queue_and_time_limits_to_the_publisher(
    db: psycopg.Connection, database_url: str
) -> None:
    db.execute("UPDATE outbox_task SET queue = 'long-jobs', time_limit_seconds = 400, "
               "soft_time_limit_seconds = 300, lease_seconds = 500 WHERE name = %s", [TASK])
    job_id = enqueue_job(db)
    recorder = Recorder()
    relay = make_relay(database_url, recorder)
    with relay._connect() as conn:
        relay.run_pass(conn)

    [message] = recorder.messages
    assert (message.job_id, message.queue, message.time_limit, message.soft_time_limit) == (
        job_id, "long-jobs", 400.0, 300.0)
