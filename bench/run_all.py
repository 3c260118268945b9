"""Runs every benchmark, one after another, and prints one comparison table.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--peers]

Each module's `main(argv) -> dict` runs in this process, never two at once (the machine is
shared; parallel runs would measure each other). --quick is passed through. Results follow the
convention in bench/report.py; a module that does not (yet) is adapted here from what it returns
or writes. A module that is missing or fails shows as an ERROR row and makes the exit status 1.

--peers also runs the peer benchmarks in ../shared/bench-peers (or BENCH_PEERS_DIR):
celery_latency, procrastinate_bench and pgqueuer_bench, in a private database, and adds their
medians as rows. Procrastinate and PgQueuer need their packages (the `bench` extra).

Writes bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psycopg

from bench.report import RESULTS_DIR, error_result, format_table, result, row, write_json

MODULES = ("enqueue_overhead", "relay_throughput", "e2e_latency", "worker_throughput", "burst_coalescing", "scale",
           "api_load", "job_stream_fanout")
ROOT = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

PEERS = {
    "celery_latency": None,
    "procrastinate_bench": "procrastinate",
    "pgqueuer_bench": "pgqueuer",
}
PEER_DB = "recalq_bench_peers"
PEER_QUICK_ENV = {"BENCH_REPS": "1", "BENCH_LAT_SAMPLES": "200", "BENCH_PROC_N": "2000", "BENCH_PGQ_N": "2000",
                  "BENCH_LAT_POOLS": "prefork_c2"}
EXTRA_HINT = "pip install -e '.[bench]' (procrastinate, pgqueuer)"


# -- running the modules --------------------------------------------------------------------------

def run_module(name: str, quick: bool) -> dict[str, Any]:
    started = time.time()
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return error_result(name, f"missing: bench/{name}.py does not exist")
        return error_result(name, f"import failed: {exc!r}")
    except Exception as exc:
        return error_result(name, f"import failed: {exc!r}")
    main = getattr(module, "main", None)
    if main is None:
        return error_result(name, "has no main()")
    argv = ["--quick"] if quick else []  # every module takes --quick
    try:
        returned = main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return error_result(name, f"exited with status {exc.code}")
        returned = None
    except KeyboardInterrupt:
        raise
    except BaseException:
        return error_result(name, "failed:\n" + traceback.format_exc(limit=8))
    try:
        return normalise(name, returned, started)
    except Exception:
        return error_result(name, "its result could not be read:\n" + traceback.format_exc(limit=4))


def normalise(name: str, returned: Any, started: float) -> dict[str, Any]:
    """The module's result in the report convention."""
    if isinstance(returned, dict) and isinstance(returned.get("rows"), list):
        return {"name": name, **returned} if "name" not in returned else returned
    data = returned if returned is not None else _written_json(name, started)
    if data is None:
        return error_result(name, f"returned nothing and wrote no bench/results/{name}.json in this run")
    adapt = ADAPTERS.get(name)
    if adapt is None:
        return result(name, name, [row("see details (result not in the report convention)", None, "")],
                      details={"returned": data})
    return result(name, name, adapt(data), details={"returned": data})


def _written_json(name: str, started: float) -> Any:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists() or path.stat().st_mtime < started:
        return None
    return json.loads(path.read_text())


