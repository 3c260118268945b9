"""Outbox: generic jobs, enqueue requests, task registry and the lifecycle functions.

Revision ID: 0001_outbox
Revises:
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_sql

revision = "0001_outbox"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TYPE outbox_job_status AS ENUM
            ('pending', 'published', 'running', 'retrying', 'done', 'dead', 'superseded');

        -- Tasks a producer may name. Unknown names are refused at enqueue, not discovered
        -- later as messages no worker can run.
        CREATE TABLE outbox_task (
            name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]*(\\.[a-z][a-z0-9_]*)+$'),
            description text NOT NULL,
            -- Attempts a job of this task gets before it is DEAD, unless its producer says otherwise.
            max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
            created_at  timestamptz NOT NULL DEFAULT now()
        );

        -- One row per runnable job: the message the relay publishes.
        CREATE TABLE outbox_job (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            task             text NOT NULL REFERENCES outbox_task (name),
            coalescing_key   text NOT NULL CHECK (coalescing_key <> '' AND length(coalescing_key) <= 200),
            payload          jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
            status           outbox_job_status NOT NULL DEFAULT 'pending',
            attempts         integer NOT NULL DEFAULT 0,
            max_attempts     integer NOT NULL DEFAULT 5,
            next_run_at      timestamptz NOT NULL DEFAULT now(),
            last_error       text,
            celery_task_id   uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            claimed_until    timestamptz,
            published_at     timestamptz,
            publish_count    integer NOT NULL DEFAULT 0,
            started_at       timestamptz,
            heartbeat_at     timestamptz,
            lease_expires_at timestamptz,
            finished_at      timestamptz,
            superseded_by    bigint REFERENCES outbox_job (id),
            requeue_count    integer NOT NULL DEFAULT 0,
            CONSTRAINT ck_outbox_job_attempts_in_range
                CHECK (max_attempts BETWEEN 1 AND 100 AND attempts BETWEEN 0 AND max_attempts),
            CONSTRAINT ck_outbox_job_finished_iff_terminal
                CHECK ((status IN ('done', 'dead', 'superseded')) = (finished_at IS NOT NULL)),
            CONSTRAINT ck_outbox_job_published_has_published_at
                CHECK (status <> 'published' OR published_at IS NOT NULL),
            CONSTRAINT ck_outbox_job_running_has_lease
                CHECK (status <> 'running'
                       OR (started_at IS NOT NULL AND lease_expires_at IS NOT NULL AND attempts >= 1)),
            CONSTRAINT ck_outbox_job_lease_only_while_running
                CHECK (status = 'running' OR lease_expires_at IS NULL),
            CONSTRAINT ck_outbox_job_done_was_started
                CHECK (status <> 'done' OR (started_at IS NOT NULL AND attempts >= 1)),
            CONSTRAINT ck_outbox_job_failed_has_error
                CHECK (status NOT IN ('retrying', 'dead') OR last_error IS NOT NULL),
            CONSTRAINT ck_outbox_job_retrying_has_attempt
                CHECK (status <> 'retrying' OR attempts >= 1),
            CONSTRAINT ck_outbox_job_superseded_names_successor
                CHECK ((status = 'superseded') = (superseded_by IS NOT NULL))
        );

        -- G3: at most one job per key that has not started, and at most one running.
        CREATE UNIQUE INDEX ux_outbox_job_waiting_key ON outbox_job (coalescing_key)
            WHERE status IN ('pending', 'published', 'retrying');
        CREATE UNIQUE INDEX ux_outbox_job_running_key ON outbox_job (coalescing_key)
            WHERE status = 'running';
        -- The relay's claim (pending by next_run_at) and rescue scans (status by time).
        CREATE INDEX ix_outbox_job_status_next_run_at ON outbox_job (status, next_run_at);
        -- Latest jobs of one key, and the per-key status look-ups of R-A1.
        CREATE INDEX ix_outbox_job_key_status ON outbox_job (coalescing_key, status);
        CREATE INDEX ix_outbox_job_key_id ON outbox_job (coalescing_key, id DESC);
        -- Throughput over the last minutes without scanning finished history.
        CREATE INDEX ix_outbox_job_finished_at ON outbox_job (finished_at) WHERE finished_at IS NOT NULL;

        -- One row per enqueue request: who asked, why, and which job carries it.
        CREATE TABLE outbox_request (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            job_id         bigint NOT NULL REFERENCES outbox_job (id) ON DELETE CASCADE,
            coalescing_key text NOT NULL,
            correlation_id text NOT NULL CHECK (correlation_id <> '' AND length(correlation_id) <= 200),
            trigger_reason text NOT NULL,
            actor_type     text NOT NULL,
            actor_id       text,
            created_at     timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_outbox_request_key_correlation UNIQUE (coalescing_key, correlation_id)
        );
        CREATE INDEX ix_outbox_request_job_id ON outbox_request (job_id);

        -- The outbox is a queue: keep autovacuum close behind its churn.
        ALTER TABLE outbox_job SET (autovacuum_vacuum_scale_factor = 0.02,
                                    autovacuum_analyze_scale_factor = 0.02);
        """
    )
    op.execute(pinned_sql("functions/outbox_v1.sql"))
    op.execute(pinned_sql("views/outbox_queue_state_v1.sql"))


def downgrade() -> None:
    op.execute(
        """
        DROP VIEW IF EXISTS outbox_queue_state;
        DROP FUNCTION IF EXISTS outbox_requeue(bigint);
        DROP FUNCTION IF EXISTS outbox_fail(bigint, integer, text, boolean, interval);
        DROP FUNCTION IF EXISTS outbox_complete(bigint, integer);
        DROP FUNCTION IF EXISTS outbox_start(bigint, boolean, interval, integer);
        DROP FUNCTION IF EXISTS outbox_enqueue(text, text, jsonb, text, text, text, text, integer);
        DROP FUNCTION IF EXISTS outbox_enqueue_request(text, text, jsonb, text, text, text, text, integer, timestamptz);
        DROP TABLE IF EXISTS outbox_request;
        DROP TABLE IF EXISTS outbox_job;
        DROP TABLE IF EXISTS outbox_task;
        DROP TYPE IF EXISTS outbox_job_status;
        """
    )
