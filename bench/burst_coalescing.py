"""Coalescing under a burst: many mutations on few properties, as fast as the producers can
commit them, while a real relay and a real `celery worker` (prefork -c 2) keep up.

    .venv/bin/python bench/burst_coalescing.py [--mutations 10000] [--properties 100] [--producers 8]
                                               [--broker URL ...] [--min-interval SECONDS ...] [--quick]

Each producer is a thread with its own connection calling the services a client's request
calls: `add_documents` (lock the property, replay check, insert, audit, outbox request, one
transaction) and, for about a third of the mutations, `verify_document` of a document it
uploaded earlier. Each broker (RabbitMQ, then Redis) gets a fresh database and queue. Reported
per broker:
  - producer commit rate and burst duration;
  - recalculations applied per property while the burst lasted (max, mean) and in all, from the
    history snapshots (one per applied job) and the done/superseded outbox jobs;
  - time from the last commit until every property is fresh (not pending), and a check that
    every stored score equals the formula on the current data (services.scoring);
  - the baseline, measured in the same run: without coalescing each mutation is one task, so
    the same burst means one recalculation per mutation; the drain time of that many no-op
    Celery tasks sent back to back to the same kind of worker is a lower bound of its tail.
Each broker runs once with the recalculation task's minimum interval at 0 (the default: every
job is due at once); the first broker (RabbitMQ) then runs again with each --min-interval value
above 0 (default 5 s, 1 s with --quick; RECALQ_RECALC_MIN_INTERVAL_SECONDS, applied as
`recalq migrate` does), on a fresh database after a quiet period: the throttle trades
recalculations during the burst for the freshness of a change made soon after the previous
recalculation started. `--min-interval 0` skips it.
Target (issue 5): <= 3 recalculations per property while the burst lasts.
Writes bench/results/burst_coalescing.json. Needs PostgreSQL (BENCH_PG_ADMIN_URL) and the broker(s).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery
from psycopg.rows import dict_row

from bench.report import at_most, print_result, result, row, write_json
from recalq import migrate
from recalq.celery_config import celery_config
from recalq.settings import Settings
from services.documents import NewDocument, add_documents, verify_document
from services.properties import NewProperty, provision_client
from services.scoring import REQUIREMENTS, Document, DocumentStatus, ScoringInputs, score
from services.vocabulary import Actor, ActorType, TriggerReason

ROOT = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "recalq_bench_burst"
#: The throttled variant: above burst / 3 for the full 10,000-mutation burst (~10 s on the
#: reference machine), so the target can hold; see docs/operations.md. --quick's burst lasts
#: ~2 s, so it throttles at 1 s to show the throttle at work within it.
DEFAULT_MIN_INTERVAL = 5.0
QUICK_MIN_INTERVAL = 1.0
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379/12"
CLIENT = Actor(ActorType.CLIENT, "bench-client")
REVIEWER = Actor(ActorType.ADMIN, "bench-admin")
TARGET_RECALCS = 3
ACTIVE = ("pending", "published", "running", "retrying")

#: The no-op task of the baseline: a worker started with `-A bench.burst_coalescing:noop_app`
#: configures this app from BENCH_NOOP_BROKER / BENCH_NOOP_QUEUE, with recalq's Celery settings.
noop_app = Celery("bench_noop", set_as_current=False)
if os.environ.get("BENCH_NOOP_BROKER"):
    noop_app.config_from_object(celery_config(Settings(
        database_url="postgresql://unused@127.0.0.1/unused", broker_url=os.environ["BENCH_NOOP_BROKER"],
        queue=os.environ["BENCH_NOOP_QUEUE"])))


@noop_app.task(name="bench.noop")
def noop(**kwargs: Any) -> None:
    """Does nothing: the baseline's task costs only Celery's own overhead."""


# -- processes -----------------------------------------------------------------------------------

class Processes:
    """The relay and workers of one run, logging to files (a pipe nobody reads would block them)."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
        self.env.pop("RECALQ_FAULT", None)
        self.logdir = logdir
        self.popens: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.logdir / f"{name}.log", "w")  # closed below: the child keeps its own copy
        popen = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=self.env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.popens.append((name, popen))

    def worker(self, app: str, queue: str, name: str) -> None:
        self.start(name, ["-m", "celery", "-A", app, "worker", "-E", "-Q", queue, "-P", "prefork", "-c", "2",
                          "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--without-mingle", "--without-gossip",
                          "-l", "WARNING"])

    def check_alive(self) -> None:
        for name, popen in self.popens:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        return "\n".join((self.logdir / f"{name}.log").read_text().splitlines()[-30:])

    def stop(self) -> None:
        import signal

        for _, popen in self.popens:
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGTERM)
        for _, popen in self.popens:
            try:
                popen.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(10)


