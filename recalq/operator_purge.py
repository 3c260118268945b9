"""`recalq purge-dead`: deletes DEAD jobs for good, once nobody will run them again.

DEAD jobs are never pruned; this is the way to drop the ones whose cause cannot be fixed (the
property is gone, the payload can never be valid). It chooses the dead jobs first (by id, key,
age, or all of them), shows what would go, asks (unless --yes), then purges exactly the jobs it
showed through outbox.prune.purge_dead, which takes the superseded jobs they covered and every
request with them, and leaves a job alone that was requeued in between.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import NamedTuple, TextIO

import psycopg

from outbox import prune
from recalq.console_format import age, plural_s
from recalq.operator import CommandFailed
from recalq.operator_repair import confirmed, ids_text

#: The dead jobs a purge chooses (a NULL filter matches every dead job), oldest first.
CHOOSE = """
SELECT id, extract(epoch FROM now() - finished_at)::float8 AS age_s
  FROM outbox_job
 WHERE status = 'dead'
   AND (%(job_ids)s::bigint[] IS NULL OR id = ANY(%(job_ids)s::bigint[]))
   AND (%(key)s::text IS NULL OR coalescing_key = %(key)s::text)
   AND (%(older_than_s)s::float8 IS NULL OR finished_at < now() - make_interval(secs => %(older_than_s)s::float8))
 ORDER BY id
"""
#: What purging them takes along, as outbox.prune's purge_dead_jobs chooses it: the superseded
#: jobs that name them (transitively) and the requests of all of those.
ALONG = """
WITH RECURSIVE doomed AS (
    SELECT unnest(%(job_ids)s::bigint[]) AS id
    UNION
    SELECT s.id FROM outbox_job s JOIN doomed d ON s.superseded_by = d.id
)
SELECT (SELECT count(*) FROM doomed) - cardinality(%(job_ids)s::bigint[]) AS superseded,
       (SELECT count(*) FROM outbox_request r JOIN doomed d ON r.job_id = d.id) AS requests
"""
STATUS_OF = "SELECT id, status::text FROM outbox_job WHERE id = ANY(%(job_ids)s::bigint[])"

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Ages above this are surely a typo (about 100 years).
MAX_AGE_SECONDS = 100 * 365 * 86400


class Age(NamedTuple):
    seconds: float
    text: str


def parse_age(text: str) -> Age:
    """`7d`, `12h`, `30m`, `90s`, `2w`; ValueError with a sentence otherwise."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        hint = " (a unit is needed)" if re.fullmatch(r"\d+(\.\d+)?", text.strip()) else ""
        raise ValueError(f"{text!r} is not an age{hint}; write it like 7d, 12h, 30m, 90s or 2w")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_AGE_SECONDS:
        raise ValueError(f"{text} is out of range; use more than 0 (or --all for every dead job) and at most 100 years")
    return Age(seconds, match.group(1) + match.group(2))


@dataclass(frozen=True, slots=True)
class Choice:
    job_ids: list[int]
    oldest_s: float
    youngest_s: float
    superseded: int
    requests: int


def check(args: argparse.Namespace) -> None:
    """What argparse cannot say: one selection, and --all alone."""
    filters = bool(args.job_ids) or args.key is not None or args.older_than is not None
    if args.all and filters:
        raise CommandFailed("--all purges every dead job: give it without job ids, --key or --older-than", 2)
    if not args.all and not filters:
        raise CommandFailed("say which dead jobs to purge: JOB_ID ..., --key KEY, --older-than AGE (e.g. 7d), "
                            "or --all", 2)


