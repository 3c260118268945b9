"""One engine for every job kind: per-task policy, the job's coalescing mode, attempt history,
and outbox lifecycle version 5 (migrations/functions/outbox_v5.sql says what changed and why).

Safe on a live outbox_job of millions of rows:
- new columns have constant defaults, so adding them rewrites nothing (a catalog change);
- the new constraint on outbox_job is added NOT VALID here (a brief lock, no scan) and
  validated by 0012 outside any transaction, without blocking writes;
- every lock is taken with a lock_timeout, so the revision fails fast instead of queueing every
  producer behind a long transaction; run it again when that transaction is gone;
- the indexes that make the coalescing modes hold are built CONCURRENTLY by 0012.

Revision ID: 0011_task_policy
Revises: 0010_requeue_v2
Create Date: 2026-12-02
"""

from alembic import op

from migrations.pinned import pinned_function, pinned_sql

revision = "0011_task_policy"
down_revision = "0010_requeue_v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        CREATE TYPE outbox_coalescing_mode AS ENUM ('coalesce', 'unique_active', 'none');
        CREATE TYPE outbox_attempt_outcome AS ENUM ('succeeded', 'failed', 'lost', 'cancelled');

        -- Per-task policy. Defaults keep a task registered before this revision as it was.
        ALTER TABLE outbox_task
            -- Celery queue of the task's messages; NULL: the deployment's default queue.
            ADD COLUMN queue text
                CONSTRAINT ck_outbox_task_queue_name CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$'),
            -- A running attempt may be taken over this long after its last start or heartbeat.
            ADD COLUMN lease_seconds double precision NOT NULL DEFAULT 120,
            -- Celery's hard and soft time limits of one attempt (carried by each message).
            ADD COLUMN time_limit_seconds double precision NOT NULL DEFAULT 90,
            ADD COLUMN soft_time_limit_seconds double precision NOT NULL DEFAULT 60,
            -- The handler extends its lease while it runs (outbox_heartbeat).
            ADD COLUMN heartbeats boolean NOT NULL DEFAULT false,
            ADD COLUMN mode outbox_coalescing_mode NOT NULL DEFAULT 'coalesce',
            ADD COLUMN cancellable boolean NOT NULL DEFAULT false,
            -- How long finished jobs are kept; NULL: the deployment's default.
            ADD COLUMN retention interval,
            -- unique_active: the least time between a key's last finish and its next job.
            ADD COLUMN cooldown interval NOT NULL DEFAULT '0',
            -- The hard limit stays below RabbitMQ's consumer_timeout (30 min): a late-acked
            -- message must be acknowledged by then (`recalq migrate` also checks it leaves room
            -- for the longest retry countdown, a deployment setting).
            ADD CONSTRAINT ck_outbox_task_time_limits
                CHECK (0 < soft_time_limit_seconds AND soft_time_limit_seconds < time_limit_seconds
                       AND time_limit_seconds < 1800),
            -- Without heartbeats a live attempt holds its lease only if the lease outlasts it.
            ADD CONSTRAINT ck_outbox_task_lease
                CHECK (lease_seconds > 0 AND lease_seconds <= 3600
                       AND (heartbeats OR lease_seconds > time_limit_seconds)),
            -- Cancelling a coalesced job would drop the requests it carries (G2).
            ADD CONSTRAINT ck_outbox_task_coalesced_not_cancellable CHECK (NOT (cancellable AND mode = 'coalesce')),
            ADD CONSTRAINT ck_outbox_task_retention CHECK (retention IS NULL OR retention > interval '0'),
            ADD CONSTRAINT ck_outbox_task_cooldown
                CHECK (cooldown >= interval '0' AND cooldown <= interval '1 day'
                       AND (cooldown = interval '0' OR mode = 'unique_active'));

        -- The job's mode, copied from its task when it is created: the unique indexes of 0012
        -- are partial on it. A constant default: no rewrite.
        ALTER TABLE outbox_job ADD COLUMN mode outbox_coalescing_mode NOT NULL DEFAULT 'coalesce';
        -- The worker holding the running attempt (its row of outbox_attempt is written when it ends).
        ALTER TABLE outbox_job ADD COLUMN worker text;
        -- Only a coalescing job is ever covered by another job of its key.
        ALTER TABLE outbox_job
            ADD CONSTRAINT ck_outbox_job_superseded_only_coalesced
                CHECK (status <> 'superseded' OR mode = 'coalesce') NOT VALID;

        -- One row per finished attempt, inserted by the statement that finishes it: every error
        -- is kept, not only the job's last. The running attempt is on its job's row.
        CREATE TABLE outbox_attempt (
            job_id         bigint NOT NULL REFERENCES outbox_job (id) ON DELETE CASCADE,
            -- The job's requeue_count when the attempt ran: 0 for the first run.
            run            integer NOT NULL CHECK (run >= 0),
            attempt        integer NOT NULL CHECK (attempt >= 1),
            celery_task_id uuid NOT NULL,
            worker         text,
            started_at     timestamptz NOT NULL,
            finished_at    timestamptz NOT NULL,
            outcome        outbox_attempt_outcome NOT NULL,
            error          text,
            PRIMARY KEY (job_id, run, attempt),
            CONSTRAINT ck_outbox_attempt_failure_has_error CHECK (outcome NOT IN ('failed', 'lost') OR error IS NOT NULL)
        );
        -- Recent failures across the queue (metrics, the admin listing).
        CREATE INDEX ix_outbox_attempt_failed_at ON outbox_attempt (finished_at)
            WHERE outcome IN ('failed', 'lost');
        """
    )
    op.execute(pinned_sql("functions/outbox_v5.sql"))


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        DROP FUNCTION outbox_heartbeat(bigint, integer);
        DROP FUNCTION outbox_start(bigint, boolean, interval, integer, text);
        DROP FUNCTION outbox_enqueue_request(text, text, jsonb, text, text, text, text, integer, timestamptz);
        """
    )
    op.execute(pinned_function("functions/outbox_v3.sql", "outbox_enqueue_request"))
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_enqueue"))
    op.execute("DROP FUNCTION outbox_start(bigint, boolean, interval, integer)")  # v5's wrapper
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_start"))
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_complete"))
    op.execute(pinned_function("functions/outbox_v2.sql", "outbox_fail"))
    op.execute(pinned_function("functions/outbox_v4.sql", "outbox_requeue"))
    op.execute(
        """
        DROP TABLE outbox_attempt;
        ALTER TABLE outbox_job DROP CONSTRAINT ck_outbox_job_superseded_only_coalesced;
        ALTER TABLE outbox_job DROP COLUMN mode, DROP COLUMN worker;
        ALTER TABLE outbox_task
            DROP COLUMN queue, DROP COLUMN lease_seconds, DROP COLUMN time_limit_seconds,
            DROP COLUMN soft_time_limit_seconds, DROP COLUMN heartbeats, DROP COLUMN mode,
            DROP COLUMN cancellable, DROP COLUMN retention, DROP COLUMN cooldown;
        DROP TYPE outbox_attempt_outcome;
        DROP TYPE outbox_coalescing_mode;
        """
    )
