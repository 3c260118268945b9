"""Enqueue overhead: what the outbox adds to a realistic mutation transaction.

    .venv/bin/python bench/enqueue_overhead.py [--properties 200] [--transactions 2000] [--threads 4] [--reps 3]

Three variants on one database, measured in the same run, each thread committing
`transactions / threads` mutations on random properties:
  baseline        document INSERT + property UPDATE (what the app did before recalq)
  + outbox        the same plus `compliance_request_recalculation` (outbox request, job
                  upsert with coalescing, pending flag) in the same transaction
  full service    services.documents.add_documents: property lock, replay check, insert,
                  audit row, outbox request: what every upload endpoint runs

Reports throughput (commits/s) and commit latency p50/p99 per variant and the ratio to the
baseline (issue 5's target: <= 1.3x). Prints a table and writes bench/results/enqueue_overhead.json.
Needs PostgreSQL (BENCH_PG_ADMIN_URL, default postgres@127.0.0.1); creates and drops its own database.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from recalq import migrate
from recalq.settings import Settings
from services.documents import NewDocument, add_documents
from services.properties import NewProperty, provision_client
from services.vocabulary import Actor, ActorType, TriggerReason

ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "recalq_bench_enqueue"
ACTOR = Actor(ActorType.CLIENT, "bench")

INSERT_DOCUMENT = """
INSERT INTO documents (property_id, requirement_code, status, file_name, size_bytes, sha256, source)
VALUES (%(property_id)s, 'gas_safety', 'pending_verification', 'cp12.pdf', 1024, %(sha256)s, 'client')
"""
TOUCH_PROPERTY = "UPDATE properties SET updated_at = now() WHERE id = %(property_id)s"
REQUEST_RECALCULATION = (
    "SELECT * FROM compliance_request_recalculation(%(property_id)s, %(correlation_id)s, 'client_upload', "
    "'client', 'bench', NULL, true)"
)

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
        conn.execute(TOUCH_PROPERTY, {"property_id": property_id})


def full_service(conn: psycopg.Connection, property_id: int) -> None:
    add_documents(
        conn, property_id=property_id, source="client", actor=ACTOR, trigger=TriggerReason.CLIENT_UPLOAD,
        correlation_id=uuid.uuid4().hex,
        documents=[NewDocument("gas_safety", "cp12.pdf", 1024, _sha())],
    )


VARIANTS: dict[str, Mutation] = {"baseline": baseline, "+ outbox": with_outbox, "full service": full_service}


def _sha() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def fresh_database(properties: int) -> tuple[str, list[int]]:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    url = ADMIN.rsplit("/", 1)[0] + "/" + DB
    migrate.upgrade(Settings(database_url=url))
    with psycopg.connect(url, autocommit=True) as conn:
        made = provision_client(conn, name="Bench", properties=[NewProperty(f"P{i}") for i in range(properties)],
                                actor=Actor(ActorType.ADMIN, "bench"), correlation_id="bench-provision")
    return url, [p.property_id for p in made.properties]


def run_variant(url: str, mutate: Mutation, property_ids: list[int], transactions: int, threads: int) -> dict:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    per_thread = transactions // threads
    barrier = threading.Barrier(threads + 1)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        with psycopg.connect(url, autocommit=True) as conn:
            barrier.wait()
            try:
                for _ in range(per_thread):
                    started = time.perf_counter()
                    mutate(conn, rng.choice(property_ids))
                    mine.append(time.perf_counter() - started)
            except BaseException as exc:  # a failed commit makes the run meaningless: report it
                with lock:
                    errors.append(exc)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--properties", type=int, default=200)
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    url, property_ids = fresh_database(args.properties)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(args.reps):
            for name, mutate in VARIANTS.items():  # interleaved, so drift in the machine hits all alike
                runs[name].append(run_variant(url, mutate, property_ids, args.transactions, args.threads))
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    base = medians["baseline"]
    print(f"enqueue overhead: {args.transactions} commits x {args.reps} reps, {args.threads} threads, "
          f"{args.properties} properties (medians)")
    print(f"{'variant':<14}{'commits/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'x time (thr)':>14}{'x p50':>8}{'x p99':>8}")
    for name, m in medians.items():
        print(f"{name:<14}{m['commits_per_s']:>11.0f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
              f"{base['commits_per_s'] / m['commits_per_s']:>14.2f}{m['p50_ms'] / base['p50_ms']:>8.2f}"
              f"{m['p99_ms'] / base['p99_ms']:>8.2f}")
    out = Path(__file__).parent / "results" / "enqueue_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "medians": medians, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
