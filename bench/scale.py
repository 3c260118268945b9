"""Scale: the queries that run all day (relay claim and rescue, the views, the admin status and
job listing, `recalq status`) with a million finished jobs in the tables, against the same
queries beside a small history, in the same run.

    .venv/bin/python bench/scale.py [--finished 1000000] [--properties 10000] [--runs 7] [--quick]

The history is loaded with generate_series into a private database (recalq_bench_scale), and
1,000 finished jobs with the same backlog into another (recalq_bench_scale_small, the baseline):
done jobs with a request each (one in ten with two), spread over 14 days up to now, 2 % of them
superseded, 0.1 % dead, one key (property 1) holding a tenth of all jobs (a hot property), plus
a live backlog (pending, published, retrying, running; some published and running ones look lost
to the rescue scan). VACUUM ANALYZE after each load, so the planner sees the loaded table.

Each query runs `--runs` times on one connection per database the way its caller runs it
(psycopg prepares a statement after 5 executions, as in production), alternating between the two
databases so a busy spell hits both alike; the median is reported, with an EXPLAIN
(ANALYZE, BUFFERS) summary: node types, indexes used, rows. Claims are UPDATEs: they run in a
transaction that is rolled back, so every run claims the same rows. Target: each under 50 ms.
Writes bench/results/scale.json. Needs PostgreSQL (BENCH_PG_ADMIN_URL, default postgres@127.0.0.1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.report import at_most, print_result, result, row, write_json
from outbox.queries import QUERIES as OUTBOX
from recalq import migrate, operator
from recalq.settings import Settings
from services import admin_views
from services.queries import QUERIES as SERVICES

ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "recalq_bench_scale"
TASK = "compliance.recalculate_property"
TARGET_MS = 50.0
SMALL_FINISHED = 1_000

#: Finished history, one statement. Ids are given (OVERRIDING SYSTEM VALUE) so each job's key
#: is a function of its id: every tenth job is the hot property 1's, the rest spread over all.
LOAD_FINISHED = """
INSERT INTO outbox_job (id, task, coalescing_key, payload, status, attempts, max_attempts, next_run_at,
                        last_error, created_at, updated_at, published_at, publish_count, started_at,
                        finished_at)
OVERRIDING SYSTEM VALUE
SELECT g, %(task)s, 'property:' || k.p, jsonb_build_object('property_id', k.p),
       CASE WHEN g %% 1000 = 500 THEN 'dead' ELSE 'done' END::outbox_job_status,
       CASE WHEN g %% 1000 = 500 THEN 5 ELSE 1 END, 5, t.at,
       CASE WHEN g %% 1000 = 500 THEN 'TransientRecalculationError: lock timeout' END,
       t.at, t.at + interval '40 ms', t.at + interval '5 ms', 1, t.at + interval '12 ms', t.at + interval '40 ms'
  FROM generate_series(1, %(n)s) g
 CROSS JOIN LATERAL (SELECT CASE WHEN g %% 10 = 0 THEN 1
                                 ELSE 1 + (g::bigint * 7919) %% %(properties)s END AS p) k
 CROSS JOIN LATERAL (SELECT now() - interval '14 days' + (g::float8 / %(n)s) * (interval '14 days' - interval '2 s')
                            AS at) t
"""

#: A lost running job replaced by its key's next job (2 % of the history).
LOAD_SUPERSEDED = """
UPDATE outbox_job j
   SET status = 'superseded',
       superseded_by = (SELECT min(n.id) FROM outbox_job n WHERE n.coalescing_key = j.coalescing_key AND n.id > j.id)
 WHERE j.id % 50 = 7 AND j.status = 'done'
   AND EXISTS (SELECT 1 FROM outbox_job n WHERE n.coalescing_key = j.coalescing_key AND n.id > j.id)
"""

LOAD_REQUESTS = """
INSERT INTO outbox_request (job_id, coalescing_key, correlation_id, trigger_reason, actor_type, actor_id, created_at)
SELECT j.id, j.coalescing_key, 'c-' || j.id, 'client_upload', 'client', 'bench', j.created_at
  FROM outbox_job j
UNION ALL
SELECT j.id, j.coalescing_key, 'x-' || j.id, 'verify', 'admin', 'bench', j.created_at + interval '1 ms'
  FROM outbox_job j WHERE j.id % 10 = 3
