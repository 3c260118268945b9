"""The result convention every benchmark returns, and the one table `make bench` prints.

A benchmark's `main(argv) -> dict` returns

    {"name": "burst_coalescing",              # the module name; also bench/results/<name>.json
     "title": "Coalescing under a burst",     # one line for humans
     "params": {...},                         # the size knobs it ran with
     "rows": [{"metric": "recalculations per property (max)",
               "recalq": 7, "baseline": 100, "baseline_name": "no coalescing (1 per mutation)",
               "unit": "recalcs", "ratio": 0.07, "target": "<= 3", "met": False,
               "note": "why a target is missed, or how a number was obtained"}, ...],
     "details": {...}}                        # anything else (raw runs, plans); free form

`recalq` and `baseline` are numbers (or None); `ratio` is recalq / baseline unless the row says
otherwise in its note; `met` is True/False against `target`, or None when the row has no target.
The runner adds `"error": "..."` for a module that failed; such a result has no rows.

Numbers are kept as measured; rounding happens only when printing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

HEADER = ("benchmark", "metric", "recalq", "baseline (same run)", "ratio", "target", "met?")


def row(
    metric: str,
    recalq: float | None,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str | None = None,
    ratio: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    if ratio is None and _number(recalq) and _number(baseline) and baseline != 0:
        ratio = recalq / baseline  # type: ignore[operator]
    return {"metric": metric, "recalq": recalq, "baseline": baseline, "baseline_name": baseline_name,
            "unit": unit, "ratio": ratio, "target": target, "met": met, "note": note}


def result(name: str, title: str, rows: Sequence[dict[str, Any]], *, params: dict[str, Any] | None = None,
           details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "title": title, "params": params or {}, "rows": list(rows), "details": details or {}}


def error_result(name: str, error: str) -> dict[str, Any]:
    return {"name": name, "title": name, "params": {}, "rows": [], "details": {}, "error": error}


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def write_json(name: str, data: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def format_value(value: Any, unit: str | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if isinstance(value, int) or magnitude >= 1000:
            text = f"{value:,.0f}"
        elif magnitude >= 100:
            text = f"{value:.0f}"
        elif magnitude >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit else text


def table_rows(results: Iterable[dict[str, Any]]) -> list[tuple[str, ...]]:
    lines: list[tuple[str, ...]] = []
    for res in results:
        name = res.get("name", "?")
        if res.get("error"):
            lines.append((name, "ERROR", _one_line(res["error"]), "", "", "", "ERROR"))
            continue
        for r in res.get("rows", []):
            baseline = format_value(r.get("baseline"), r.get("unit"))
            if r.get("baseline_name") and r.get("baseline") is not None:
                baseline = f"{baseline} ({r['baseline_name']})"
            met = r.get("met")
            lines.append((
                name,
                r.get("metric", ""),
                format_value(r.get("recalq"), r.get("unit")),
                baseline,
                "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x",
                r.get("target") or "-",
                "-" if met is None else ("yes" if met else "NO"),
            ))
    return lines


def format_table(results: Iterable[dict[str, Any]]) -> str:
    lines = [HEADER, *table_rows(results)]
    widths = [min(60, max(len(line[i]) for line in lines)) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(cell[:60].ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def print_result(res: dict[str, Any]) -> None:
    """What a module prints when run on its own: its title, its table and its notes."""
    print(f"\n{res.get('title', res.get('name'))}")
    print(format_table([res]))
    for r in res.get("rows", []):
        if r.get("note"):
            print(f"  * {r['metric']}: {r['note']}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"
