"""G1: a broker outage never fails a mutation; its jobs wait in the outbox and drain once the
broker is back. The outage is between the relay and its broker only (a TCP proxy), so the
shared RabbitMQ and Redis keep serving everyone else."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import date

import pytest

from services.scoring import REQUIREMENTS, DocumentStatus
from tests.harness.data import new_document, provision, upload
from tests.harness.invariants import assert_invariants
from tests.harness.observe import assert_fresh_score, connect, job
from tests.harness.system import Process, System, wait_until
from tests.harness.tcp_proxy import TcpProxy, broker_address

FAR = date(2031, 6, 30)
REFUSAL = "broker refused a batch"
#: A mutation's own work takes milliseconds; seconds would mean it waited on the broker.
MUTATION_BOUND_S = 3.0


@pytest.fixture
def proxy(broker_url: str) -> Iterator[TcpProxy]:
    with TcpProxy(broker_address(broker_url)) as tcp_proxy:
        yield tcp_proxy


def refusals(relay: Process) -> int:
    return sum(REFUSAL in line for line in list(relay.lines))


def retry_delays(relay: Process) -> list[float]:
    """The delays the relay announced after each refused batch, in order."""
    return [float(m.group(1)) for line in list(relay.lines) if REFUSAL in line
            and (m := re.search(r"retrying in ([0-9.]+)s", line))]


@pytest.mark.parametrize("blackhole", [False, True], ids=["refused", "blackholed"])
def test_a_broker_outage_fails_no_mutation_and_its_jobs_drain_once_the_broker_is_back(
    system: System, database_url: str, broker_url: str, proxy: TcpProxy, blackhole: bool
) -> None:
    with connect(database_url) as conn:
        property_ids = provision(conn, n_properties=3)
        system.start_worker()
        relay = system.start_relay(env={"RECALQ_BROKER_URL": proxy.url_for(broker_url)})
        system.wait_idle()
        assert proxy.accepted["forward"] >= 1, "the relay should publish through the proxy"

        proxy.cut(blackhole=blackhole)
        cut_at = time.monotonic()
        before = refusals(relay)
        jobs = set()
        for i, requirement in enumerate(REQUIREMENTS * 2):
            started = time.monotonic()
            jobs.add(upload(conn, property_ids[i % 3], new_document(requirement, FAR, DocumentStatus.VERIFIED)))
            assert time.monotonic() - started < MUTATION_BOUND_S, "a mutation waited on the broker"
        assert len(jobs) == 3  # one waiting job per property, however many mutations

        # Each publish attempt fails within the broker timeout (5 s) and is retried after a
        # backoff capped at 5 s: two failed rounds fit well within 60 s.
        wait_until(lambda: refusals(relay) >= before + 1, 60, "the relay to fail to publish")
        first_failure_s = time.monotonic() - cut_at
        wait_until(lambda: refusals(relay) >= before + 2, 60, "the relay to fail to publish again")
        print(f"first refused batch {first_failure_s:.1f}s after the cut, "
              f"the second {time.monotonic() - cut_at:.1f}s after it")
        assert relay.popen.poll() is None, f"the relay died during the outage:\n{relay.output()}"
        for job_id in jobs:
            row = job(conn, job_id)
            assert (row["status"], row["published_at"]) == ("pending", None), row
        for property_id in property_ids:
            pending = conn.execute(
                "SELECT compliance_score_pending FROM properties WHERE id = %s", [property_id]
            ).fetchone()
            assert pending == (True,)

        proxy.restore()
        system.wait_idle(timeout=120)
        assert relay.popen.poll() is None
        for job_id in jobs:
            assert job(conn, job_id)["status"] == "done"
        for property_id in property_ids:
            assert assert_fresh_score(conn, property_id) > 0  # the outage's uploads are reflected
        assert_invariants(conn)


def test_the_relay_backs_off_longer_and_longer_while_the_broker_stays_down(
    system: System, database_url: str, broker_url: str, proxy: TcpProxy
) -> None:
    """A relay that retries at a fixed short delay hammers the broker and PostgreSQL (it
    reconnects to both) for as long as the outage lasts; its delay must grow to its cap."""
    with connect(database_url) as conn:
        [property_id] = provision(conn)
        proxy.cut()
        relay = system.start_relay(env={"RECALQ_BROKER_URL": proxy.url_for(broker_url)})
        wait_until(lambda: refusals(relay) >= 6, 60, "six refused batches")
        delays = retry_delays(relay)[:6]
        print("relay retry delays while the broker was down:", delays)
        assert delays == sorted(delays) and delays[-1] >= 1.0, (
            f"the relay's retry delay does not grow during an outage: {delays}\n{relay.output()}"
        )

        proxy.restore()
        system.start_worker()
        system.wait_idle()
        assert relay.popen.poll() is None
        assert_fresh_score(conn, property_id)