"""

#: The live backlog, on keys of their own (at most one waiting and one running job per key).
#: Two in a hundred published and running jobs look lost to the rescue scan.
LOAD_BACKLOG = """
INSERT INTO outbox_job (task, coalescing_key, payload, status, attempts, max_attempts, next_run_at, last_error,
                        created_at, updated_at, published_at, publish_count, started_at, heartbeat_at,
                        lease_expires_at)
SELECT %(task)s, 'property:' || p, jsonb_build_object('property_id', p), s.status::outbox_job_status,
       CASE WHEN s.status IN ('retrying', 'running') THEN 1 ELSE 0 END, 5,
       CASE WHEN s.status = 'retrying' THEN now() + ((p %% 20) - 10) * interval '1 s' ELSE now() - interval '1 s' END,
       CASE WHEN s.status = 'retrying' THEN 'TransientRecalculationError: lock timeout' END,
       now() - interval '2 s', now(),
       CASE WHEN s.status <> 'pending' THEN now() - CASE WHEN p %% 50 = 0 THEN interval '10 min'
                                                         ELSE interval '1 s' END END,
       CASE WHEN s.status <> 'pending' THEN 1 ELSE 0 END,
       CASE WHEN s.status = 'running' THEN now() - interval '1 s' END,
       CASE WHEN s.status = 'running' THEN now() - interval '1 s' END,
       CASE WHEN s.status = 'running' THEN now() + CASE WHEN p %% 50 = 0 THEN interval '-10 min'
                                                        ELSE interval '2 min' END END
  FROM generate_series(2, 1 + %(pending)s + %(published)s + %(retrying)s + %(running)s) p
 CROSS JOIN LATERAL (SELECT CASE WHEN p <= 1 + %(pending)s THEN 'pending'
                                 WHEN p <= 1 + %(pending)s + %(published)s THEN 'published'
                                 WHEN p <= 1 + %(pending)s + %(published)s + %(retrying)s THEN 'retrying'
                                 ELSE 'running' END AS status) s
"""

Timed = Callable[[psycopg.Connection], Any]


def fresh_database(name: str) -> str:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    migrate.upgrade(Settings(database_url=url))
    return url


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def load(url: str, *, finished: int, properties: int, backlog: dict[str, int]) -> dict[str, Any]:
    """Empties the tables and loads `finished` history jobs plus the backlog; returns counts."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("TRUNCATE outbox_request, outbox_job, properties, clients RESTART IDENTITY CASCADE")
        conn.execute("INSERT INTO clients (name) SELECT 'Client ' || g FROM generate_series(1, 100) g")
        conn.execute(
            "INSERT INTO properties (client_id, name) SELECT 1 + g %% 100, 'P' || g FROM generate_series(1, %s) g",
            [properties],
        )
        conn.execute(LOAD_FINISHED, {"task": TASK, "n": finished, "properties": properties})
        conn.execute("SELECT setval(pg_get_serial_sequence('outbox_job', 'id'), %s)", [finished])
        conn.execute(LOAD_SUPERSEDED)
        conn.execute(LOAD_BACKLOG, {"task": TASK, **backlog})
        conn.execute(LOAD_REQUESTS)  # one request per job, backlog included; a tenth get a second
        conn.commit()
    loaded = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        counts = dict(conn.execute(
            "SELECT status::text, count(*) FROM outbox_job GROUP BY status ORDER BY status").fetchall())
        counts["requests"] = conn.execute("SELECT count(*) FROM outbox_request").fetchone()[0]
    counts["load_s"] = round(loaded, 1)
    counts["load_and_vacuum_s"] = round(time.perf_counter() - started, 1)
    return counts


# -- the queries ----------------------------------------------------------------------------------

def _rolled_back(sql: str, params: dict[str, Any]) -> Timed:
    def run(conn: psycopg.Connection) -> Any:
        with conn.transaction(force_rollback=True):
            return conn.execute(sql, params).fetchall()
    return run


def _select(sql: str, params: dict[str, Any] | None = None) -> Timed:
    return lambda conn: conn.execute(sql, params).fetchall()


