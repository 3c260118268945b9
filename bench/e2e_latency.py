"""End-to-end latency: mutation commit -> recalculation task start, beside Celery's own
send_task -> task start on the same broker in the same run.

    .venv/bin/python bench/e2e_latency.py [--samples 1000] [--interval-ms 20] [--reps 3]
                                          [--broker rabbitmq --broker redis] [--quick]

recalq: a real relay (`recalq relay`, woken by LISTEN/NOTIFY) and a real worker (`celery -A
tasks worker -P prefork -c 2`) run against a private database. Each sample is a document
upload through services.documents.add_documents on its own property (so no coalescing), its
COMMIT issued on a fixed schedule; the sender takes time.time() just before the COMMIT. The
receiver's timestamp is the job's started_at, written by the fenced start (`outbox_start`, the
first statement of the task body, `now()` of its transaction): the moment the worker took the
job, recorded in Postgres, on the same machine's clock. No probe or timing hook is added.

Baseline: the method of ../shared/bench-peers/celery_latency.py with recalq's Celery
configuration (JSON, acks_late, prefetch 1, publisher confirms on RabbitMQ) and the same worker
flags: the sender's time.time() just before send_task, the no-op task body's time.time() at
its start. Warm-up samples are discarded on both sides.

The default spacing is 20 ms, not the peers' 5 ms: each recalq sample is a full recalculation,
and at 200/s on this 2-core machine the worker would be measuring its queue, not its latency.
Targets: p50 <= 10 ms, p99 <= 30 ms. Prints a table, writes bench/results/e2e_latency.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.common import (
    BENCH_ACTOR_ID,
    BaselineWorker,
    baseline_sender,
    broker_urls,
    create_properties,
    delete_queue,
    fmt,
    log,
    percentile,
    print_table,
    private_database,
    recalq_env,
    sample_documents,
    spread,
    start_recalq_worker,
    start_relay,
    unique_queue,
    wait_until,
    write_result,
)

NAME = "e2e_latency"
TARGET_P50_MS = 10.0
TARGET_P99_MS = 30.0
RECALQ = "recalq commit -> task start"
BASELINE = "celery send_task -> task start"
PERCENTILES = (50, 95, 99)


def _latency_stats(samples_ms: list[float]) -> dict[str, float]:
    out = {f"p{p}": percentile(samples_ms, p) for p in PERCENTILES}
    out["max"] = max(samples_ms)
    return out


def _schedule(count: int, interval: float) -> list[float]:
    first = time.perf_counter() + 0.05
    return [first + i * interval for i in range(count)]


def _sleep_until(target: float) -> None:
    delay = target - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _idle(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM outbox_job WHERE status IN ('pending', 'published', 'running', 'retrying')"
    ).fetchone()
    return row is not None and row[0] == 0


def run_recalq(database_url: str, property_ids: list[int], warmup: int, interval: float,
               timeout: float) -> dict[str, Any]:
    """One run on a running relay and worker: one upload per property, commits on a schedule."""
    from services.documents import add_documents
    from services.vocabulary import Actor, ActorType, TriggerReason

    client = Actor(ActorType.CLIENT, BENCH_ACTOR_ID)
    sent: list[tuple[int, float]] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        for i, (property_id, target) in enumerate(zip(property_ids, _schedule(len(property_ids), interval),
                                                      strict=True)):
            documents = sample_documents(i, 1)
            # The upload runs as a savepoint inside this transaction, so its COMMIT is ours to time.
            with conn.transaction():
                added = add_documents(conn, property_id=property_id, documents=documents, source="client",
                                      actor=client, trigger=TriggerReason.CLIENT_UPLOAD,
                                      correlation_id=f"bench-{uuid.uuid4()}")
                _sleep_until(target)
                sent_at = time.time()
            sent.append((added.job_id, sent_at))
        wait_until(lambda: _idle(conn), timeout, "every sampled job to finish", interval=0.1)
        job_ids = [job_id for job_id, _ in sent]
        started = dict(conn.execute(
            "SELECT id, extract(epoch FROM started_at)::float8 FROM outbox_job WHERE id = ANY(%s)",
            [job_ids]).fetchall())
        retried = conn.execute("SELECT count(*) FROM outbox_job WHERE id = ANY(%s) AND attempts <> 1",
                               [job_ids]).fetchone()[0]
    latencies = [(started[job_id] - sent_at) * 1000 for job_id, sent_at in sent[warmup:]]
    return {"samples": len(latencies), "more_than_one_attempt": retried, **_latency_stats(latencies)}


def run_baseline(worker: BaselineWorker, broker_url: str, queue: str, samples: int, warmup: int,
                 interval: float, timeout: float) -> dict[str, Any]:
    """One run on a running baseline worker: no-op tasks sent on the same schedule."""
    sender = baseline_sender(broker_url, queue)
    before = worker.count()
    first_sent = time.time()
    try:
        with sender.producer_or_acquire() as producer:
            for i, target in enumerate(_schedule(samples + warmup, interval)):
                _sleep_until(target)
                sent_at = time.time()
                sender.send_task("bench.noop", kwargs={"job_id": i, "payload": {"property_id": i},
                                                       "sent_ts": sent_at if i >= warmup else -sent_at},
                                 queue=queue, producer=producer)
    finally:
        sender.close()
    wait_until(lambda: worker.count() >= before + samples + warmup, timeout, "the no-op tasks", interval=0.05)
    latencies = [(start - sent_ts) * 1000 for start, sent_ts in worker.records() if sent_ts >= first_sent]
    return {"samples": len(latencies), **_latency_stats(latencies)}


def measure_broker(database_url: str, broker: str, url: str, property_ids: list[int], args: argparse.Namespace,
                   reps: int) -> dict[str, list[dict[str, Any]]]:
    interval = args.interval_ms / 1000
    timeout = 120 + len(property_ids) * interval * 4
    queue, base_queue = unique_queue("lat"), unique_queue("lat-base")
    env = recalq_env(database_url, url, queue)
    runs: dict[str, list[dict[str, Any]]] = {RECALQ: [], BASELINE: []}
    processes = []
    try:
        processes.append(start_recalq_worker(env))
        processes.append(start_relay(env))
        baseline = BaselineWorker(url, base_queue)
        processes.append(baseline)
        with psycopg.connect(database_url, autocommit=True) as conn:
            # The properties' first scores (queued when they were made) run now; then one more
            # upload goes through end to end, so relay and worker are up before the clock runs.
            wait_until(lambda: _idle(conn), timeout, "the initial recalculations", interval=0.1)
        run_recalq(database_url, property_ids[:1], 0, interval, timeout)
        run_baseline(baseline, url, base_queue, 1, 0, interval, timeout)
        for rep in range(1, reps + 1):
            recalq = run_recalq(database_url, property_ids, args.warmup, interval, timeout)
            base = run_baseline(baseline, url, base_queue, args.samples, args.warmup, interval, timeout)
            for variant, run in ((RECALQ, recalq), (BASELINE, base)):
                log(f"{broker} rep {rep} {variant}: p50 {run['p50']:.2f} p95 {run['p95']:.2f} "
                    f"p99 {run['p99']:.2f} max {run['max']:.2f} ms ({run['samples']} samples)")
                runs[variant].append(run)
    except BaseException:
        for proc in processes:
            log(f"--- {proc.name}:\n{proc.output()}")
        raise
    finally:
        for proc in processes:
            proc.stop()
            proc.cleanup()
        delete_queue(url, queue)
        delete_queue(url, base_queue)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="samples per run (default 1000; 60 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded samples first (default 20; 10 quick)")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="spacing of the samples")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--broker", action="append", help="rabbitmq, redis or a URL (repeatable; default both)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    args.samples = args.samples or (60 if args.quick else 1000)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 20)
    reps = args.reps or (1 if args.quick else 3)

    all_runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with private_database("lat") as database_url:
        property_ids = create_properties(database_url, args.samples + args.warmup, documents_each=3)
        for broker, url in broker_urls(args.broker).items():
            for variant, runs in measure_broker(database_url, broker, url, property_ids, args, reps).items():
                all_runs[(broker, variant)] = runs

    result: dict[str, Any] = {"benchmark": NAME, "samples": args.samples, "warmup": args.warmup,
                              "interval_ms": args.interval_ms, "reps": reps,
                              "target_ms": {"p50": TARGET_P50_MS, "p99": TARGET_P99_MS}, "results": []}
    rows = []
    for (broker, variant), runs in all_runs.items():
        stats = {k: spread([r[k] for r in runs]) for k in ("p50", "p95", "p99", "max")}
        base = all_runs[(broker, BASELINE)]
        ratio = {k: stats[k]["median"] / spread([r[k] for r in base])["median"] for k in ("p50", "p99")}
        result["results"].append({"broker": broker, "variant": variant, **stats, "ratio_vs_baseline": ratio,
                                  "runs": runs})
        rows.append([broker, variant, *(fmt(stats[k], 2) for k in ("p50", "p95", "p99", "max")),
                     f"{ratio['p50']:.1f}x / {ratio['p99']:.1f}x"])
    print(f"\nEnd-to-end latency (ms), {args.samples} samples {args.interval_ms:g} ms apart, prefork -c 2, "
          f"median (min-max) of {reps}")
    print_table(["broker", "variant", "p50", "p95", "p99", "max", "p50/p99 vs baseline"], rows)
    verdicts = []
    for entry in result["results"]:
        if entry["variant"] != RECALQ:
            continue
        p50, p99 = entry["p50"]["median"], entry["p99"]["median"]
        met = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
        verdicts.append({"broker": entry["broker"], "met": met, "p50": p50, "p99": p99})
        print(f"target p50 <= {TARGET_P50_MS:g} ms and p99 <= {TARGET_P99_MS:g} ms on {entry['broker']}: "
              f"{'met' if met else 'MISSED'} (p50 {p50:.2f} ms, p99 {p99:.2f} ms)")
    result["target"] = verdicts
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
