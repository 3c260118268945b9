"""Relay throughput: committed outbox rows -> published (with confirms on RabbitMQ), rows/s,
beside a bare Celery send_task loop on the same broker in the same run.

    .venv/bin/python bench/relay_throughput.py [--rows 5000] [--reps 3] [--broker URL ...]

Needs PostgreSQL (BENCH_PG_ADMIN_URL, default postgres@127.0.0.1) and the brokers. Creates and
drops its own database and queue. Prints a table and writes bench/results/relay_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import psycopg
from celery import Celery
from kombu import Connection

from recalq import migrate
from recalq.bootstrap import Runtime
from recalq.celery_config import celery_config
from recalq.settings import Settings

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DB = "recalq_bench_relay"


def fresh_database(admin: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    url = admin.rsplit("/", 1)[0] + "/" + DB
    migrate.upgrade(Settings(database_url=url))
    return url


def commit_jobs(url: str, rows: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE outbox_request, outbox_job RESTART IDENTITY CASCADE")
        conn.execute(
            """SELECT outbox_enqueue('compliance.recalculate_property', 'bench:' || g,
                                     jsonb_build_object('property_id', g), 'c' || g, 'bench', 'system', NULL)
                 FROM generate_series(1, %s) g""",
            [rows],
        )


def relay_rate(settings: Settings, rows: int) -> float:
    commit_jobs(settings.database_url, rows)
    runtime = Runtime(settings)
    relay = runtime.relay()
    with runtime.connect() as conn:
        started = time.perf_counter()
        published = relay.drain(conn)
        elapsed = time.perf_counter() - started
    assert published == rows, (published, rows)
    return rows / elapsed


def send_task_rate(broker: str, queue: str, rows: int, confirm: bool) -> float:
    app = Celery("bench", broker=broker)
    config = celery_config(Settings(database_url="postgresql://x@127.0.0.1/x", broker_url=broker))
    if not confirm:
        config["broker_transport_options"] = {
            k: v for k, v in config["broker_transport_options"].items() if k != "confirm_publish"
        }
    app.config_from_object(config)
    with app.producer_or_acquire() as producer:
        for i in range(100):  # warm-up
            app.send_task("bench.noop", kwargs={"job_id": i}, queue=queue, producer=producer)
        started = time.perf_counter()
        for i in range(rows):
            app.send_task("bench.noop", kwargs={"job_id": i, "payload": {"property_id": i}},
                          task_id=str(uuid.uuid4()), queue=queue, producer=producer)
        return rows / (time.perf_counter() - started)


def purge(broker: str, queue: str) -> None:
    with Connection(broker) as conn:
        conn.default_channel.queue_delete(queue)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pg-admin", default=ADMIN)
    parser.add_argument("--broker", action="append",
                        default=None, help="broker URL(s); default RabbitMQ and Redis on loopback")
    args = parser.parse_args()
    brokers = args.broker or ["amqp://guest:guest@127.0.0.1:5672//", "redis://127.0.0.1:6379/13"]
    url = fresh_database(args.pg_admin)
    results = []
    for broker in brokers:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(database_url=url, broker_url=broker, queue=queue)
        kind = "rabbitmq" if settings.broker_is_rabbitmq else "redis"
        variants = {f"recalq relay ({'confirms' if kind == 'rabbitmq' else 'redis'})":
                    lambda s=settings: relay_rate(s, args.rows)}
        if kind == "rabbitmq":
            variants["celery send_task, confirm_publish"] = (
                lambda b=broker, q=queue: send_task_rate(b, q, args.rows, True))
            variants["celery send_task, no confirms"] = (
                lambda b=broker, q=queue: send_task_rate(b, q, args.rows, False))
        else:
            variants["celery send_task (redis)"] = (
                lambda b=broker, q=queue: send_task_rate(b, q, args.rows, False))
        try:
            for name, run in variants.items():
                rates = [run() for _ in range(args.reps)]
                results.append({"broker": kind, "variant": name, "median": statistics.median(rates),
                                "min": min(rates), "max": max(rates), "rows": args.rows})
                purge(broker, queue)
        finally:
            purge(broker, queue)
    with psycopg.connect(args.pg_admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    print(f"{'broker':9} {'variant':40} {'median rows/s':>14} {'min - max':>18}")
    for r in results:
        print(f"{r['broker']:9} {r['variant']:40} {r['median']:14,.0f} {r['min']:8,.0f} - {r['max']:<8,.0f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "relay_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