def cases(conn: psycopg.Connection, hot_property: int, typical_property: int) -> list[dict[str, Any]]:
    """Each: name, the timed call, the statements to EXPLAIN, rolled back?, does the target apply?"""
    dead_job_id = conn.execute("SELECT max(id) FROM outbox_job WHERE status = 'dead'").fetchone()[0] or 1
    claim = (OUTBOX["claim_due_jobs"], {"lease_seconds": 30.0, "limit": 500})
    lost = (OUTBOX["claim_lost_jobs"], {"lease_seconds": 30.0, "grace_seconds": 300.0,
                                        "takeover_grace_seconds": 60.0, "limit": 500})
    queue_all = ("SELECT * FROM compliance_recalc_queue", None)
    queue_prop = ("SELECT * FROM compliance_recalc_queue WHERE property_id = %(p)s", {"p": typical_property})
    # What docs/operations.md tells operators to run: job_id (v2) is the order an index keeps.
    queue_hot = ("SELECT * FROM compliance_recalc_queue WHERE property_id = %(p)s ORDER BY job_id DESC LIMIT 50",
                 {"p": hot_property})
    queue_hot_key = ("SELECT * FROM compliance_recalc_queue WHERE coalescing_key = %(k)s "
                     "ORDER BY job_id DESC LIMIT 50", {"k": f"property:{hot_property}"})
    queue_hot_v1 = ("SELECT * FROM compliance_recalc_queue WHERE property_id = %(p)s "
                    "ORDER BY created_at DESC LIMIT 50", {"p": hot_property})
    queue_active = ("SELECT * FROM compliance_recalc_queue WHERE status IN ('pending', 'published', 'running', "
                    "'retrying')", None)
    queue_active_latest = ("SELECT * FROM compliance_recalc_queue WHERE status IN ('pending', 'published', "
                           "'running', 'retrying') ORDER BY job_id DESC LIMIT 50", None)
    queue_client = ("SELECT * FROM compliance_recalc_queue WHERE client_id = %(c)s AND status IN ('pending', "
                    "'published', 'running', 'retrying')", {"c": 7})
    state_all = ("SELECT * FROM outbox_queue_state", None)
    state_busy = ("SELECT task, status, jobs, relay_lag_s, finished_last_5m FROM outbox_queue_state WHERE jobs > 0",
                  None)

    def jobs_params(**kw: Any) -> dict[str, Any]:
        return {"status": None, "coalescing_key": None, "task": None, "before_id": None, "limit": 51, **kw}

    def status_queries(pid: int) -> list[tuple[str, dict[str, Any]]]:
        of_key = {"coalescing_key": f"property:{pid}", "limit": admin_views.STATUS_JOBS}
        job_ids = [r[0] for r in conn.execute(SERVICES["admin_jobs_of_key"], of_key).fetchall()]
        return [(SERVICES["admin_property_current"], {"property_id": pid}),
                (SERVICES["admin_jobs_of_key"], of_key),
                (SERVICES["admin_requests_of_jobs"], {"job_ids": job_ids, "per_job": admin_views.REQUESTS_PER_JOB})]

    listing = [
        ("/api/admin/jobs (no filter)", {}, jobs_params()),
        ("/api/admin/jobs?status=dead", {"status": "dead"}, jobs_params(status="dead")),
        ("/api/admin/jobs?status=retrying", {"status": "retrying"}, jobs_params(status="retrying")),
        ("/api/admin/jobs?status=pending", {"status": "pending"}, jobs_params(status="pending")),
        (f"/api/admin/jobs?key=property:{hot_property}", {"key": f"property:{hot_property}"},
         jobs_params(coalescing_key=f"property:{hot_property}")),
        ("/api/admin/jobs?task=...&before_id=(deep page)", {"task": TASK, "before_id": dead_job_id},
         jobs_params(task=TASK, before_id=dead_job_id)),
    ]
    out: list[dict[str, Any]] = [
        {"name": "relay claim_due_jobs (limit 500)", "run": _rolled_back(*claim), "explain": [claim], "rollback": True},
        {"name": "relay claim_lost_jobs (limit 500)", "run": _rolled_back(*lost), "explain": [lost], "rollback": True},
        {"name": "SELECT * FROM compliance_recalc_queue", "run": _select(*queue_all), "explain": [queue_all],
         "target": False,
         "note": "returns every request ever kept (one row per request): a dump, not an interactive query; "
                 "time grows with the rows returned"},
        {"name": "compliance_recalc_queue WHERE property_id", "run": _select(*queue_prop), "explain": [queue_prop],
         "note": "no order, no limit: the planner ignores statistics of a partial index's expression and "
                 "guesses 0.5 % of all jobs per property, so it plans a parallel bitmap scan for ~100 rows "
                 "(see migration 0009); the latest-50 rows are the form operators are given"},
        {"name": "compliance_recalc_queue hot property, latest 50",
         "run": _select(*queue_hot), "explain": [queue_hot]},
        {"name": "compliance_recalc_queue hot key, latest 50",
         "run": _select(*queue_hot_key), "explain": [queue_hot_key]},
        {"name": "compliance_recalc_queue hot, by created_at (v1)", "run": _select(*queue_hot_v1),
         "explain": [queue_hot_v1], "target": False,
         "note": "the v1 way, kept for comparison: created_at is a request column no index orders per "
                 "property, so every request of the property is read and sorted; operators are told to "
                 "order by job_id"},
        {"name": "compliance_recalc_queue WHERE status active", "run": _select(*queue_active),
         "explain": [queue_active],
         "note": "returns the whole live backlog: the jobs come from ix_outbox_job_status_next_run_at in a few "
                 "pages at any history size; the time follows the backlog (a request look-up and a property "
                 "per live job, every row sent), as the baseline with the same backlog shows"},
        {"name": "compliance_recalc_queue status active, latest 50", "run": _select(*queue_active_latest),
         "explain": [queue_active_latest]},
        {"name": "compliance_recalc_queue WHERE client_id, active", "run": _select(*queue_client),
         "explain": [queue_client]},
        {"name": "SELECT * FROM outbox_queue_state", "run": _select(*state_all), "explain": [state_all]},
        {"name": "outbox_queue_state WHERE jobs > 0", "run": _select(*state_busy), "explain": [state_busy]},
        {"name": "recalq status / GET /api/admin/queue", "run": operator.queue_state,
         "explain": [(SERVICES["admin_queue_state"], None)]},
        {"name": f"compliance-recalc-status (hot property, {hot_property})",
         "run": lambda conn: admin_views.recalc_status(conn, hot_property), "explain": status_queries(hot_property)},
        {"name": "compliance-recalc-status (typical property)",
         "run": lambda conn: admin_views.recalc_status(conn, typical_property),
         "explain": status_queries(typical_property)},
    ]
    for name, kwargs, params in listing:
        out.append({"name": name, "run": lambda conn, kw=kwargs: admin_views.jobs(conn, limit=50, **kw),
                    "explain": [(SERVICES["admin_jobs"], params)]})
    return out


