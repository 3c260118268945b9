"""Relay throughput (issue 5, bench 2): committed outbox rows -> published, rows/s, beside bare
Celery send_task loops on the same brokers in the same run.

    .venv/bin/python bench/relay_throughput.py [--rows 5000] [--reps 3] [--batch-size 500]
                                               [--broker rabbitmq|redis|URL ...] [--quick]

Variants, interleaved rep by rep so the busy machine's drift hits each alike:

  recalq relay                the real `Relay.drain` (claim, publish, mark: two transactions
                              per batch) over rows committed beforehand, with the relay recalq
                              builds (recalq.bootstrap): publisher confirms pipelined per batch
                              on RabbitMQ, one pipeline per batch on Redis
  send_task, confirm_publish  a bare loop of `app.send_task` with recalq's Celery configuration
                              (each message waits for its basic.ack)
  send_task, no confirms      the same loop without confirm_publish (RabbitMQ), or on Redis
  relay, no task-sent events  (RabbitMQ) the relay with task_send_sent_event off: what Celery's
                              task-sent event (one more message per task, for Flower) costs

Both sides publish the same task with the same kwargs, and both send Celery's task-sent event
(recalq's configuration has task_send_sent_event on). Reports medians of --reps with min-max, the
relay's ratio to each loop, and the target (>= 3,000 rows/s with confirms on RabbitMQ).
--quick: 500 rows (one relay batch), 1 rep. Needs PostgreSQL (BENCH_PG_ADMIN_URL) and the brokers
(BENCH_AMQP_URL, BENCH_REDIS_URL); creates and drops its own database and queues. Writes
bench/results/relay_throughput.json; `main(argv)` returns the same dict (bench/report.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import baseline_config, broker_urls, delete_queue, log, private_database, unique_queue
from bench.report import result, row, write_json
from recalq.bootstrap import Runtime
from recalq.settings import Settings
from services.vocabulary import RECALCULATE_TASK

NAME = "relay_throughput"
TARGET = 3000.0  # rows/s, recalq relay with publisher confirms on RabbitMQ
RELAY = "recalq relay"
RELAY_NO_EVENTS = "recalq relay, no task-sent events"
CONFIRMED = "send_task, confirm_publish"
UNCONFIRMED = "send_task, no confirms"
WARM_UP = 50
#: Short names for the summary table's metric column.
SHORT = {RELAY: "relay", RELAY_NO_EVENTS: "relay w/o task-sent", CONFIRMED: "send_task+confirms",
         UNCONFIRMED: "send_task no confirms"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="rows per measurement (default 5000; quick 500)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=Settings.model_fields["relay_batch_size"].default,
                        help="relay batch size (recalq's default)")
    parser.add_argument("--broker", action="append", default=None,
                        help="rabbitmq, redis or a broker URL; repeatable (default both)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    args.rows = args.rows or (500 if args.quick else 5000)
    args.reps = args.reps or (1 if args.quick else 3)
    return args


# -- measurements ----------------------------------------------------------------------------
def commit_jobs(database_url: str, rows: int) -> None:
    """`rows` committed pending jobs of distinct keys, through the producer function."""
    with psycopg.connect(database_url) as conn:
        conn.execute("TRUNCATE outbox_request, outbox_job RESTART IDENTITY CASCADE")
        conn.execute(
            """SELECT outbox_enqueue(%s, 'bench:' || g, jsonb_build_object('property_id', g), 'c' || g,
                                     'manual_recalculation', 'system', NULL)
                 FROM generate_series(1, %s) g""",
            [RECALCULATE_TASK, rows],
        )


class RelayBench:
    """recalq's relay as the composition root builds it, on one database connection."""

    def __init__(self, settings: Settings, sent_events: bool = True) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        if not sent_events:
            self.runtime.celery_app.conf.task_send_sent_event = False
        self.relay = self.runtime.relay()
        self.conn = self.runtime.connect()
        self.run(WARM_UP)  # opens the broker connection and declares the queue

    def run(self, rows: int) -> float:
        commit_jobs(self.settings.database_url or "", rows)
        started = time.perf_counter()
        published = self.relay.drain(self.conn)
        elapsed = time.perf_counter() - started
        if published != rows:
            raise RuntimeError(f"the relay published {published} of {rows} rows")
        return rows / elapsed

    def close(self) -> None:
        self.conn.close()
        publisher = self.relay._publish  # holds a broker connection of its own
        close = getattr(publisher, "close", None)
        if close is not None:
            close()
        self.runtime.celery_app.close()


class SendTaskBench:
    """A bare `send_task` loop with recalq's Celery configuration, confirms on or off."""

    def __init__(self, broker_url: str, queue: str, confirm: bool) -> None:
        from celery import Celery

        config = baseline_config(broker_url, queue)
        options = dict(config["broker_transport_options"])
        options.pop("confirm_publish", None)
        if confirm:
            options["confirm_publish"] = True
        config["broker_transport_options"] = options
        self.app = Celery("bench_send_task")
        self.app.config_from_object(config)
        self.queue = queue
        self.run(WARM_UP)

    def run(self, rows: int) -> float:
        app, queue = self.app, self.queue
        with app.producer_or_acquire() as producer:
            started = time.perf_counter()
            for i in range(1, rows + 1):
                app.send_task(RECALCULATE_TASK, kwargs={"job_id": i, "payload": {"property_id": i}},
                              task_id=str(uuid.uuid4()), queue=queue, producer=producer)
            return rows / (time.perf_counter() - started)

    def close(self) -> None:
        self.app.close()


