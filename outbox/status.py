"""Job statuses, mirroring the Postgres enum `outbox_job_status` (see docs/job-states.md).

    pending ──relay──▶ published ──worker──▶ running ──▶ done
       ▲                                       │  ▲
       │ requeue                               │  └── retrying (failed, attempts left)
       dead ◀── failed, no attempts left ──────┘
    superseded: a lost running job whose key's next job covers its requests
    cancelled:  a watched job its owner stopped (at once while waiting; at the next unit while
                running; never retried)
"""

from enum import StrEnum


class JobStatus(StrEnum):
    #: Committed, waiting for a relay to publish it once next_run_at is due.
    PENDING = "pending"
    #: Handed to the broker; no worker has started it yet.
    PUBLISHED = "published"
    #: A worker holds attempt `attempts` under a lease.
    RUNNING = "running"
    #: An attempt failed; the next one is due at next_run_at.
    RETRYING = "retrying"
    #: Finished and its effects applied (terminal).
    DONE = "done"
    #: Failed max_attempts times or permanently; requeueable (terminal until requeued).
    DEAD = "dead"
    #: A lost running job replaced by the key's next job, which covers its requests (terminal).
    SUPERSEDED = "superseded"
    #: Stopped on request (terminal; never retried).
    CANCELLED = "cancelled"


#: Statuses of a job that has not started: a new request for its key joins it (G3).
WAITING = frozenset({JobStatus.PENDING, JobStatus.PUBLISHED, JobStatus.RETRYING})
TERMINAL = frozenset({JobStatus.DONE, JobStatus.DEAD, JobStatus.SUPERSEDED, JobStatus.CANCELLED})