def _adapt_worker_throughput(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    entries = data["results"]
    target = data.get("target_per_s", 600)
    for e in entries:
        if e["variant"].startswith("recalq") or e["variant"] == "recalq":
            base = next((b for b in entries if b["broker"] == e["broker"] and b is not e), None)
            rows.append(row(f"recalculations/s [{e['broker']}]", e["rate"]["median"], "/s",
                            baseline=base["rate"]["median"] if base else None,
                            baseline_name=base["variant"] if base else None,
                            target=f">= {target:,.0f}/s", met=e["rate"]["median"] >= target and e.get("valid", True)))
    return rows


def _adapt_e2e_latency(data: dict[str, Any]) -> list[dict[str, Any]]:
    targets = data.get("target_ms", {"p50": 10.0, "p99": 30.0})
    entries = data["results"]
    rows = []
    for e in entries:
        if not e["variant"].startswith("recalq"):
            continue
        base = next((b for b in entries if b["broker"] == e["broker"] and b is not e), None)
        for key in ("p50", "p95", "p99"):
            limit = targets.get(key)
            value = e[key]["median"]
            rows.append(row(f"commit -> task start {key} [{e['broker']}]", value, "ms",
                            baseline=base[key]["median"] if base else None,
                            baseline_name=base["variant"] if base else None,
                            target=f"<= {limit:g} ms" if limit else None,
                            met=value <= limit if limit else None))
    return rows


ADAPTERS = {
    "e2e_latency": _adapt_e2e_latency,
    "worker_throughput": _adapt_worker_throughput,
}


# -- peers ------------------------------------------------------------------------------------------

def peers_dir() -> Path:
    return Path(os.environ.get("BENCH_PEERS_DIR", ROOT.parent / "shared" / "bench-peers"))


def run_peers(quick: bool) -> list[dict[str, Any]]:
    here = peers_dir()
    if not (here / "common.py").exists():
        return [error_result("peers", f"no peer benchmarks at {here} (set BENCH_PEERS_DIR)")]
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {PEER_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {PEER_DB}")
    base = ADMIN.rsplit("/", 1)[0]
    out = []
    try:
        with tempfile.TemporaryDirectory(prefix="recalq-bench-peers-") as state:
            env = {**os.environ, "BENCH_PG_DSN": f"{_dsn(base)} dbname={PEER_DB}",
                   "BENCH_PG_URL": f"{base}/{PEER_DB}", "BENCH_REDIS_URL": "redis://127.0.0.1:6379/12",
                   "BENCH_STATE": state, **(PEER_QUICK_ENV if quick else {})}
            for script, package in PEERS.items():
                name = f"peer:{script}"
                if package and importlib.util.find_spec(package) is None:
                    out.append(error_result(name, f"needs {package}: {EXTRA_HINT}"))
                    continue
                print(f"\n=== {name}", flush=True)
                out.append(run_peer(here, script, env, name))
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {PEER_DB} WITH (FORCE)")
    return out


def run_peer(here: Path, script: str, env: dict[str, str], name: str) -> dict[str, Any]:
    try:
        done = subprocess.run([sys.executable, f"{script}.py"], cwd=here, env=env, capture_output=True, text=True,
                              timeout=1800)
    except subprocess.TimeoutExpired:
        return error_result(name, "timed out after 1800 s")
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("SUMMARY "):
            s = json.loads(line[len("SUMMARY "):])
            rows.append(row(f"{s['measure']} {s['variant']} {s['metric']}", None, s["unit"], baseline=s["median"],
                            baseline_name=f"peer, {s['min']:.4g}-{s['max']:.4g}, n={s['n']}"))
    if done.returncode != 0 or not rows:
        return error_result(name, f"exit status {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return result(name, f"peer {script}", rows, details={"stderr_tail": done.stderr[-2000:]})


def _dsn(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    fields = [f"host={parts.hostname or '127.0.0.1'}", f"port={parts.port or 5432}",
              f"user={parts.username or 'postgres'}"]
    if parts.password:
        fields.append(f"password={parts.password}")
    return " ".join(fields)


# -- main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke runs of every benchmark")
    parser.add_argument("--only", action="append", choices=MODULES, help="run only this benchmark (repeatable)")
    parser.add_argument("--peers", action="store_true", help="also run the peer benchmarks (see --help)")
    args = parser.parse_args(argv)

    started = time.time()
    results = []
    for name in args.only or MODULES:
        print(f"\n=== {name} ({'quick' if args.quick else 'full'}) load {_load()}", flush=True)
        t0 = time.perf_counter()
        res = run_module(name, args.quick)
        res["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if res.get("error"):
            print(f"=== {name} ERROR: {res['error']}", file=sys.stderr, flush=True)
        results.append(res)
    if args.peers:
        results.extend(run_peers(args.quick))

    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "quick": args.quick,
               "elapsed_s": round(time.time() - started, 1), "load_at_end": _load(), "results": results}
    path = write_json("summary", summary)
    print(f"\nrecalq benchmarks ({'quick' if args.quick else 'full'} sizes; load {_load()}; one machine, "
          "baselines measured in the same run)\n")
    print(format_table(results))
    failed = [r["name"] for r in results if r.get("error")]
    missed = [f"{r['name']}: {x['metric']}" for r in results for x in r.get("rows", []) if x.get("met") is False]
    if missed:
        print("\ntargets missed:\n  " + "\n  ".join(missed))
    print(f"\nwrote {path}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
