"""The broker gone while mutations keep flowing: producers never notice (they do not touch the
broker), the relay backs off and resumes, workers reconnect, and everything converges with
each job applied once.

tests/e2e/test_broker_outage.py cuts only the relay's connection, with no mutation in flight
and no worker affected. Here the whole system loses the broker while a stream of mutations
commits before, during and after the outage:

- fast tier: every process reaches the broker through a TCP proxy that is cut and restored
  (the shared broker keeps serving everyone else);
- slow tier: a private RabbitMQ node is really stopped and started (a node boots in 5 s on
  this machine when idle, 9-17 s when busy; three boots make the test 45-80 s), which also
  shows that published but unconsumed messages survive a clean stop (durable queue,
  persistent messages).

A worker that loses the broker cancels the tasks it was running (acks_late + cancel on
connection loss) and the broker redelivers them: such an attempt is lost and counted, as the
design says, so a job may use a second attempt, never more for one outage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness.data import new_document, provision, upload
from tests.harness.flow import (
    FAR,
    MutationFlow,
    assert_converged,
    db_now,
    lines_with,
    start_pipeline,
    wait_for,
    warm_up,
)
from tests.harness.private_services import PrivateRabbitMQ
from tests.harness.system import System, first_broker_url, kill_all, queue_depth, wait_until
from tests.harness.tcp_proxy import TcpProxy, broker_address

REFUSAL = "broker refused a batch"
CONNECTION_LOST = "Connection to broker lost"
CANNOT_CONNECT = "Cannot connect to"
N_PROPERTIES = 8
#: A mutation takes milliseconds; a second would mean it waited on the broker.
MUTATION_BOUND_S = 1.0



def published_since(conn: psycopg.Connection, moment) -> int:
    return conn.execute("SELECT count(*) FROM outbox_job WHERE published_at > %s", [moment]).fetchone()[0]


def assert_outage_did_not_reach_producers(flow: MutationFlow, start: float, end: float) -> list:
    assert not flow.errors, flow.errors
    during = flow.between(start, end)
    assert len(during) >= 10, f"mutations should keep committing while the broker is down: {len(during)}"
    slowest = max(c.seconds for c in during)
    assert slowest < MUTATION_BOUND_S, f"a mutation took {slowest:.2f}s: it waited on the broker"
    return during


# -- fast tier: the broker cut off from every process by a TCP proxy -----------------------------


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(broker_address(first_broker_url())) as tcp_proxy:
        yield tcp_proxy


@pytest.fixture
def proxied_system(database_url: str, proxy: TcpProxy, tmp_path: Path) -> Iterator[System]:
    """One broker (RabbitMQ when the machine has it): Redis outages have their own module."""
    sut = System(database_url, proxy.url_for(first_broker_url()), tmp_path)
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()


def test_a_broker_cut_off_from_relay_and_workers_while_mutations_flow_fails_no_mutation_and_all_converges(
    proxied_system: System, database_url: str, proxy: TcpProxy
) -> None:
    system = proxied_system
    with psycopg.connect(database_url) as setup:
        property_ids = provision(setup, n_properties=N_PROPERTIES)
    worker, relay = start_pipeline(system)
    with psycopg.connect(database_url, autocommit=True) as db, MutationFlow(database_url, property_ids) as flow:
        warm_up(system, flow, db)

        cut_db = db_now(db)
        cut = time.monotonic()
        proxy.cut()
        # Long enough for the relay to back off three times and the worker to fail to reconnect.
        wait_for(system, lambda: lines_with([relay], REFUSAL) >= 3 and lines_with([worker], CONNECTION_LOST) >= 1
                 and lines_with([worker], CANNOT_CONNECT) >= 1, 30,
                 "the relay to be refused three times and the worker to fail to reconnect")
        wait_until(lambda: len(flow.since(cut)) >= 20, 10, "mutations during the outage")
        assert published_since(db, cut_db) == 0, "a job was published while the broker was cut off"
        pending = db.execute("SELECT count(*) FROM outbox_job WHERE status = 'pending'").fetchone()[0]
        assert pending > 0, "the outage's mutations should wait in the outbox"

        restored = time.monotonic()
        proxy.restore()
        wait_until(lambda: len(flow.since(restored)) >= 10, 10, "mutations after the outage")
    during = assert_outage_did_not_reach_producers(flow, cut, restored)

    system.wait_idle(timeout=90)
    idle_s = time.monotonic() - restored
    assert relay.popen.poll() is None and worker.popen.poll() is None, system.logs()
    with psycopg.connect(database_url, autocommit=True) as db:
        histogram = assert_converged(db, max_attempts_seen=2)
    print(f"proxy cut {restored - cut:.1f}s: {len(during)} mutations committed meanwhile, {pending} jobs waited; "
          f"idle {idle_s:.1f}s after the restore; done jobs by attempts {histogram}")


# -- slow tier: a private RabbitMQ node stopped and started ---------------------------------------


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    with PrivateRabbitMQ() as node:
        yield node


@pytest.fixture
def rabbit_system(database_url: str, private_rabbitmq: PrivateRabbitMQ, tmp_path: Path) -> Iterator[System]:
    sut = System(database_url, private_rabbitmq.url, tmp_path)
    try:
        yield sut
    finally:
        kill_all(sut)
        sut.stop()


@pytest.mark.slow
def test_a_rabbitmq_node_stopped_and_restarted_fails_no_mutation_keeps_queued_messages_and_all_converges(
    rabbit_system: System, database_url: str, private_rabbitmq: PrivateRabbitMQ
) -> None:
    system, node = rabbit_system, private_rabbitmq
    with psycopg.connect(database_url) as setup:
        property_ids = provision(setup, n_properties=N_PROPERTIES)
    worker, relay = start_pipeline(system)

    # 1. The node stops and starts again while mutations flow and the worker consumes.
    with psycopg.connect(database_url, autocommit=True) as db, MutationFlow(database_url, property_ids) as flow:
        warm_up(system, flow, db)
        stopped = time.monotonic()
        node.stop()
        wait_for(system, lambda: lines_with([relay], REFUSAL) >= 1 and lines_with([worker], CONNECTION_LOST) >= 1,
                 60, "the relay to be refused and the worker to lose the broker")
        wait_until(lambda: len(flow.since(stopped)) >= 20, 10, "mutations during the outage")
        node.start()
        started = time.monotonic()
        wait_until(lambda: len(flow.since(started)) >= 10, 10, "mutations after the restart")
    during = assert_outage_did_not_reach_producers(flow, stopped, started)
    system.wait_idle(timeout=120)
    converged_s = time.monotonic() - started
    with psycopg.connect(database_url, autocommit=True) as db:
        histogram = assert_converged(db, max_attempts_seen=2)

        # 2. Published, unconsumed messages survive a clean stop of the node.
        system.kill(worker)
        with psycopg.connect(database_url) as producer:
            waiting = sorted({upload(producer, pid, new_document("epc", FAR)) for pid in property_ids})
        wait_until(lambda: db.execute("SELECT count(*) FROM outbox_job WHERE id = ANY(%s) AND status = 'published'",
                                      [waiting]).fetchone()[0] == len(waiting), 30, "the jobs to be published")
        assert queue_depth(system) == len(waiting)
        node.stop()
        node.start()
        assert queue_depth(system) == len(waiting), "published messages did not survive a clean broker stop"
        system.start_worker()
        system.wait_idle(timeout=120)
        rows = db.execute("SELECT status, publish_count, rescue_count, attempts FROM outbox_job WHERE id = ANY(%s)",
                          [waiting]).fetchall()
        assert set(rows) == {("done", 1, 0, 1)}, f"the surviving messages should have run the jobs: {rows}"
        assert relay.popen.poll() is None, relay.output()
        assert_converged(db, max_attempts_seen=2)
    print(f"node boots {[round(s, 1) for s in node.boot_seconds]}s; first outage {started - stopped:.1f}s with "
          f"{len(during)} mutations committed; converged {converged_s:.1f}s after the restart; "
          f"done jobs by attempts {histogram}; {len(waiting)} queued messages survived the second stop")