def time_cases(conns: dict[str, psycopg.Connection], cases_by_db: dict[str, dict[str, Any]],
               runs: int) -> dict[str, dict[str, Any]]:
    """Runs one query on each database in turn, `runs` rounds, so a busy spell on the machine
    hits the small and the big history alike."""
    times: dict[str, list[float]] = {db: [] for db in conns}
    for _ in range(runs):
        for db, conn in conns.items():
            started = time.perf_counter()
            cases_by_db[db]["run"](conn)
            times[db].append(1000 * (time.perf_counter() - started))
    out = {}
    for db, conn in conns.items():
        case = cases_by_db[db]
        plans = [explain(conn, sql, params, case.get("rollback", False)) for sql, params in case["explain"]]
        out[db] = {"median_ms": statistics.median(times[db]), "min_ms": min(times[db]), "max_ms": max(times[db]),
                   "plans": plans, "target": case.get("target", True), "note": case.get("note")}
    return out


def explain(conn: psycopg.Connection, sql: str, params: dict[str, Any] | None, rollback: bool) -> dict[str, Any]:
    statement = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql
    with conn.transaction(force_rollback=rollback):
        doc = conn.execute(statement, params, prepare=False).fetchone()[0][0]
    nodes: list[str] = []
    kinds: list[str] = []
    indexes: set[str] = set()
    seq_scans: set[str] = set()

    def walk(node: dict[str, Any], depth: int) -> None:
        kind = node["Node Type"]
        if node.get("Index Name"):
            indexes.add(node["Index Name"])
        if kind == "Seq Scan":
            seq_scans.add(node.get("Relation Name", "?"))
        kinds.append(kind)
        label = kind
        if node.get("Index Name"):
            label += f" using {node['Index Name']}"
        if node.get("Relation Name"):
            label += f" on {node['Relation Name']}"
        nodes.append(f"{'  ' * depth}{label} rows={node.get('Actual Rows')}x{node.get('Actual Loops')}")
        for child in node.get("Plans", []):
            walk(child, depth + 1)

    walk(doc["Plan"], 0)
    top = doc["Plan"]
    return {
        "execution_ms": doc.get("Execution Time"), "planning_ms": doc.get("Planning Time"),
        "rows": top.get("Actual Rows"),
        "shared_hit": top.get("Shared Hit Blocks"), "shared_read": top.get("Shared Read Blocks"),
        "node_types": sorted(set(kinds)), "indexes": sorted(indexes), "seq_scans": sorted(seq_scans),
        "tree": nodes,
    }


