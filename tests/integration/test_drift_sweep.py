"""The drift sweep against real PostgreSQL: verification runs in bounded batches, without
"Updating...", once per property per day, and the drift count the beat reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from outbox.backoff import RetryPolicy
from services.drift_sweep import SweepReport, drift_detected_since, sweep
from services.recalculation import Applied, RecalculationPolicy, Recalculator
from services.scoring import DocumentStatus
from tests.harness.data import new_document, provision, upload

TODAY = date(2026, 3, 2)
POLICY = RecalculationPolicy(
    lease_seconds=30,
    retry=RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2),
    infra_retry=RetryPolicy(base_seconds=1, max_seconds=30, jitter=0.2),
    busy_retry_seconds=0.25,
    lock_timeout_ms=2000,
)


def run_waiting_jobs(database_url: str) -> list[Applied]:
    """Runs every waiting job as a worker would, with the clock at TODAY."""

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(database_url, autocommit=True) as c:
            yield c

    recalculator = Recalculator(connection=connection, policy=POLICY, today=lambda: TODAY)
    with psycopg.connect(database_url, autocommit=True) as c:
        jobs = [r[0] for r in c.execute(
            "SELECT id FROM outbox_job WHERE status IN ('pending', 'published', 'retrying') ORDER BY id")]
    outcomes = [recalculator.run(job_id) for job_id in jobs]
    assert all(isinstance(o, Applied) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def scored_properties(conn: psycopg.Connection, database_url: str, n: int) -> list[int]:
    properties = provision(conn, n)
    for property_id in properties:
        upload(conn, property_id, new_document("gas_safety", date(2030, 1, 1), DocumentStatus.VERIFIED))
    run_waiting_jobs(database_url)
    return properties


def walk(conn: psycopg.Connection, batch_size: int) -> list[SweepReport]:
    reports = [sweep(conn, today=TODAY, batch_size=batch_size)]
    while reports[-1].next_after_property_id is not None:
        reports.append(sweep(conn, today=TODAY, batch_size=batch_size,
                             after_property_id=reports[-1].next_after_property_id))
    return reports


def sweep_requests(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute(
        """SELECT compliance_property_id(j.payload), r.correlation_id, r.actor_type, r.actor_id
             FROM outbox_request r JOIN outbox_job j ON j.id = r.job_id
            WHERE r.trigger_reason = 'drift_sweep' ORDER BY 1"""
    ).fetchall()
    conn.commit()
    return rows


def test_the_sweep_asks_for_verification_runs_batch_by_batch_without_marking_properties_pending(
    conn: psycopg.Connection, database_url: str
) -> None:
    scored = scored_properties(conn, database_url, 5)
    [never_scored] = provision(conn)  # its first recalculation is still waiting: nothing to verify
    generations = conn.execute("SELECT id, generation FROM properties ORDER BY id").fetchall()
    conn.commit()

    reports = walk(conn, batch_size=2)

    ids = sorted([*scored, never_scored])
    assert reports == [
        SweepReport(requested=2, next_after_property_id=ids[1]),
        SweepReport(requested=2, next_after_property_id=ids[3]),
        SweepReport(requested=1, next_after_property_id=ids[5]),  # ids[5] is the never-scored one
        SweepReport(requested=0, next_after_property_id=None),
    ]
    assert sweep_requests(conn) == [(pid, f"drift-sweep:{TODAY}", "system", "beat") for pid in sorted(scored)]
    pending = dict(conn.execute("SELECT id, compliance_score_pending FROM properties").fetchall())
    assert pending == {pid: pid == never_scored for pid in ids}
    assert conn.execute("SELECT id, generation FROM properties ORDER BY id").fetchall() == generations
    waiting = conn.execute("SELECT count(*) FROM outbox_job WHERE status = 'pending'").fetchone()
    assert waiting == (len(scored) + 1,)


def test_sweeping_again_the_same_day_asks_for_nothing_new(conn: psycopg.Connection, database_url: str) -> None:
    scored = scored_properties(conn, database_url, 3)
    assert sum(r.requested for r in walk(conn, batch_size=2)) == 3

    assert sum(r.requested for r in walk(conn, batch_size=2)) == 0
    assert len(sweep_requests(conn)) == len(scored)


def test_a_verification_run_of_a_tampered_score_is_counted_as_drift(
    conn: psycopg.Connection, database_url: str
) -> None:
    tampered, intact = scored_properties(conn, database_url, 2)
    conn.execute("UPDATE properties SET compliance_score = compliance_score - 1 WHERE id = %s", [tampered])
    conn.commit()
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert drift_detected_since(conn, before) == 0
    conn.commit()

    walk(conn, batch_size=10)
    outcomes = run_waiting_jobs(database_url)

    assert {o.property_id: o.drift_detected for o in outcomes} == {tampered: True, intact: False}
    assert drift_detected_since(conn, before) == 1
    assert drift_detected_since(conn, datetime.now(UTC) + timedelta(seconds=1)) == 0


def test_drift_detected_since_refuses_a_naive_time(conn: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        drift_detected_since(conn, datetime(2026, 1, 1))  # naive on purpose