def wait_until(predicate: Any, timeout: float, what: str, processes: Processes, interval: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        processes.check_alive()
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def delete_queue(broker: str, queue: str) -> None:
    from kombu import Connection

    try:
        with Connection(broker, connect_timeout=5) as conn:
            channel = conn.default_channel
            channel.queue_delete(queue)
            if broker.startswith("redis"):
                # A worker's warm shutdown may put a reserved message back after the delete.
                channel.client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    except Exception as exc:  # clean-up only: a leftover queue must not hide the results
        print(f"could not delete queue {queue}: {exc!r}", file=sys.stderr)


def unfinished_messages(broker: str, queue: str) -> int:
    """Messages not yet taken (RabbitMQ: ready ones; up to one per worker process may still be
    running) or, on Redis, not yet acknowledged (the list plus kombu's unacked hash of this
    benchmark's own database)."""
    from kombu import Connection

    with Connection(broker, connect_timeout=5) as conn:
        channel = conn.default_channel
        if broker.startswith("redis"):
            return channel.client.llen(queue) + channel.client.hlen(channel.unacked_key)
        return channel.queue_declare(queue, passive=True).message_count


# -- the burst -----------------------------------------------------------------------------------

def fresh_database(properties: int, min_interval: float = 0.0) -> tuple[str, list[int]]:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    url = ADMIN.rsplit("/", 1)[0] + "/" + DB
    migrate.upgrade(Settings(database_url=url, recalc_min_interval_seconds=min_interval))
    with psycopg.connect(url, autocommit=True) as conn:
        made = provision_client(conn, name="Burst", properties=[NewProperty(f"P{i}", has_gas_supply=i % 4 != 0)
                                                                for i in range(properties)],
                                actor=REVIEWER, correlation_id="bench-provision")
    return url, [p.property_id for p in made.properties]


def producer(url: str, property_ids: list[int], count: int, seed: int, out: dict[str, Any]) -> None:
    rng = random.Random(seed)
    uploaded: list[int] = []
    per_property: Counter[int] = Counter()
    last_commit = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        out["barrier"].wait()
        for _ in range(count):
            if uploaded and rng.random() < 0.35:
                changed = verify_document(conn, document_id=uploaded.pop(rng.randrange(len(uploaded))),
                                          actor=REVIEWER, correlation_id=uuid.uuid4().hex)
                per_property[changed.property_id] += 1
            else:
                property_id = rng.choice(property_ids)
                expires = date.today() + timedelta(days=rng.randint(-60, 400)) if rng.random() < 0.8 else None
                added = add_documents(
                    conn, property_id=property_id, source="client", actor=CLIENT,
                    trigger=TriggerReason.CLIENT_UPLOAD, correlation_id=uuid.uuid4().hex,
                    documents=[NewDocument(rng.choice(REQUIREMENTS), "cert.pdf", 1024,
                                           hashlib.sha256(uuid.uuid4().bytes).hexdigest(), expires)],
                )
                uploaded.append(added.document_ids[0])
                per_property[property_id] += 1
            last_commit = time.time()
    with out["lock"]:
        out["per_property"].update(per_property)
        out["last_commit"] = max(out["last_commit"], last_commit)


def burst(url: str, property_ids: list[int], mutations: int, producers: int) -> dict[str, Any]:
    shared: dict[str, Any] = {"barrier": threading.Barrier(producers + 1), "lock": threading.Lock(),
                              "per_property": Counter(), "last_commit": 0.0}
    errors: list[BaseException] = []

    def run(i: int, count: int) -> None:
        try:
            producer(url, property_ids, count, i, shared)
        except BaseException as exc:  # a failed mutation makes the run meaningless: report it
            errors.append(exc)
            shared["barrier"].abort()

    counts = [mutations // producers + (1 if i < mutations % producers else 0) for i in range(producers)]
    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(counts)]
    for t in threads:
        t.start()
    shared["barrier"].wait()
    started = time.time()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} producer(s) failed; first: {errors[0]!r}") from errors[0]
    return {"started": started, "last_commit": shared["last_commit"], "per_property": shared["per_property"]}