def purge_dead(conn: psycopg.Connection, args: argparse.Namespace, out: TextIO) -> int:
    job_ids = sorted(set(args.job_ids)) or None
    if job_ids is not None:
        _refuse_what_is_not_dead(conn, job_ids)
    older_than: Age | None = args.older_than
    chosen = choose(conn, job_ids=job_ids, key=args.key, older_than_s=older_than.seconds if older_than else None)
    scope = _scope(args)
    if chosen is None:
        out.write(f"no dead jobs{' at all' if args.all else scope}; nothing purged\n")
        return 0
    n = len(chosen.job_ids)
    them = "it" if n == 1 else "them"
    out.write(f"{n} dead job{plural_s(n)}{scope}: {ids_text(chosen.job_ids)} ({_died(chosen)}), with "
              f"{_along(chosen.superseded, chosen.requests, 'it' if n == 1 else 'they')}\n")
    if args.dry_run:
        out.write(f"dry run: nothing purged (without --dry-run, `recalq purge-dead` asks, then purges {them})\n")
        return 0
    if not args.yes and not confirmed(f"Purge {them} for good? [y/N] ", out):
        raise CommandFailed("not confirmed; nothing purged (pass --yes to skip the question)")
    report = prune.purge_dead(conn, job_ids=chosen.job_ids)
    survivors = dict(conn.execute(STATUS_OF, {"job_ids": chosen.job_ids}).fetchall())
    purged = [job_id for job_id in chosen.job_ids if job_id not in survivors]
    superseded = report.jobs - len(purged)
    lines = [f"purged {len(purged)} dead job{plural_s(len(purged))} for good"
             + (f" ({ids_text(purged)})" if purged else "")
             + f", with {_along(superseded, report.requests, 'it' if len(purged) == 1 else 'they')}"]
    if survivors:
        lines.append("skipped, no longer dead: "
                     + ", ".join(f"{job_id} ({status})" for job_id, status in sorted(survivors.items())))
    out.write("\n".join(lines) + "\n")
    return 0


def choose(conn: psycopg.Connection, *, job_ids: list[int] | None, key: str | None,
           older_than_s: float | None) -> Choice | None:
    """The dead jobs the filters match and what purging them takes along; None if none match."""
    with conn.transaction():  # one snapshot for both counts
        rows = conn.execute(CHOOSE, {"job_ids": job_ids, "key": key, "older_than_s": older_than_s}).fetchall()
        if not rows:
            return None
        ids = [row[0] for row in rows]
        along = conn.execute(ALONG, {"job_ids": ids}).fetchone()
    assert along is not None
    ages = [row[1] for row in rows if row[1] is not None]
    return Choice(ids, max(ages, default=0.0), min(ages, default=0.0), int(along[0]), int(along[1]))


def _refuse_what_is_not_dead(conn: psycopg.Connection, job_ids: list[int]) -> None:
    statuses = dict(conn.execute(STATUS_OF, {"job_ids": job_ids}).fetchall())
    wrong = [f"job {job_id} does not exist" if job_id not in statuses else f"job {job_id} is {statuses[job_id]}"
             for job_id in job_ids if statuses.get(job_id) != "dead"]
    if wrong:
        raise CommandFailed(f"{'; '.join(wrong)}: only a dead job can be purged (`recalq jobs --status dead` lists "
                            "them); nothing purged")


def _scope(args: argparse.Namespace) -> str:
    if args.all:
        return " in all"
    parts = []
    if args.key is not None:
        parts.append(f" of key {args.key!r}")
    if args.older_than is not None:
        parts.append(f" that died more than {args.older_than.text} ago")
    return ",".join(parts)


def _died(chosen: Choice) -> str:
    if len(chosen.job_ids) == 1 or age(chosen.oldest_s) == age(chosen.youngest_s):
        return f"died {age(chosen.oldest_s)} ago"
    return f"died {age(chosen.youngest_s)} to {age(chosen.oldest_s)} ago"


def _along(superseded: int, requests: int, pronoun: str) -> str:
    """What goes with the dead jobs: "their 3 requests", or "1 superseded job it covered and 2 requests"."""
    if not superseded:
        return f"{'its' if pronoun == 'it' else 'their'} {requests} request{plural_s(requests)}"
    return (f"{superseded} superseded job{plural_s(superseded)} {pronoun} covered and "
            f"{requests} request{plural_s(requests)}")
