"""Redis, as the broker, paused while the relay publishes and workers consume.

Two ways to pause a private Redis server (the shared one serves everyone else):

- CLIENT PAUSE ALL for less than the clients' socket timeout: every command waits and then
  runs, so nothing may fail: the relay refuses no batch, no worker loses its connection; the
  stall only delays publication, and mutations never notice (they do not touch the broker).
- SIGSTOP for longer than the socket timeout: publishes time out (Redis may still run the
  buffered LPUSH once it resumes, so a message the relay believes lost can arrive as well as
  its re-publication); a worker's acks time out (its consumer itself waits on the socket
  without a timeout, so it may never call the connection lost), and if it does lose the
  connection it cancels the tasks it was running. The system must converge with every job
  applied exactly once: a duplicate message is dropped by the fenced start, a cancelled
  attempt is taken over (counted, as any lost attempt) after its lease, by the broker's
  redelivery or the relay's rescue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness.data import provision
from tests.harness.flow import MutationFlow, assert_converged, db_now, lines_with, start_pipeline, warm_up
from tests.harness.private_services import PrivateRedis
from tests.harness.system import System, kill_all, wait_until

REFUSAL = "broker refused a batch"
CONNECTION_LOST = "Connection to broker lost"
ACK_FAILED = "Couldn't ack"
N_PROPERTIES = 8
#: A mutation takes milliseconds; a second would mean it waited on the broker.
MUTATION_BOUND_S = 1.0
#: Below the clients' socket timeout (RECALQ_BROKER_TIMEOUT_SECONDS=5 in the fast settings).
CLIENT_PAUSE_MS = 3000
#: For the freeze: short timeouts so it bites in seconds; a short lease and a fast rescue so a
#: cancelled attempt is taken over in seconds (the lease stays above the task time limit).
FREEZE_SETTINGS = {
    "RECALQ_BROKER_TIMEOUT_SECONDS": "1.5",
    "RECALQ_TASK_SOFT_TIME_LIMIT": "3",
    "RECALQ_TASK_TIME_LIMIT": "4",
    "RECALQ_JOB_LEASE_SECONDS": "5",
    "RECALQ_RESCUE_AFTER_SECONDS": "2",
    "RECALQ_RESCUE_INTERVAL_SECONDS": "0.5",
}


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture
def system(database_url: str, private_redis: PrivateRedis, tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[System]:
    extra = getattr(request, "param", None) or {}
    sut = System(database_url, private_redis.url, tmp_path, extra_env=extra)
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()



def test_a_client_pause_shorter_than_the_socket_timeout_delays_publication_and_fails_nothing(
    system: System, database_url: str, private_redis: PrivateRedis
) -> None:
    with psycopg.connect(database_url) as setup:
        property_ids = provision(setup, n_properties=N_PROPERTIES)
    worker, relay = start_pipeline(system)
    workers = [worker]
    with psycopg.connect(database_url, autocommit=True) as db, MutationFlow(database_url, property_ids) as flow:
        warm_up(system, flow, db)

        paused_db = db_now(db)
        paused = time.monotonic()
        private_redis.client_pause(CLIENT_PAUSE_MS)
        wait_until(lambda: time.monotonic() - paused > CLIENT_PAUSE_MS / 1000 and private_redis.ping(), 10,
                   "the pause to end")
        during = flow.between(paused, paused + CLIENT_PAUSE_MS / 1000)
        resumed = paused + CLIENT_PAUSE_MS / 1000
        wait_until(lambda: len(flow.since(resumed)) >= 10, 10, "mutations after the pause")
    assert not flow.errors, flow.errors
    assert len(during) >= 10, f"mutations should keep committing while Redis is paused: {len(during)}"
    assert max(c.seconds for c in during) < MUTATION_BOUND_S, "a mutation waited on the broker"

    system.wait_idle(timeout=60)
    with psycopg.connect(database_url, autocommit=True) as db:
        # published_at is stamped after the broker took the batch, so nothing is stamped while
        # the pause lasts; a second's margin at the start for a batch taken just before it.
        stamped = db.execute(
            "SELECT count(*) FROM outbox_job WHERE published_at >= %s + interval '1 s' "
            "AND published_at < %s + make_interval(secs => %s)",
            [paused_db, paused_db, CLIENT_PAUSE_MS / 1000],
        ).fetchone()[0]
        assert stamped == 0, f"{stamped} job(s) were published while Redis was paused"
        assert lines_with([relay], REFUSAL) == 0, f"a pause within the timeout failed a publish:\n{relay.output()}"
        assert lines_with(workers, CONNECTION_LOST) == 0, f"a worker lost Redis during a pause:\n{system.logs()}"
        histogram = assert_converged(db, max_attempts_seen=1)
    print(f"client pause {CLIENT_PAUSE_MS} ms: {len(during)} mutations committed during it "
          f"(slowest {max(c.seconds for c in during) * 1000:.0f} ms); done jobs by attempts {histogram}")


@pytest.mark.parametrize("system", [FREEZE_SETTINGS], indirect=True, ids=["freeze"])
def test_a_redis_frozen_past_the_socket_timeout_is_survived_and_every_job_is_applied_exactly_once(
    system: System, database_url: str, private_redis: PrivateRedis
) -> None:
    with psycopg.connect(database_url) as setup:
        property_ids = provision(setup, n_properties=N_PROPERTIES)
    worker, relay = start_pipeline(system)
    workers = [worker]
    with psycopg.connect(database_url, autocommit=True) as db, MutationFlow(database_url, property_ids) as flow:
        warm_up(system, flow, db)

        frozen = time.monotonic()
        private_redis.freeze()
        try:
            # Two refused batches: two publishes timed out, so the freeze outlasted the timeout.
            wait_until(lambda: lines_with([relay], REFUSAL) >= 2, 30,
                       "the relay to time out on the frozen Redis twice")
        finally:
            private_redis.thaw()
        thawed = time.monotonic()
        during = flow.between(frozen, thawed)
        wait_until(lambda: len(flow.since(thawed)) >= 10, 10, "mutations after the thaw")
    assert not flow.errors, flow.errors
    assert during and max(c.seconds for c in during) < MUTATION_BOUND_S, "a mutation waited on the broker"

    system.wait_idle(timeout=90)
    idle_s = time.monotonic() - thawed
    assert relay.popen.poll() is None and all(w.popen.poll() is None for w in workers), system.logs()
    with psycopg.connect(database_url, autocommit=True) as db:
        histogram = assert_converged(db, max_attempts_seen=2)
    print(f"frozen {thawed - frozen:.1f}s: {len(during)} mutations committed meanwhile; "
          f"worker: {lines_with(workers, ACK_FAILED)} acks failed, {lines_with(workers, CONNECTION_LOST)} "
          f"connection losses; idle {idle_s:.1f}s after the thaw; done jobs by attempts {histogram}")
