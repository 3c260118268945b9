"""Worker throughput: full recalculations per second with one 2-process worker, beside no-op
Celery tasks drained by the same worker flags on the same broker in the same run.

    .venv/bin/python bench/worker_throughput.py [--jobs 3000] [--documents 3] [--reps 3]
                                                [--broker rabbitmq --broker redis] [--quick]

recalq: `--jobs` properties with `--documents` documents each are made through the services
(each ends with one pending job), the real relay code publishes every job (confirms on
RabbitMQ), then `celery -A recalq.celery_app worker -P prefork -c 2` starts and recalculates them all:
fenced start, score, drift check, history snapshot, audit rows, completion. Rate = jobs /
(last finished_at - first started_at), both from Postgres; the rate including start-up counts
from the worker's spawn. Every job must end done after one attempt with one history row and one
COMPLIANCE_SCORE_UPDATED audit row, or the run is reported as invalid.

Baseline: the same number of no-op tasks (same kwargs shape) pre-queued with recalq's Celery
configuration and drained by a worker of the same flags; rate = tasks / (last start - first
start) as in ../shared/bench-peers/worker_consume.py. Target: >= 600 recalculations/s.
Also reported: CPU milliseconds per job of the worker's processes and (recalq) of the Postgres
backends serving it, sampled from /proc while the run lasts: on a machine shared with other
work the rates measure the machine, the CPU per job measures the code.
Prints a table and writes bench/results/worker_throughput.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.common import (
    BaselineWorker,
    CpuMeter,
    baseline_sender,
    broker_urls,
    cpu_per_job,
    create_properties,
    delete_queue,
    fmt,
    log,
    print_table,
    private_database,
    recalq_env,
    spread,
    start_recalq_worker,
    unique_queue,
    wait_until,
    write_result,
)

NAME = "worker_throughput"
TARGET = 600.0
RECALQ = "recalq recalculation"
BASELINE = "celery no-op task"


def _prequeue_recalq(database_url: str, broker_url: str, queue: str, jobs: int, documents: int) -> list[int]:
    from recalq.bootstrap import Runtime
    from recalq.settings import Settings

    property_ids = create_properties(database_url, jobs, documents)
    runtime = Runtime(Settings(database_url=database_url, broker_url=broker_url, queue=queue))
    try:
        with runtime.connect() as conn:
            published = runtime.relay().drain(conn)
            conn.commit()
            job_ids = [r[0] for r in conn.execute(
                "SELECT id FROM outbox_job WHERE coalescing_key = ANY(%s) AND status = 'published' ORDER BY id",
                [[f"property:{p}" for p in property_ids]],
            )]
    finally:
        runtime.celery_app.close()
        runtime.close()
    if published != jobs or len(job_ids) != jobs:
        raise RuntimeError(f"expected {jobs} published jobs, relay published {published}, found {len(job_ids)}")
    return job_ids


def run_recalq(database_url: str, broker_url: str, jobs: int, documents: int, timeout: float) -> dict[str, Any]:
    queue = unique_queue("wt")
    try:
        job_ids = _prequeue_recalq(database_url, broker_url, queue, jobs, documents)
        worker = start_recalq_worker(recalq_env(database_url, broker_url, queue))
        meter = CpuMeter(worker.popen.pid, database_url)
        samples: list[tuple[int, float, float]] = []
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                def finished() -> bool:
                    row = conn.execute(
                        "SELECT count(*) FROM outbox_job WHERE id = ANY(%s) AND finished_at IS NOT NULL",
                        [job_ids]).fetchone()
                    if worker.popen.poll() is not None:
                        raise RuntimeError(f"worker exited:\n{worker.output()}")
                    assert row is not None
                    samples.append((row[0], *meter.sample()))
                    return row[0] == jobs

                wait_until(finished, timeout, f"{jobs} recalculations", interval=0.1)
        except BaseException:
            log(f"recalq worker output:\n{worker.output()}")
            raise
        finally:
            meter.close()
            worker.stop()
        with psycopg.connect(database_url, autocommit=True) as conn:
            first, last, done, max_attempts = conn.execute(
                """SELECT extract(epoch FROM min(started_at))::float8, extract(epoch FROM max(finished_at))::float8,
                          count(*) FILTER (WHERE status = 'done'), max(attempts)
                     FROM outbox_job WHERE id = ANY(%s)""", [job_ids]).fetchone()
            history = conn.execute("SELECT count(*) FROM property_compliance_score_history WHERE job_id = ANY(%s)",
                                   [job_ids]).fetchone()[0]
            audits = conn.execute(
                "SELECT count(*) FROM audit_log WHERE job_id = ANY(%s) AND action = 'COMPLIANCE_SCORE_UPDATED'",
                [job_ids]).fetchone()[0]
        valid = done == jobs and history == jobs and audits == jobs and max_attempts == 1
        if not valid:
            log(f"recalq run invalid: done={done} history={history} audits={audits} max_attempts={max_attempts}")
        worker.cleanup()
        return {"rate": jobs / (last - first), "rate_incl_startup": jobs / (last - worker.spawned_at),
                "span_s": last - first, "count": done, "valid": valid, "cpu_per_job": cpu_per_job(samples)}
    finally:
        delete_queue(broker_url, queue)


def run_baseline(broker_url: str, tasks: int, timeout: float) -> dict[str, Any]:
    queue = unique_queue("wt-base")
    try:
        sender = baseline_sender(broker_url, queue)
        try:
            with sender.producer_or_acquire() as producer:
                for i in range(tasks):
                    sender.send_task("bench.noop", kwargs={"job_id": i, "payload": {"property_id": i}},
                                     queue=queue, producer=producer)
        finally:
            sender.close()
        worker = BaselineWorker(broker_url, queue)
        meter = CpuMeter(worker.popen.pid)
        samples: list[tuple[int, float, float]] = []
        try:
            def drained() -> bool:
                if worker.popen.poll() is not None:
                    raise RuntimeError(f"baseline worker exited:\n{worker.output()}")
                count = worker.count()
                samples.append((count, *meter.sample()))
                return count >= tasks

            wait_until(drained, timeout, f"{tasks} no-op tasks", interval=0.1)
        finally:
            meter.close()
            worker.stop()
        starts = [start for start, _ in worker.records()]
        worker.cleanup()
        first, last = min(starts), max(starts)
        return {"rate": len(starts) / (last - first), "rate_incl_startup": len(starts) / (last - worker.spawned_at),
                "span_s": last - first, "count": len(starts), "valid": len(starts) == tasks,
                "cpu_per_job": cpu_per_job(samples)}
    finally:
        delete_queue(broker_url, queue)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (default 3000; 300 with --quick)")
    parser.add_argument("--documents", type=int, default=3, help="documents per property")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--broker", action="append", help="rabbitmq, redis or a URL (repeatable; default both)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    jobs = args.jobs or (300 if args.quick else 3000)
    reps = args.reps or (1 if args.quick else 3)
    timeout = 120 + jobs / 20

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with private_database("wt") as database_url:
        for broker, url in broker_urls(args.broker).items():
            for rep in range(1, reps + 1):
                for variant in (RECALQ, BASELINE):
                    run = (run_recalq(database_url, url, jobs, args.documents, timeout) if variant == RECALQ
                           else run_baseline(url, jobs, timeout))
                    log(f"{broker} rep {rep} {variant}: {run['rate']:,.0f}/s "
                        f"(incl. start-up {run['rate_incl_startup']:,.0f}/s, {run['count']} in {run['span_s']:.2f}s)")
                    runs.setdefault((broker, variant), []).append(run)

    rows = []
    result: dict[str, Any] = {"benchmark": NAME, "jobs": jobs, "documents_per_property": args.documents,
                              "reps": reps, "target_per_s": TARGET, "results": []}
    for (broker, variant), reps_runs in runs.items():
        rate = spread([r["rate"] for r in reps_runs])
        incl = spread([r["rate_incl_startup"] for r in reps_runs])
        base = spread([r["rate"] for r in runs[(broker, BASELINE)]])
        cpus = [r["cpu_per_job"] for r in reps_runs if r["cpu_per_job"]]
        cpu = ({k: spread([c[k] for c in cpus]) for k in ("worker_ms", "postgres_ms")} if cpus else None)
        entry = {"broker": broker, "variant": variant, "rate": rate, "rate_incl_startup": incl,
                 "ratio_vs_baseline": rate["median"] / base["median"], "valid": all(r["valid"] for r in reps_runs),
                 "cpu_ms_per_job": cpu, "runs": reps_runs}
        result["results"].append(entry)
        rows.append([broker, variant, fmt(rate, 0), fmt(incl, 0), f"{entry['ratio_vs_baseline']:.2f}x",
                     f"{cpu['worker_ms']['median']:.2f}" if cpu else "-",
                     f"{cpu['postgres_ms']['median']:.2f}" if cpu and variant == RECALQ else "-",
                     "yes" if entry["valid"] else "NO"])
    print(f"\nWorker throughput, {jobs} jobs ({args.documents} documents/property), prefork -c 2, "
          f"median (min-max) of {reps}")
    print_table(["broker", "variant", "per s", "per s incl. start-up", "vs baseline", "worker CPU ms/job",
                 "Postgres CPU ms/job", "all applied"], rows)
    verdicts = []
    for entry in result["results"]:
        if entry["variant"] != RECALQ:
            continue
        median = entry["rate"]["median"]
        met = median >= TARGET and entry["valid"]
        verdicts.append({"broker": entry["broker"], "met": met, "median": median})
        print(f"target >= {TARGET:.0f} recalculations/s on {entry['broker']}: "
              f"{'met' if met else 'MISSED'} ({median:,.0f}/s, {median / TARGET:.2f}x of target)")
    result["target"] = verdicts
    write_result(NAME, result)
    return result


if __name__ == "__main__":
    main()