def stored_scores_match(conn: psycopg.Connection, property_ids: list[int]) -> list[int]:
    """Properties whose stored score or breakdown differs from the formula on their current data."""
    wrong = []
    with conn.cursor(row_factory=dict_row) as cur:
        props = cur.execute("SELECT id, has_gas_supply, compliance_score, compliance_breakdown, compliance_as_of "
                            "FROM properties WHERE id = ANY(%s)", [property_ids]).fetchall()
        docs = cur.execute("SELECT id, property_id, requirement_code::text AS code, status::text AS status, "
                           "expires_at FROM documents WHERE property_id = ANY(%s) AND deleted_at IS NULL",
                           [property_ids]).fetchall()
    by_property: dict[int, list[Document]] = {}
    for d in docs:
        by_property.setdefault(d["property_id"], []).append(
            Document(d["id"], d["code"], DocumentStatus(d["status"]), d["expires_at"]))
    for p in props:
        if p["compliance_as_of"] is None:
            wrong.append(p["id"])
            continue
        want = score(ScoringInputs.of(p["has_gas_supply"], by_property.get(p["id"], [])), p["compliance_as_of"])
        if want.score != p["compliance_score"] or want.breakdown() != p["compliance_breakdown"]:
            wrong.append(p["id"])
    return wrong


def run_broker(broker: str, args: argparse.Namespace, logdir: Path, min_interval: float = 0.0,
               baseline: bool = True) -> dict[str, Any]:
    queue = f"bench-burst-{uuid.uuid4().hex[:8]}"
    url, property_ids = fresh_database(args.properties, min_interval)
    processes = Processes({"RECALQ_DATABASE_URL": url, "RECALQ_BROKER_URL": broker, "RECALQ_QUEUE": queue}, logdir)
    try:
        processes.start("relay", ["-m", "recalq", "relay"])
        processes.worker("recalq.celery_app", queue, "worker")
        with psycopg.connect(url, autocommit=True) as conn:
            def idle() -> bool:
                return conn.execute("SELECT count(*) = 0 FROM outbox_job WHERE status = ANY(%s::outbox_job_status[])",
                                    [list(ACTIVE)]).fetchone()[0]

            wait_until(idle, 180, "the provisioning recalculations (relay and worker up)", processes)
            first_job = conn.execute("SELECT coalesce(max(id), 0) FROM outbox_job").fetchone()[0]
            if min_interval > 0:
                # The burst starts after a quiet period, as in production: otherwise the
                # provisioning runs just before it would hold the burst's first runs back.
                [quiet_in] = conn.execute(
                    "SELECT coalesce(extract(epoch FROM max(started_at) - now())::float8, 0) + %s FROM outbox_job",
                    [min_interval]).fetchone()
                time.sleep(max(0.0, quiet_in))

            b = burst(url, property_ids, args.mutations, args.producers)

            def fresh() -> bool:
                return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM properties WHERE compliance_score_pending)"
                                    ).fetchone()[0]

            fresh_at = wait_until(fresh, 600, "every property to be fresh", processes)
            wait_until(idle, 120, "the queue to drain", processes)
            wrong = stored_scores_match(conn, property_ids)
            applied = conn.execute(
                """SELECT property_id,
                          count(*) FILTER (WHERE calculated_at <= to_timestamp(%(end)s)) AS during,
                          count(*) AS total
                     FROM property_compliance_score_history WHERE job_id > %(first)s GROUP BY property_id""",
                {"end": b["last_commit"], "first": first_job}).fetchall()
            jobs = dict(conn.execute(
                "SELECT status::text, count(*) FROM outbox_job WHERE id > %s GROUP BY status", [first_job]).fetchall())
            timeline = conn.execute(
                """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM published_at - created_at)),
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - published_at)),
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)),
                          percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)),
                          avg(attempts)
                     FROM outbox_job WHERE id > %s AND status = 'done'""", [first_job]).fetchone()
            requests = conn.execute("SELECT count(*) FROM outbox_request r JOIN outbox_job j ON j.id = r.job_id "
                                    "WHERE j.id > %s", [first_job]).fetchone()[0]
            gaps = conn.execute(
                """SELECT min(gap), percentile_cont(0.5) WITHIN GROUP (ORDER BY gap)
                     FROM (SELECT extract(epoch FROM started_at - lag(started_at) OVER (PARTITION BY coalescing_key
                                                                                       ORDER BY id)) AS gap
                             FROM outbox_job WHERE id > %s AND status = 'done') runs""", [first_job]).fetchone()
        noop = noop_drain(broker, args.mutations, processes) if baseline and not args.no_baseline else None
    finally:
        processes.stop()
        delete_queue(broker, queue)
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

    during = {p: d for p, d, _ in applied}
    total = {p: t for p, _, t in applied}
    duration = b["last_commit"] - b["started"]
    mutated = b["per_property"]
    return {
        "broker": "rabbitmq" if broker.startswith("amqp") else "redis",
        "min_interval_s": min_interval,
        "start_gap_s": {"min": None if gaps[0] is None else float(gaps[0]),
                        "median": None if gaps[1] is None else float(gaps[1])},
        "commits_per_s": args.mutations / duration,
        "burst_s": duration,
        "mutations_per_property_max": max(mutated.values()),
        "mutations_per_property_mean": statistics.mean(mutated[p] for p in property_ids),
        "recalcs_during_max": max((during.get(p, 0) for p in property_ids), default=0),
        "recalcs_during_mean": statistics.mean(during.get(p, 0) for p in property_ids),
        "recalcs_total_max": max((total.get(p, 0) for p in property_ids), default=0),
        "recalcs_total_mean": statistics.mean(total.get(p, 0) for p in property_ids),
        "recalcs_total": sum(total.values()),
        "jobs_by_status": jobs,
        "job_median_s": dict(zip(("created_to_published", "published_to_started", "started_to_finished",
                                  "created_to_finished"), (float(v) for v in timeline[:4]), strict=True)),
        "job_mean_attempts": float(timeline[4]),
        "requests": requests,
        "fresh_after_last_commit_s": max(0.0, fresh_at - b["last_commit"]),
        "wrong_scores": wrong,
        "noop_baseline": noop,
    }


