"""`recalq drain`: waits until nothing is pending, published, running or retrying.

Its progress line names the window of every rate it shows: how many jobs finished in the last
FINISHED_WINDOW_SECONDS (counted by the database, from outbox_job.finished_at: done, dead,
superseded and cancelled alike) and how fast the backlog shrank over the same stretch of the
drain's own looks at the queue. The two differ when new jobs arrive meanwhile (the backlog then
shrinks slower than jobs finish), which is why both are shown, each with its window.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import NamedTuple, TextIO

import psycopg

from recalq.console_format import age, plural_s
from recalq.operator import ACTIVE, CommandFailed, Totals, queue_state, totals

#: Without a terminal, `drain` prints a progress line at most this often.
PROGRESS_LINE_EVERY_SECONDS = 5.0
#: The window of the rates the progress line shows.
FINISHED_WINDOW_SECONDS = 10.0
#: Jobs of every task that finished within the window, by the database's clock
#: (ix_outbox_job_finished_at reads only those).
FINISHED_IN_WINDOW = "SELECT count(*) FROM outbox_job WHERE finished_at > now() - make_interval(secs => %(window)s)"


class Look(NamedTuple):
    """One look at the queue."""

    at: float  # time.monotonic()
    totals: Totals
    #: Jobs finished in the FINISHED_WINDOW_SECONDS before this look.
    finished: int


def drain(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    tty = out.isatty()
    started = time.monotonic()
    looks: deque[Look] = deque()
    current = look(conn)
    last_line = float("-inf")
    on_screen = False  # an unfinished progress line on the terminal
    try:
        while current.totals.active:
            looks.append(current)
            while len(looks) > 1 and looks[1].at <= current.at - FINISHED_WINDOW_SECONDS:
                looks.popleft()  # looks[0] stays the last one at or before the window's start
            elapsed = current.at - started
            if args.timeout is not None and elapsed >= args.timeout:
                raise CommandFailed(f"timed out after {args.timeout:g} s with {left(current.totals)}")
            if tty:
                out.write("\r\x1b[2K" + progress(current, looks[0], elapsed))
                out.flush()
                on_screen = True
            elif elapsed - last_line >= PROGRESS_LINE_EVERY_SECONDS:
                out.write(progress(current, looks[0], elapsed) + "\n")
                out.flush()
                last_line = elapsed
            wait = args.interval if args.timeout is None else min(args.interval, max(0.0, args.timeout - elapsed))
            time.sleep(wait)
            current = look(conn)
    finally:
        if on_screen:
            out.write("\n")
            out.flush()
    out.write(f"drained in {time.monotonic() - started:.1f} s: nothing pending, published, running or retrying\n")
    dead = current.totals.dead
    if dead:
        out.write(f"{dead} dead job{plural_s(dead)} did not block the drain: `recalq jobs --status dead` shows them\n")
    return 0


def look(conn: psycopg.Connection) -> Look:
    with conn.transaction():  # one snapshot: the counts and the finishes agree
        state = totals(queue_state(conn))
        row = conn.execute(FINISHED_IN_WINDOW, {"window": FINISHED_WINDOW_SECONDS}).fetchone()
    return Look(time.monotonic(), state, int(row[0]) if row else 0)


def progress(now: Look, since: Look, elapsed: float) -> str:
    """What is left, what finished in the window, and the backlog's trend since `since` (the
    window's start, or the drain's while it has watched for less)."""
    t = now.totals
    remaining = ", ".join(f"{t.by_status.get(s, 0):,} {s}" for s in ACTIVE if t.by_status.get(s, 0))
    window = f"{FINISHED_WINDOW_SECONDS:g} s"
    finished = f"finished {now.finished:,} in the last {window}: {rate(now.finished / FINISHED_WINDOW_SECONDS)}/s"
    span = now.at - since.at
    if span <= 0:
        trend = "backlog trend: measuring"
    else:
        shrink = (since.totals.active - t.active) / span
        over = "" if round(span) == round(FINISHED_WINDOW_SECONDS) else f" over the last {span:.0f} s"
        if shrink > 0:
            trend = f"backlog shrinking {rate(shrink)}/s{over}, about {age(t.active / shrink)} to go"
        elif shrink < 0:
            trend = f"backlog growing {rate(-shrink)}/s{over}"
        else:
            trend = f"backlog not shrinking{over}"
    return f"{elapsed:5.0f} s  {t.active:,} left ({remaining}); {finished}; {trend}"


def rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.1f}"


def left(t: Totals) -> str:
    parts = [f"{t.by_status.get(s, 0):,} {s}" for s in ACTIVE if t.by_status.get(s, 0)]
    text = ", ".join(parts) + " left"
    if t.oldest_active_s is not None:
        text += f" (oldest {age(t.oldest_active_s)}"
        text += f", relay lag {age(t.relay_lag_s)})" if t.relay_lag_s is not None else ")"
    if t.dead:
        text += f"; {t.dead:,} dead"
    return text + "; `recalq status` and `recalq jobs` show them"