def purge(broker_url: str, queue: str) -> None:
    from kombu import Connection

    with Connection(broker_url, connect_timeout=10) as conn:
        conn.default_channel.queue_purge(queue)


# -- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    brokers = broker_urls(args.broker)
    load_before = os.getloadavg()
    rates: dict[tuple[str, str], list[float]] = {}
    with private_database("relay") as database_url:
        for broker, broker_url in brokers.items():
            queue = unique_queue("relay")
            settings = Settings(database_url=database_url, broker_url=broker_url, queue=queue,
                                relay_batch_size=args.batch_size)
            benches: dict[str, Any] = {}
            try:
                log(f"{broker}: warming up")
                benches[RELAY] = RelayBench(settings)
                if settings.broker_is_rabbitmq:
                    benches[RELAY_NO_EVENTS] = RelayBench(settings, sent_events=False)
                    benches[CONFIRMED] = SendTaskBench(broker_url, queue, confirm=True)
                benches[UNCONFIRMED] = SendTaskBench(broker_url, queue, confirm=False)
                purge(broker_url, queue)
                for rep in range(args.reps):
                    for variant, bench in benches.items():
                        rate = bench.run(args.rows)
                        rates.setdefault((broker, variant), []).append(rate)
                        log(f"{broker} rep {rep + 1}/{args.reps}: {variant}: {rate:,.0f} rows/s")
                        purge(broker_url, queue)
            finally:
                for bench in benches.values():
                    bench.close()
                delete_queue(broker_url, queue)
    measured = summarise(rates)
    measured["load_average"] = {"before": load_before, "after": os.getloadavg()}
    rabbit = measured["variants"].get(f"rabbitmq/{RELAY}")
    measured["target"] = {"rows_per_s": TARGET, "measured": rabbit["median"] if rabbit else None,
                          "met": None if rabbit is None else rabbit["median"] >= TARGET}
    print_table(args, measured)
    outcome = result(NAME, "Relay throughput: committed outbox rows -> published, rows/s",
                     report_rows(measured), params=vars(args), details=measured)
    print(f"wrote {write_json(NAME, outcome)}")
    return outcome


def summarise(rates: dict[tuple[str, str], list[float]]) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {}
    for (broker, variant), values in rates.items():
        variants[f"{broker}/{variant}"] = {
            "broker": broker, "variant": variant, "median": statistics.median(values),
            "min": min(values), "max": max(values), "runs": values,
        }
    for entry in variants.values():
        same = {v["variant"]: v["median"] for v in variants.values() if v["broker"] == entry["broker"]}
        entry["x_send_task_confirms"] = _ratio(entry["median"], same.get(CONFIRMED))
        entry["x_send_task_no_confirms"] = _ratio(entry["median"], same.get(UNCONFIRMED))
    return {"variants": variants}


def _ratio(value: float, base: float | None) -> float | None:
    return None if not base else value / base


def print_table(args: argparse.Namespace, measured: dict[str, Any]) -> None:
    header = ("broker", "variant", "median rows/s", "min - max", "x send_task+confirms", "x send_task no confirms")
    lines = [header]
    for v in measured["variants"].values():
        lines.append((
            v["broker"], v["variant"], f"{v['median']:,.0f}", f"{v['min']:,.0f} - {v['max']:,.0f}",
            "-" if v["x_send_task_confirms"] is None else f"{v['x_send_task_confirms']:.2f}x",
            "-" if v["x_send_task_no_confirms"] is None else f"{v['x_send_task_no_confirms']:.2f}x",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nRelay throughput: {args.rows:,} rows per run, median of {args.reps} "
          f"(relay batch size {args.batch_size}); load average {measured['load_average']['before'][0]:.1f}")
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths,
                                                                                                          strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    target = measured["target"]
    if target["measured"] is None:
        print(f"target: >= {TARGET:,.0f} rows/s with confirms on RabbitMQ: not measured (no RabbitMQ in this run)")
    else:
        verdict = "met" if target["met"] else f"MISSED by {TARGET - target['measured']:,.0f} rows/s"
        print(f"target: >= {TARGET:,.0f} rows/s with confirms on RabbitMQ: {target['measured']:,.0f} rows/s, {verdict}")


def report_rows(measured: dict[str, Any]) -> list[dict[str, Any]]:
    """bench/report.py's rows: each relay variant against each send_task loop of its broker."""
    variants = measured["variants"]
    rows = []
    for broker in dict.fromkeys(v["broker"] for v in variants.values()):
        for relay_name in (RELAY, RELAY_NO_EVENTS):
            relay = variants.get(f"{broker}/{relay_name}")
            if relay is None:
                continue
            for base_name in (CONFIRMED, UNCONFIRMED):
                base = variants.get(f"{broker}/{base_name}")
                if base is None:
                    continue
                targeted = broker == "rabbitmq" and relay_name == RELAY and base_name == CONFIRMED
                rows.append(row(
                    f"{SHORT[relay_name]} [{broker}] vs {SHORT[base_name]}", relay["median"], "rows/s",
                    baseline=base["median"], baseline_name=f"{base_name}, same run",
                    target=f">= {TARGET:,.0f} rows/s" if targeted else None,
                    met=relay["median"] >= TARGET if targeted else None,
                    note=(f"min-max {relay['min']:,.0f}-{relay['max']:,.0f} rows/s; {base_name} "
                          f"{base['min']:,.0f}-{base['max']:,.0f}"),
                ))
    return rows

if __name__ == "__main__":
    main()