def noop_drain(broker: str, tasks: int, processes: Processes) -> dict[str, float]:
    """One no-op Celery task per mutation, sent back to back by one producer while a prefork -c 2
    worker drains them: the least a design without coalescing pays after its last send."""
    queue = f"bench-noop-{uuid.uuid4().hex[:8]}"
    app = Celery("bench_noop_sender")
    app.config_from_object(celery_config(Settings(database_url="postgresql://unused@127.0.0.1/unused",
                                                  broker_url=broker, queue=queue)))
    noop_processes = Processes({"BENCH_NOOP_BROKER": broker, "BENCH_NOOP_QUEUE": queue}, processes.logdir)
    try:
        noop_processes.worker("bench.burst_coalescing:noop_app", queue, "noop-worker")
        with app.producer_or_acquire() as prod:
            app.send_task("bench.noop", kwargs={"warm": True}, queue=queue, producer=prod)
            wait_until(lambda: unfinished_messages(broker, queue) == 0, 120, "the no-op worker", noop_processes, 0.05)
            started = time.time()
            for i in range(tasks):
                app.send_task("bench.noop", kwargs={"property_id": i % 100}, queue=queue, producer=prod)
            last_send = time.time()
        drained = wait_until(lambda: unfinished_messages(broker, queue) == 0, 600, "the no-op queue to drain",
                             noop_processes)
    finally:
        noop_processes.stop()
        delete_queue(broker, queue)
        app.close()
    return {"send_s": last_send - started, "drain_after_last_send_s": drained - last_send,
            "tasks_per_s": tasks / (drained - started)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutations", type=int, default=10_000)
    parser.add_argument("--properties", type=int, default=100)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--broker", action="append", default=None,
                        help=f"broker URL, repeatable (default {RABBITMQ} and {REDIS}; RabbitMQ only with --quick)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-op Celery drain")
    parser.add_argument("--min-interval", type=float, action="append", default=None, metavar="SECONDS",
                        help="also run the first broker with this minimum interval between recalculations of "
                             f"one property, repeatable (default {DEFAULT_MIN_INTERVAL:g}, "
                             f"{QUICK_MIN_INTERVAL:g} with --quick; 0: no throttled run)")
    parser.add_argument("--quick", action="store_true", help="1,000 mutations on 20 properties, RabbitMQ only")
    args = parser.parse_args(argv)
    if args.quick:
        args.mutations, args.properties = 1_000, 20
    brokers = args.broker or ([RABBITMQ] if args.quick else [RABBITMQ, REDIS])
    default_interval = QUICK_MIN_INTERVAL if args.quick else DEFAULT_MIN_INTERVAL
    intervals = sorted({i for i in (args.min_interval or [default_interval]) if i > 0})
    if any(i < 0 or i > 3600 for i in args.min_interval or []):
        parser.error("--min-interval must be between 0 and 3600 seconds")
    args.min_interval = intervals

    runs = []
    with tempfile.TemporaryDirectory(prefix="recalq-bench-burst-") as tmp:
        for broker in brokers:
            runs.append(run_broker(broker, args, Path(tmp)))
        for interval in intervals:
            # The no-op drain does not depend on the throttle: measured once per broker above.
            runs.append(run_broker(brokers[0], args, Path(tmp), min_interval=interval, baseline=False))

    rows = []
    for r in runs:
        throttled = r["min_interval_s"] > 0
        tag = f" [{r['broker']}, min interval {r['min_interval_s']:g} s]" if throttled else f" [{r['broker']}]"
        base = r["noop_baseline"]
        gap = r["start_gap_s"]
        gaps = (f"; starts of one property at least {gap['min']:.2f} s apart, median {gap['median']:.2f} s"
                if gap["min"] is not None else "")
        cycle_note = ("RECALQ_RECALC_MIN_INTERVAL_SECONDS holds each property's next run until this long after "
                      "its previous start: about burst / interval + 1 runs while the burst lasts"
                      if throttled else
                      "each property is recalculated about once per pipeline cycle (relay wake-up, publish, "
                      "start, apply) for as long as mutations keep coming: the count grows with the burst's "
                      "duration, not with its mutations")
        no_coalescing = "no coalescing: 1 per mutation"
        rows += [
            row("producer commit rate" + tag, r["commits_per_s"], "commits/s",
                note=f"{args.producers} producer threads, services.documents add/verify, one transaction each"),
            row("burst duration" + tag, r["burst_s"], "s"),
            row("recalcs per property during burst, max" + tag, r["recalcs_during_max"], "recalcs",
                baseline=r["mutations_per_property_max"], baseline_name=no_coalescing,
                target=f"<= {TARGET_RECALCS}", met=at_most(r["recalcs_during_max"], TARGET_RECALCS),
                note=cycle_note + gaps),
            row("recalcs per property during burst, mean" + tag, r["recalcs_during_mean"], "recalcs",
                baseline=r["mutations_per_property_mean"], baseline_name=no_coalescing),
            row("recalcs in all (burst + tail)" + tag, r["recalcs_total"], "recalcs",
                baseline=args.mutations, baseline_name=no_coalescing,
                note=f"jobs by status {r['jobs_by_status']}, {r['requests']} requests; median seconds per job "
                     + ", ".join(f"{k} {v:.3f}" for k, v in r["job_median_s"].items())),
            row("last commit -> every property fresh" + tag, r["fresh_after_last_commit_s"], "s",
                baseline=base["drain_after_last_send_s"] if base else None,
                baseline_name=f"{args.mutations:,} no-op celery tasks, last send -> drained" if base else None,
                note=(f"no-op baseline drained {base['tasks_per_s']:.0f} tasks/s; real recalculations are "
                      "slower, so without coalescing the tail would be longer still" if base else
                      f"up to the interval ({r['min_interval_s']:g} s) after the last run's start: the price "
                      "of the throttle" if throttled else None)),
            row("stored scores that differ from the formula" + tag, len(r["wrong_scores"]), "properties",
                target="0", met=not r["wrong_scores"]),
        ]
    res = result("burst_coalescing",
                 f"Coalescing under a burst: {args.mutations:,} mutations on {args.properties} properties, "
                 f"{args.producers} producers, relay + celery worker prefork -c 2", rows,
                 params={k: v for k, v in vars(args).items()}, details={"runs": runs})
    print_result(res)
    print(f"wrote {write_json('burst_coalescing', res)}")
    return res


if __name__ == "__main__":
    main()
