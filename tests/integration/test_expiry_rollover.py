"""The nightly expiry rollover against real PostgreSQL.

Properties are scored as of a chosen date by the real recalculator, then the calendar moves
(the rollover's `today`); the rollover must pick exactly the properties whose score the date
change can alter (scoring.document_state), once per property per day, whoever runs it and
however often, and catch up a night it missed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, timedelta

import psycopg
import pytest

from outbox.backoff import RetryPolicy
from services.documents import reject_document
from services.expiry_rollover import RolloverReport, roll_over_expiries
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from services.scoring import Document, DocumentStatus, document_state
from tests.harness.data import ADMIN, cid, new_document, provision, upload
from tests.harness.system import wait_until

D0 = date(2026, 3, 1)
POLICY = RecalculationPolicy(
    lease_seconds=30,
    retry=RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2),
    infra_retry=RetryPolicy(base_seconds=1, max_seconds=30, jitter=0.2),
    busy_retry_seconds=0.25,
    lock_timeout_ms=2000,
)


def score_waiting_jobs(database_url: str, as_of: date) -> None:
    """Runs every waiting job as a worker would, with the clock at `as_of`."""

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(database_url, autocommit=True) as c:
            yield c

    recalculator = Recalculator(connection=connection, policy=POLICY, today=lambda: as_of)
    with psycopg.connect(database_url, autocommit=True) as c:
        jobs = [r[0] for r in c.execute(
            "SELECT id FROM outbox_job WHERE status IN ('pending', 'published', 'retrying') ORDER BY id")]
    for job_id in jobs:
        outcome = recalculator.run(job_id)
        assert isinstance(outcome, Applied), outcome


def property_with(conn: psycopg.Connection, *documents, gas: bool = True) -> int:
    [property_id] = provision(conn, gas=gas)
    if documents:
        upload(conn, property_id, *documents)
    return property_id


def rollover_requests(conn: psycopg.Connection) -> dict[int, list[tuple[str, str, str, str]]]:
    """Rollover requests by property: (correlation id, trigger, actor type, actor id)."""
    rows = conn.execute(
        """SELECT compliance_property_id(j.payload), r.correlation_id, r.trigger_reason, r.actor_type, r.actor_id
             FROM outbox_request r JOIN outbox_job j ON j.id = r.job_id
            WHERE r.trigger_reason = 'expiry_rollover' ORDER BY r.id"""
    ).fetchall()
    conn.commit()
    found: dict[int, list[tuple[str, str, str, str]]] = {}
    for property_id, *request in rows:
        found.setdefault(property_id, []).append(tuple(request))
    return found


def verified(requirement: str, expires_at: date | None) -> object:
    return new_document(requirement, expires_at, DocumentStatus.VERIFIED)


def test_a_property_whose_document_expires_and_one_entering_the_window_are_picked_and_an_unaffected_one_is_not(
    conn: psycopg.Connection, database_url: str
) -> None:
    expires = property_with(conn, verified("gas_safety", D0))  # valid through D0, expired on D0 + 1
    enters_window = property_with(conn, verified("eicr", D0 + timedelta(days=31)))
    unaffected = property_with(conn, verified("epc", D0 + timedelta(days=400)), verified("eicr", None))
    score_waiting_jobs(database_url, D0)
    never_scored = property_with(conn, verified("gas_safety", D0))  # its first recalculation is queued

    report = roll_over_expiries(conn, today=D0 + timedelta(days=1))

    assert report == RolloverReport(enqueued=2, already_requested=0, scanned=4)
    today = (D0 + timedelta(days=1)).isoformat()
    assert rollover_requests(conn) == {
        expires: [(f"expiry-rollover:{today}", "expiry_rollover", "system", "beat")],
        enters_window: [(f"expiry-rollover:{today}", "expiry_rollover", "system", "beat")],
    }
    assert unaffected not in rollover_requests(conn) and never_scored not in rollover_requests(conn)
    pending = dict(conn.execute("SELECT id, compliance_score_pending FROM properties").fetchall())
    assert pending == {expires: True, enters_window: True, unaffected: False, never_scored: True}


def test_the_rollover_picks_exactly_the_properties_whose_document_state_changes_between_the_two_dates(
    conn: psycopg.Connection, database_url: str
) -> None:
    """Every status and expiry dates on both sides of both boundaries: the SQL must agree with
    scoring.document_state, the formula's own definition. A gas_safety document of a property
    without a gas supply never counts, whatever its dates."""
    today = D0 + timedelta(days=3)
    grid = [(status, None if offset is None else D0 + timedelta(days=offset))
            for status in DocumentStatus for offset in [*range(-2, 6), *range(29, 36), None]]
    cases: dict[int, Document] = {}
    for property_id, (status, expires_at) in zip(provision(conn, len(grid)), grid, strict=True):
        uploaded_as = DocumentStatus.VERIFIED if status is DocumentStatus.REJECTED else status
        upload(conn, property_id, new_document("eicr", expires_at, uploaded_as))
        if status is DocumentStatus.REJECTED:
            [document_id] = conn.execute("SELECT id FROM documents WHERE property_id = %s", [property_id]).fetchone()
            reject_document(conn, document_id=document_id, reason="unreadable", actor=ADMIN, correlation_id=cid())
            conn.commit()
        cases[property_id] = Document(0, "eicr", status, expires_at)
    no_gas = provision(conn, 2, gas=False)
    for property_id, expires_at in zip(no_gas, (D0, D0 + timedelta(days=31)), strict=True):
        upload(conn, property_id, verified("gas_safety", expires_at))
    score_waiting_jobs(database_url, D0)

    report = roll_over_expiries(conn, today=today, batch_size=7)

    expected = {pid for pid, document in cases.items()
                if document_state(document, D0) != document_state(document, today)}
    assert set(rollover_requests(conn)) == expected
    assert report == RolloverReport(enqueued=len(expected), already_requested=0, scanned=len(cases) + len(no_gas))
    assert 0 < len(expected) < len(cases)  # the grid has both kinds


def test_running_the_rollover_twice_on_one_day_enqueues_one_recalculation_per_property(
    conn: psycopg.Connection, database_url: str
) -> None:
    first = property_with(conn, verified("gas_safety", D0))
    second = property_with(conn, verified("eicr", D0 + timedelta(days=31)))
    score_waiting_jobs(database_url, D0)
    today = D0 + timedelta(days=1)

    assert roll_over_expiries(conn, today=today) == RolloverReport(enqueued=2, already_requested=0, scanned=2)
    assert roll_over_expiries(conn, today=today) == RolloverReport(enqueued=0, already_requested=2, scanned=2)

    requests = rollover_requests(conn)
    assert {pid: len(rs) for pid, rs in requests.items()} == {first: 1, second: 1}
    jobs = conn.execute(
        "SELECT coalescing_key, count(*) FROM outbox_job WHERE status = 'pending' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert jobs == sorted([(f"property:{first}", 1), (f"property:{second}", 1)])


def test_once_its_recalculation_has_run_a_property_is_not_picked_again_the_same_day(
    conn: psycopg.Connection, database_url: str
) -> None:
    property_id = property_with(conn, verified("gas_safety", D0))
    score_waiting_jobs(database_url, D0)
    today = D0 + timedelta(days=1)
    assert roll_over_expiries(conn, today=today).enqueued == 1
    score_waiting_jobs(database_url, today)

    assert roll_over_expiries(conn, today=today) == RolloverReport(enqueued=0, already_requested=0, scanned=1)
    assert len(rollover_requests(conn)[property_id]) == 1


def test_two_processes_rolling_over_at_once_enqueue_one_request_per_property(
    conn: psycopg.Connection, database_url: str
) -> None:
    """Both runs find the same properties and then queue up on the first one's row lock (held
    here by a third session until both are seen waiting), so they truly overlap."""
    properties = [property_with(conn, verified("gas_safety", D0)) for _ in range(6)]
    score_waiting_jobs(database_url, D0)
    today = D0 + timedelta(days=1)
    blocker = psycopg.connect(database_url)
    blocker.execute("SELECT 1 FROM properties WHERE id = %s FOR UPDATE", [min(properties)])
    start = threading.Barrier(2)

    def run() -> RolloverReport:
        with psycopg.connect(database_url) as own:
            start.wait(10)
            return roll_over_expiries(own, today=today, batch_size=4)

    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(run) for _ in range(2)]

            def both_waiting() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'").fetchone()
                conn.commit()
                return row is not None and row[0] == 2

            wait_until(both_waiting, timeout=10, what="both rollovers to wait on the locked property")
            blocker.commit()
            reports = [f.result(timeout=20) for f in futures]
    finally:
        blocker.close()

    assert sum(r.enqueued for r in reports) == len(properties)
    assert sum(r.already_requested for r in reports) == len(properties)
    assert {pid: len(rs) for pid, rs in rollover_requests(conn).items()} == {pid: 1 for pid in properties}


@pytest.mark.parametrize("document", [
    pytest.param(("gas_safety", 1), id="expiry"),
    pytest.param(("eicr", 32), id="window"),
])
def test_a_boundary_crossed_on_a_night_the_rollover_skipped_is_caught_up_by_the_next_run(
    conn: psycopg.Connection, database_url: str, document: tuple[str, int]
) -> None:
    requirement, offset = document
    # Crosses its boundary on D0 + 2: expired from then on, or inside the window from then on.
    property_id = property_with(conn, verified(requirement, D0 + timedelta(days=offset)))
    score_waiting_jobs(database_url, D0)
    assert roll_over_expiries(conn, today=D0 + timedelta(days=1)).enqueued == 0  # not crossed yet

    # The run of D0 + 2 never happened.
    report = roll_over_expiries(conn, today=D0 + timedelta(days=3))

    assert report.enqueued == 1
    [(correlation_id, *_)] = rollover_requests(conn)[property_id]
    assert correlation_id == f"expiry-rollover:{D0 + timedelta(days=3)}"


def test_a_batch_size_below_one_is_refused(conn: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        roll_over_expiries(conn, today=D0, batch_size=0)


def test_the_rollover_refuses_a_connection_inside_a_transaction_whose_batches_could_not_commit(
    conn: psycopg.Connection,
) -> None:
    conn.execute("SELECT 1")  # opens a transaction on this non-autocommit connection
    with pytest.raises(ValueError, match="not IDLE"):
        roll_over_expiries(conn, today=D0)