def measure(urls: dict[str, str], runs: int, hot: int, typical: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{database: {query name: timings and plans}}."""
    conns = {db: psycopg.connect(url, autocommit=True) for db, url in urls.items()}
    try:
        per_db = {db: cases(conn, hot, typical) for db, conn in conns.items()}
        out: dict[str, dict[str, dict[str, Any]]] = {db: {} for db in conns}
        for i, case in enumerate(per_db[next(iter(conns))]):
            measured = time_cases(conns, {db: per_db[db][i] for db in conns}, runs)
            for db in conns:
                out[db][case["name"]] = measured[db]
        return out
    finally:
        for conn in conns.values():
            conn.close()


def plan_note(m: dict[str, Any]) -> str:
    parts = []
    for p in m["plans"]:
        index = ", ".join(p["indexes"]) or "no index"
        seq = f"; seq scan on {', '.join(p['seq_scans'])}" if p["seq_scans"] else ""
        parts.append(f"{index}{seq}; {p['rows']} rows; {p['execution_ms']:.1f} ms in server")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished jobs in the big history")
    parser.add_argument("--properties", type=int, default=10_000)
    parser.add_argument("--pending", type=int, default=2_000)
    parser.add_argument("--published", type=int, default=500)
    parser.add_argument("--retrying", type=int, default=50)
    parser.add_argument("--running", type=int, default=20)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per query (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the databases for a look with psql")
    parser.add_argument("--quick", action="store_true", help="50k finished jobs, 1,000 properties, 5 runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.finished, args.properties, args.runs = 50_000, 1_000, 5
        args.pending, args.published, args.retrying, args.running = 200, 50, 10, 5
    backlog = {"pending": args.pending, "published": args.published, "retrying": args.retrying,
               "running": args.running}
    if sum(backlog.values()) + 2 > args.properties:
        parser.error("the backlog needs a property of its own per live job: raise --properties")
    hot, typical = 1, args.properties - 1

    names = {"small": DB + "_small", "big": DB}
    try:
        urls = {size: fresh_database(name) for size, name in names.items()}
        small_counts = load(urls["small"], finished=SMALL_FINISHED, properties=args.properties, backlog=backlog)
        big_counts = load(urls["big"], finished=args.finished, properties=args.properties, backlog=backlog)
        measured = measure(urls, args.runs, hot, typical)
    finally:
        for name in names.values():
            if not args.keep:
                drop_database(name)
    small, big = measured["small"], measured["big"]

    rows = []
    for name, m in big.items():
        applies = m["target"]
        rows.append(row(
            name, m["median_ms"], "ms", baseline=small[name]["median_ms"],
            baseline_name=f"{SMALL_FINISHED:,} finished", target=f"< {TARGET_MS:.0f} ms" if applies else None,
            met=at_most(m["median_ms"], TARGET_MS) if applies else None,
            note=((m["note"] + ". ") if m["note"] else "") + "plan: " + plan_note(m),
        ))
    res = result(
        "scale", f"Scale: queries beside {args.finished:,} finished jobs vs {SMALL_FINISHED:,} "
                 f"(median of {args.runs} runs)", rows,
        params=vars(args),
        details={"loaded": {"big": big_counts, "small": small_counts},
                 "big": big,
                 "small": small},
    )
    print(f"loaded: small {small_counts}; big {big_counts}")
    print_result(res)
    for name, m in big.items():
        slow = m["target"] and m["median_ms"] >= TARGET_MS
        if slow:
            print(f"\nslow: {name}")
            for p in m["plans"]:
                print("\n".join("    " + line for line in p["tree"]))
    print(f"wrote {write_json('scale', res)}")
    return res


if __name__ == "__main__":
    main()
