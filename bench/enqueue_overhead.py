"""Enqueue overhead: what the outbox adds to a realistic mutation transaction (issue 5, bench 1).

    .venv/bin/python bench/enqueue_overhead.py [--transactions 2000] [--threads 4] [--reps 3]
                                               [--properties 200] [--scenario both] [--quick]

Two pairs of variants on one database, measured in the same run, interleaved rep by rep so
that the busy machine's drift hits every variant alike. Each pair is a transaction with and
without the outbox write; everything else in the transaction is the same:

  baseline          document INSERT + property UPDATE (updated_at): the mutation without recalq
  + outbox          compliance_request_recalculation + document INSERT. The function locks the
                    property, records the request, joins or creates the job and bumps the
                    generation; that bump is the property UPDATE (it sets updated_at too), so
                    the baseline's own UPDATE is not repeated
  service baseline  what services.documents.add_documents writes with the outbox taken out:
                    document INSERT, audit row, property UPDATE, through the same named queries
  full service      add_documents itself: property lock + replay check, document INSERT, audit
                    row, compliance_request_recalculation

Scenarios (--scenario): "coalesced" picks random properties among --properties, so after the
first request of a property every request joins its waiting job (a burst; no worker runs);
"fresh" gives every transaction a property with no waiting job, so every request creates a
job and sends the relay's NOTIFY (steady state with workers keeping up).

Reports commits/s and commit latency p50/p99 per variant (medians over reps), the ratio of
each outbox variant to its baseline, and issue 5's target (<= 1.3x). Also prints each
variant's anatomy from one connection: round trips and WAL records/bytes per transaction
(auto_explain, so superuser only; skipped otherwise). Writes bench/results/enqueue_overhead.json.
Needs PostgreSQL (BENCH_PG_ADMIN_URL, default postgres@127.0.0.1); creates and drops its own
database. --revision measures an older schema (e.g. 0006_superseded_by_index for the v1 enqueue).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import result as report_result
from bench.report import row, write_json
from recalq import migrate
from recalq.settings import Settings
from services import audit
from services.documents import NewDocument, add_documents
from services.properties import NewProperty, provision_client
from services.queries import QUERIES
from services.vocabulary import Actor, ActorType, AuditAction, TriggerReason

ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "recalq_bench_enqueue"
ACTOR = Actor(ActorType.CLIENT, "bench")
TARGET = 1.3
NAME = "enqueue_overhead"

INSERT_DOCUMENT = """
INSERT INTO documents (property_id, requirement_code, status, file_name, size_bytes, sha256, source)
VALUES (%(property_id)s, 'gas_safety', 'pending_verification', 'cp12.pdf', 1024, %(sha256)s, 'client')
"""
TOUCH_PROPERTY = "UPDATE properties SET updated_at = now() WHERE id = %(property_id)s"
REQUEST_RECALCULATION = (
    "SELECT * FROM compliance_request_recalculation(%(property_id)s, %(correlation_id)s, 'client_upload', "
    "'client', 'bench', NULL, true)"
)
#: Untimed, between runs of the fresh scenario: every waiting job is finished, as if a worker
#: had run it, so the next request of any property creates a job.
FINISH_WAITING_JOBS = """
UPDATE outbox_job
   SET status = 'done', attempts = 1, started_at = now(), finished_at = now(), claimed_until = NULL
 WHERE status IN ('pending', 'published', 'retrying')
