"""Jobs people watch: stages, progress, events, checkpoints, cancel, results and tombstones.

What a watched task (outbox_task.watched) keeps for the person who started a job, beside the
job's row rather than on it (the hot row stays small): a progress row, an append-only event log
with a per-job sequence, a checkpoint, and after pruning or deletion a tombstone. Lifecycle
version 6 (migrations/functions/outbox_v6.sql) writes the events and knows `cancelled`.

Safe on a live outbox_job of millions of rows: new columns are nullable or have constant
defaults (catalog changes only); the terminal-status constraint is replaced by one added NOT
VALID (a brief lock, no scan) and validated by the next revision outside this transaction;
every lock waits at most lock_timeout.

Revision ID: 0016_watched_jobs
Revises: 0015_cancelled_status
Create Date: 2026-12-02
"""

from alembic import op

from migrations.pinned import pinned_function, pinned_sql

revision = "0016_watched_jobs"
down_revision = "0015_cancelled_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        CREATE TYPE outbox_event_kind AS ENUM
            ('queued', 'started', 'progress', 'retrying', 'cancel_requested', 'complete', 'error', 'cancelled');

        ALTER TABLE outbox_task
            -- Its jobs keep progress, events and checkpoints for the people who watch them.
            ADD COLUMN watched boolean NOT NULL DEFAULT false,
            -- [{"key": ..., "display": ...}, ...]: the steps a watcher is shown, in order.
            ADD COLUMN stages jsonb NOT NULL DEFAULT '[]'::jsonb
                CONSTRAINT ck_outbox_task_stages_array CHECK (jsonb_typeof(stages) = 'array'),
            -- How long a pruned or deleted job's tombstone says "expired"/"deleted" to its owner.
            ADD COLUMN tombstone_retention interval NOT NULL DEFAULT interval '30 days'
                CONSTRAINT ck_outbox_task_tombstone_retention CHECK (tombstone_retention > interval '0');

        ALTER TABLE outbox_job
            ADD COLUMN watched boolean NOT NULL DEFAULT false,
            -- Who may watch it: "<actor type>:<actor id>" of the submission.
            ADD COLUMN owner text,
            -- The task's stages when the job was submitted.
            ADD COLUMN stages jsonb,
            ADD COLUMN cancel_requested_at timestamptz,
            -- A small reference to what the job made (a domain row that outlives the job).
            ADD COLUMN result jsonb,
            -- {"stage", "message", "can_resume"}: what a watcher is told when it failed.
            ADD COLUMN error jsonb,
            -- The job this one resumes (it inherited that job's checkpoint).
            ADD COLUMN resumed_from bigint,
            -- After this the job's status is gone for good (pruned to a tombstone "expired").
            ADD COLUMN expires_at timestamptz;
        ALTER TABLE outbox_job
            ADD CONSTRAINT ck_outbox_job_watched_has_owner CHECK (NOT watched OR owner IS NOT NULL) NOT VALID,
            ADD CONSTRAINT ck_outbox_job_result_small
                CHECK (result IS NULL OR octet_length(result::text) <= 4096) NOT VALID,
            ADD CONSTRAINT ck_outbox_job_error_small
                CHECK (error IS NULL OR octet_length(error::text) <= 4096) NOT VALID,
            -- Replaces ck_outbox_job_finished_iff_terminal (validated by the next revision).
            ADD CONSTRAINT ck_outbox_job_finished_iff_terminal_v2
                CHECK ((status IN ('done', 'dead', 'superseded', 'cancelled')) = (finished_at IS NOT NULL)) NOT VALID;
        ALTER TABLE outbox_job DROP CONSTRAINT ck_outbox_job_finished_iff_terminal;
        -- A watcher's list: its own jobs of a kind, newest first.
        CREATE INDEX ix_outbox_job_owner_task ON outbox_job (owner, task, id DESC) WHERE owner IS NOT NULL;

        -- Where a watched job is now, and the sequence of its events. One row per watched job.
        CREATE TABLE outbox_progress (
            job_id        bigint PRIMARY KEY REFERENCES outbox_job (id) ON DELETE CASCADE,
            attempt       integer NOT NULL CHECK (attempt >= 0),
            stage         text,
            stage_index   integer CHECK (stage_index >= 0),
            fraction      double precision CHECK (fraction BETWEEN 0 AND 1),
            message       text CHECK (length(message) <= 500),
            current_units bigint CHECK (current_units >= 0),
            total_units   bigint CHECK (total_units >= 0),
            last_seq      bigint NOT NULL CHECK (last_seq >= 1),
            last_event_at timestamptz,
            updated_at    timestamptz NOT NULL DEFAULT now()
        );

        -- Every change a watcher can see, in order: seq is the SSE event id and the ETag.
        CREATE TABLE outbox_event (
            job_id     bigint NOT NULL REFERENCES outbox_job (id) ON DELETE CASCADE,
            seq        bigint NOT NULL CHECK (seq >= 1),
            kind       outbox_event_kind NOT NULL,
            attempt    integer,
            data       jsonb NOT NULL DEFAULT '{}'::jsonb
                CONSTRAINT ck_outbox_event_small CHECK (octet_length(data::text) <= 8192),
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_id, seq)
        );

        -- A handler's cursor, committed with the unit it covers.
        CREATE TABLE outbox_checkpoint (
            job_id     bigint PRIMARY KEY REFERENCES outbox_job (id) ON DELETE CASCADE,
            attempt    integer NOT NULL CHECK (attempt >= 1),
            cursor     jsonb NOT NULL CONSTRAINT ck_outbox_checkpoint_small CHECK (octet_length(cursor::text) <= 65536),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        -- What is left of a watched job after it was pruned or deleted: enough to tell its owner
        -- "expired" or "deleted" instead of "unknown", for tombstone_retention.
        CREATE TABLE outbox_tombstone (
            job_id      bigint PRIMARY KEY,
            task        text NOT NULL,
            owner       text NOT NULL,
            reason      text NOT NULL CONSTRAINT ck_outbox_tombstone_reason CHECK (reason IN ('expired', 'deleted')),
            finished_at timestamptz,
            created_at  timestamptz NOT NULL DEFAULT now(),
            keep_until  timestamptz NOT NULL
        );
        CREATE INDEX ix_outbox_tombstone_keep_until ON outbox_tombstone (keep_until);
        """
    )
    op.execute(pinned_sql("functions/outbox_v6.sql"))
    op.execute(
        """
        -- Lifecycle events of watched jobs. The WHEN clauses read the row only: a job that is not
        -- watched never runs the function.
        CREATE TRIGGER tr_outbox_job_event
            AFTER UPDATE ON outbox_job
            FOR EACH ROW
            WHEN (NEW.watched AND (OLD.status IS DISTINCT FROM NEW.status
                                   OR OLD.attempts IS DISTINCT FROM NEW.attempts
                                   OR OLD.cancel_requested_at IS DISTINCT FROM NEW.cancel_requested_at))
            EXECUTE FUNCTION outbox_job_event();
        """
    )
    op.execute(pinned_sql("views/outbox_queue_state_v2.sql"))


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP VIEW outbox_queue_state")
    op.execute(pinned_sql("views/outbox_queue_state_v1.sql"))
    op.execute(
        """
        DROP TRIGGER tr_outbox_job_event ON outbox_job;
        DROP FUNCTION outbox_job_event();
        DROP FUNCTION outbox_resume(bigint, text, text, text, text);
        DROP FUNCTION outbox_complete(bigint, integer, jsonb);
        DROP FUNCTION outbox_finish_cancelled(bigint, integer);
        DROP FUNCTION outbox_cancel(bigint);
        DROP FUNCTION outbox_report_progress(bigint, integer, text, double precision, text, bigint, bigint, interval);
        DROP FUNCTION outbox_watch(bigint, text);
        DROP FUNCTION outbox_append_event(bigint, outbox_event_kind, integer, jsonb);
        DROP TABLE outbox_tombstone, outbox_checkpoint, outbox_event, outbox_progress;
        DROP INDEX ix_outbox_job_owner_task;
        -- A job cancelled under this revision has no status the older code knows: it ends dead.
        UPDATE outbox_job SET status = 'dead', last_error = coalesce(last_error, 'cancelled')
         WHERE status = 'cancelled';
        ALTER TABLE outbox_job
            DROP CONSTRAINT ck_outbox_job_finished_iff_terminal_v2,
            DROP CONSTRAINT ck_outbox_job_error_small,
            DROP CONSTRAINT ck_outbox_job_result_small,
            DROP CONSTRAINT ck_outbox_job_watched_has_owner,
            ADD CONSTRAINT ck_outbox_job_finished_iff_terminal
                CHECK ((status IN ('done', 'dead', 'superseded')) = (finished_at IS NOT NULL)),
            DROP COLUMN expires_at, DROP COLUMN resumed_from, DROP COLUMN error, DROP COLUMN result,
            DROP COLUMN cancel_requested_at, DROP COLUMN stages, DROP COLUMN owner, DROP COLUMN watched;
        ALTER TABLE outbox_task DROP COLUMN tombstone_retention, DROP COLUMN stages, DROP COLUMN watched;
        DROP TYPE outbox_event_kind;
        """
    )
    op.execute(pinned_function("functions/outbox_v5.sql", "outbox_start"))
    op.execute(pinned_function("functions/outbox_v5.sql", "outbox_fail"))
