"""The invariants every end-to-end and fault test checks once the system is idle.

I1 no property is pending unless its latest job is DEAD
I2 every stored score equals the formula on the current data (as of the stored date)
I3 one history snapshot and one COMPLIANCE_SCORE_UPDATED row per applied job, never more
I4 no committed job is left unpublished or unfinished
I5 attempts never exceed max_attempts; DEAD jobs record why, and a recalculation's death is
   audited (COMPLIANCE_RECALC_FAILED)
I6 no advisory lock is left behind
"""

from __future__ import annotations

from datetime import date

import psycopg
from psycopg.rows import dict_row

from services.scoring import Document, DocumentStatus, ScoringInputs, score
from services.vocabulary import RECALCULATE_TASK


def expected_score(conn: psycopg.Connection, property_id: int, as_of: date) -> tuple[int, dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        prop = cur.execute("SELECT has_gas_supply FROM properties WHERE id = %s", [property_id]).fetchone()
        docs = cur.execute(
            "SELECT id, requirement_code, status, expires_at FROM documents "
            "WHERE property_id = %s AND deleted_at IS NULL",
            [property_id],
        ).fetchall()
    assert prop is not None
    inputs = ScoringInputs.of(
        prop["has_gas_supply"],
        [Document(d["id"], d["requirement_code"], DocumentStatus(d["status"]), d["expires_at"]) for d in docs],
    )
    result = score(inputs, as_of)
    return result.score, result.breakdown()


def assert_invariants(conn: psycopg.Connection, property_ids: list[int] | None = None) -> None:
    with conn.cursor(row_factory=dict_row) as cur:
        where = "WHERE p.id = ANY(%(ids)s)" if property_ids is not None else ""
        props = cur.execute(
            f"""SELECT p.id, p.compliance_score_pending, p.compliance_score, p.compliance_breakdown,
                       p.compliance_as_of, p.generation, p.scored_generation,
                       (SELECT j.status FROM outbox_job j
                         WHERE j.coalescing_key = 'property:' || p.id ORDER BY j.id DESC LIMIT 1) AS last_status
                  FROM properties p {where}""",
            {"ids": property_ids},
        ).fetchall()
        for p in props:
            if p["compliance_score_pending"]:
                assert p["last_status"] == "dead", f"I1: property {p['id']} pending with last job {p['last_status']}"
                continue
            assert p["compliance_score"] is not None, f"I2: property {p['id']} was never scored"
            want, breakdown = expected_score(conn, p["id"], p["compliance_as_of"])
            assert p["compliance_score"] == want, f"I2: property {p['id']} score {p['compliance_score']} != {want}"
            assert p["compliance_breakdown"] == breakdown, f"I2: property {p['id']} breakdown differs"

        dup = cur.execute(
            """SELECT job_id, count(*) AS n FROM audit_log WHERE action = 'COMPLIANCE_SCORE_UPDATED'
               GROUP BY job_id HAVING count(*) > 1"""
        ).fetchall()
        assert not dup, f"I3: jobs audited more than once: {dup}"
        mismatch = cur.execute(
            """SELECT count(*) AS n FROM property_compliance_score_history h
               FULL JOIN (SELECT job_id FROM audit_log WHERE action = 'COMPLIANCE_SCORE_UPDATED') a
                 ON a.job_id = h.job_id
              WHERE h.job_id IS NULL OR a.job_id IS NULL"""
        ).fetchone()
        assert mismatch["n"] == 0, "I3: a snapshot without its audit row, or the reverse"
        done_without_snapshot = cur.execute(
            """SELECT count(*) AS n FROM outbox_job j
                WHERE j.status = 'done'
                  AND NOT EXISTS (SELECT 1 FROM property_compliance_score_history h WHERE h.job_id = j.id)"""
        ).fetchone()
        assert done_without_snapshot["n"] == 0, "I3: a done job without its snapshot"

        active = cur.execute(
            "SELECT id, status FROM outbox_job WHERE status IN ('pending', 'published', 'running', 'retrying')"
        ).fetchall()
        assert not active, f"I4: jobs not finished: {active}"

        bad_attempts = cur.execute(
            """SELECT id FROM outbox_job WHERE attempts > max_attempts
                OR (status = 'dead' AND last_error IS NULL)"""
        ).fetchall()
        assert not bad_attempts, f"I5: {bad_attempts}"
        unaudited_deaths = cur.execute(
            """SELECT j.id FROM outbox_job j
                WHERE j.status = 'dead' AND j.task = %s
                  AND NOT EXISTS (SELECT 1 FROM audit_log a
                                   WHERE a.action = 'COMPLIANCE_RECALC_FAILED' AND a.job_id = j.id)""",
            [RECALCULATE_TASK],
        ).fetchall()
        assert not unaudited_deaths, f"I5: DEAD recalculations without their audit row: {unaudited_deaths}"
        locks = cur.execute("SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()").fetchone()
        assert locks["n"] == 0, "I6: advisory locks left behind"