"""
PROVISION_CHUNK = 1000
VACUUMED = ("outbox_job", "outbox_request", "properties", "documents", "audit_log")

Mutation = Callable[[psycopg.Connection, int], None]


def baseline(conn: psycopg.Connection, property_id: int) -> None:
    with conn.transaction():
        conn.execute(INSERT_DOCUMENT, {"property_id": property_id, "sha256": _sha()})
        conn.execute(TOUCH_PROPERTY, {"property_id": property_id})


def with_outbox(conn: psycopg.Connection, property_id: int) -> None:
    # The request comes first: it locks the property row FOR UPDATE, and taking that lock after
    # the document INSERT's foreign-key share lock deadlocks two writers of one property.
    with conn.transaction():
        conn.execute(REQUEST_RECALCULATION, {"property_id": property_id, "correlation_id": uuid.uuid4().hex})
        conn.execute(INSERT_DOCUMENT, {"property_id": property_id, "sha256": _sha()})


def service_baseline(conn: psycopg.Connection, property_id: int) -> None:
    """add_documents with the outbox taken out: no lock or replay check, no request; the
    generation bump becomes the plain updated_at touch a service without recalq would do."""
    correlation_id = uuid.uuid4().hex
    with conn.transaction():
        row = conn.execute(QUERIES["insert_document"], _document_params(property_id)).fetchone()
        assert row is not None
        audit.record(
            conn, AuditAction.DOCUMENT_UPLOADED, ACTOR, property_id=property_id, client_id=None,
            correlation_id=correlation_id, details={"document_ids": [row[0]], "trigger": "client_upload"},
        )
        conn.execute(TOUCH_PROPERTY, {"property_id": property_id})


def full_service(conn: psycopg.Connection, property_id: int) -> None:
    add_documents(
        conn, property_id=property_id, source="client", actor=ACTOR, trigger=TriggerReason.CLIENT_UPLOAD,
        correlation_id=uuid.uuid4().hex,
        documents=[NewDocument("gas_safety", "cp12.pdf", 1024, _sha())],
    )


VARIANTS: dict[str, Mutation] = {
    "baseline": baseline,
    "+ outbox": with_outbox,
    "service baseline": service_baseline,
    "full service": full_service,
}
#: Each outbox variant and the baseline it is compared with.
PAIRS = {"+ outbox": "baseline", "full service": "service baseline"}
SCENARIOS = ("coalesced", "fresh")


def _sha() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def _document_params(property_id: int) -> dict:
    return {"property_id": property_id, "requirement_code": "gas_safety", "status": "pending_verification",
            "expires_at": None, "file_name": "cp12.pdf", "size_bytes": 1024, "sha256": _sha(), "source": "client"}


def fresh_database(properties: int, revision: str) -> tuple[str, list[int]]:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    url = ADMIN.rsplit("/", 1)[0] + "/" + DB
    migrate.upgrade(Settings(database_url=url), revision)
    property_ids: list[int] = []
    with psycopg.connect(url, autocommit=True) as conn:
        # A client is provisioned with at most PROVISION_CHUNK properties at once.
        for first in range(0, properties, PROVISION_CHUNK):
            names = [NewProperty(f"P{i}") for i in range(first, min(first + PROVISION_CHUNK, properties))]
            made = provision_client(conn, name=f"Bench {first}", properties=names,
                                    actor=Actor(ActorType.ADMIN, "bench"), correlation_id=f"bench-provision-{first}")
            property_ids += [p.property_id for p in made.properties]
        conn.execute(FINISH_WAITING_JOBS)
    return url, property_ids


def prepare_run(url: str, scenario: str) -> None:
    """Untimed: the same starting state for every variant of a rep."""
    with psycopg.connect(url, autocommit=True) as conn:
        if scenario == "fresh":
            conn.execute(FINISH_WAITING_JOBS)
        for table in VACUUMED:
            conn.execute(f"VACUUM (ANALYZE) {table}")


def plans(scenario: str, property_ids: list[int], hot: int, transactions: int, threads: int,
          seed: int) -> list[list[int]]:
    """The properties each thread mutates, in order."""
    rng = random.Random(seed)
    per_thread = transactions // threads
    if scenario == "coalesced":
        return [[rng.choice(property_ids[:hot]) for _ in range(per_thread)] for _ in range(threads)]
    pool = rng.sample(property_ids, per_thread * threads)  # distinct: every request creates a job
    return [pool[i * per_thread:(i + 1) * per_thread] for i in range(threads)]


def run_variant(url: str, mutate: Mutation, thread_plans: list[list[int]]) -> dict:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(thread_plans) + 1)

    def worker(plan: list[int]) -> None:
        mine = []
        with psycopg.connect(url, autocommit=True) as conn:
            barrier.wait()
            try:
                for property_id in plan:
                    started = time.perf_counter()
                    mutate(conn, property_id)
                    mine.append(time.perf_counter() - started)
            except BaseException as exc:  # a failed commit makes the run meaningless: report it
                with lock:
                    errors.append(exc)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker, args=(plan,)) for plan in thread_plans]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} thread(s) failed; first: {errors[0]!r}")
    latencies.sort()
    return {
        "commits_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


_PLAN = re.compile(r"plan:\s*(\{.*\})\s*$", re.DOTALL)


def anatomy(url: str, mutate: Mutation, property_ids: list[int], samples: int) -> dict | None:
    """Round trips and WAL per transaction, from auto_explain on one connection (no commit
    record: every variant writes one), medians over the samples. None when auto_explain
    cannot be loaded (not superuser)."""
    plans_seen: list[dict] = []
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute("LOAD 'auto_explain'")
        except psycopg.Error:
            return None
        for setting in ("log_min_duration = 0", "log_analyze = on", "log_wal = on", "log_timing = off",
                        "log_format = json", "log_level = notice"):
            conn.execute(f"SET auto_explain.{setting}")
        conn.add_notice_handler(lambda diag: plans_seen.append(_plan_of(diag.message_primary or "")))
        per_tx = []
        for property_id in property_ids[:samples]:
            plans_seen.clear()
            mutate(conn, property_id)
            seen = [p for p in plans_seen if p is not None]
            per_tx.append((len(seen), sum(p.get("WAL Records", 0) for p in seen),
                           sum(p.get("WAL Bytes", 0) for p in seen), sum(p.get("WAL FPI", 0) for p in seen)))
    # A full-page image (first change of a page after a checkpoint) says nothing about the
    # variant: bytes come from the transactions that wrote none, if any did.
    without_fpi = [b for _, _, b, fpi in per_tx if fpi == 0] or [min(b for _, _, b, _ in per_tx)]
    return {
        "round_trips": statistics.median(s for s, _, _, _ in per_tx) + 2,  # + BEGIN and COMMIT
        "wal_records": statistics.median(r for _, r, _, _ in per_tx),
        "wal_bytes": statistics.median(without_fpi),
    }


def _plan_of(message: str) -> dict | None:
    found = _PLAN.search(message)
    if not found:
        return None
    return json.loads(found.group(1))["Plan"]


def ratio_rows(medians: dict[str, dict]) -> dict[str, dict]:
    ratios = {}
    for variant, base_name in PAIRS.items():
        m, base = medians[variant], medians[base_name]
        r = {"vs": base_name,
             "throughput": base["commits_per_s"] / m["commits_per_s"],
             "p50": m["p50_ms"] / base["p50_ms"],
             "p99": m["p99_ms"] / base["p99_ms"]}
        r["meets_target"] = max(r["throughput"], r["p50"], r["p99"]) <= TARGET
        ratios[variant] = r
    return ratios


def print_table(args: argparse.Namespace, measured: dict) -> None:
    print(f"enqueue overhead: {args.transactions} commits x {args.reps} reps, {args.threads} threads, "
          f"schema {measured['revision']} (medians; ratio = variant / its baseline; target <= {TARGET}x)")
    head = (f"{'scenario':<10}{'variant':<18}{'commits/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'x thr':>7}{'x p50':>7}{'x p99':>7}  target")
    print(head)
    print("-" * len(head))
    for scenario, data in measured["scenarios"].items():
        for name, m in data["medians"].items():
            line = f"{scenario:<10}{name:<18}{m['commits_per_s']:>10.0f}{m['p50_ms']:>8.2f}{m['p99_ms']:>8.2f}"
            r = data["ratios"].get(name)
            if r:
                worst = max(r["throughput"], r["p50"], r["p99"])
                verdict = "ok" if r["meets_target"] else f"MISSED (worst {worst:.2f}x)"
                line += f"{r['throughput']:>7.2f}{r['p50']:>7.2f}{r['p99']:>7.2f}  {verdict}"
            print(line)
    if measured["anatomy"]:
        print("\nper transaction, one connection (auto_explain; WAL without the commit record or full-page images):")
        print(f"{'scenario':<10}{'variant':<18}{'round trips':>12}{'WAL records':>12}{'WAL bytes':>10}")
        for key, a in measured["anatomy"].items():
            scenario, name = key.split("/", 1)
            print(f"{scenario:<10}{name:<18}{a['round_trips']:>12.0f}{a['wal_records']:>12.0f}{a['wal_bytes']:>10.0f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--properties", type=int, default=200, help="hot properties of the coalesced scenario")
    parser.add_argument("--transactions", type=int, default=2000, help="commits per variant per rep")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenario", choices=(*SCENARIOS, "both"), default="both")
    parser.add_argument("--revision", default="head", help="schema revision to measure (default head)")
    parser.add_argument("--no-anatomy", action="store_true", help="skip the per-transaction WAL/round-trip profile")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (300 commits, 1 rep)")
    args = parser.parse_args(argv)
    if args.quick:
        args.transactions, args.reps = min(args.transactions, 300), 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    scenarios = SCENARIOS if args.scenario == "both" else (args.scenario,)
    per_run = (args.transactions // args.threads) * args.threads
    url, property_ids = fresh_database(max(args.properties, per_run), args.revision)
    measured: dict = {"revision": args.revision, "target": TARGET, "scenarios": {}, "anatomy": {}}
    try:
        runs = {s: {name: [] for name in VARIANTS} for s in scenarios}
        for rep in range(args.reps):
            for scenario in scenarios:
                for name, mutate in VARIANTS.items():  # interleaved, so drift hits all alike
                    prepare_run(url, scenario)
                    thread_plans = plans(scenario, property_ids, args.properties, args.transactions,
                                         args.threads, seed=rep)
                    runs[scenario][name].append(run_variant(url, mutate, thread_plans))
        for scenario in scenarios:
            medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
                       for name, results in runs[scenario].items()}
            measured["scenarios"][scenario] = {"medians": medians, "ratios": ratio_rows(medians),
                                               "runs": runs[scenario]}
        if not args.no_anatomy:
            for scenario in scenarios:
                for name, mutate in VARIANTS.items():
                    prepare_run(url, scenario)
                    sample = plans(scenario, property_ids, args.properties, 20, 1, seed=99)[0]
                    found = anatomy(url, mutate, sample, samples=20)
                    if found is None:
                        break
                    measured["anatomy"][f"{scenario}/{name}"] = found
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

    print_table(args, measured)
    outcome = report_result(NAME, "Enqueue overhead: a mutation transaction with and without the outbox write",
                            report_rows(measured), params=vars(args), details=measured)
    print(f"wrote {write_json(NAME, outcome)}")
    return outcome


def report_rows(measured: dict) -> list[dict]:
    """bench/report.py's rows: per scenario and outbox variant, throughput and p50/p99 against
    the variant's own baseline. The throughput ratio is time per commit (baseline rate / rate),
    so every ratio reads "x times the cost" and the one target applies."""
    rows = []
    for scenario, data in measured["scenarios"].items():
        medians = data["medians"]
        for variant, r in data["ratios"].items():
            m, base = medians[variant], medians[r["vs"]]
            baseline_name = f"{r['vs']}, same run"
            rows.append(row(f"{scenario}: {variant} commits/s", m["commits_per_s"], "commits/s",
                            baseline=base["commits_per_s"], baseline_name=baseline_name, ratio=r["throughput"],
                            target=f"<= {TARGET}x time", met=r["throughput"] <= TARGET,
                            note="ratio = baseline rate / outbox rate (time per commit)"))
            for key, label in (("p50", "p50_ms"), ("p99", "p99_ms")):
                rows.append(row(f"{scenario}: {variant} commit {key}", m[label], "ms", baseline=base[label],
                                baseline_name=baseline_name, ratio=r[key], target=f"<= {TARGET}x",
                                met=r[key] <= TARGET))
    return rows


if __name__ == "__main__":
    main()
