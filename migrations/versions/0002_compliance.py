"""Compliance domain: clients, properties, documents, score history, audit log, queue view.

Revision ID: 0002_compliance
Revises: 0001_outbox
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_sql

revision = "0002_compliance"
down_revision = "0001_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TYPE document_status AS ENUM ('pending_verification', 'verified', 'rejected');
        CREATE TYPE document_source AS ENUM ('client', 'admin', 'ai');
        CREATE TYPE compliance_requirement AS ENUM
            ('gas_safety', 'eicr', 'epc', 'smoke_co_alarms', 'fire_risk_assessment', 'legionella');

        CREATE TABLE clients (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name       text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
            created_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE properties (
            id                            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id                     bigint NOT NULL REFERENCES clients (id),
            name                          text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
            has_gas_supply                boolean NOT NULL DEFAULT true,
            compliance_score              integer CHECK (compliance_score BETWEEN 0 AND 100),
            compliance_breakdown          jsonb,
            compliance_last_calculated_at timestamptz,
            compliance_version            integer,
            compliance_as_of              date,
            compliance_inputs_fingerprint text,
            -- Every mutation bumps generation; a recalculation records the one it read.
            generation                    bigint NOT NULL DEFAULT 0,
            scored_generation             bigint NOT NULL DEFAULT 0,
            compliance_score_pending      boolean GENERATED ALWAYS AS (generation > scored_generation) STORED,
            created_at                    timestamptz NOT NULL DEFAULT now(),
            updated_at                    timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT ck_properties_scored_not_ahead CHECK (scored_generation <= generation),
            CONSTRAINT ck_properties_score_fields_together CHECK (
                (compliance_score IS NULL) = (compliance_last_calculated_at IS NULL)
                AND (compliance_score IS NULL) = (compliance_breakdown IS NULL)
                AND (compliance_score IS NULL) = (compliance_version IS NULL)
                AND (compliance_score IS NULL) = (compliance_as_of IS NULL)
                AND (compliance_score IS NULL) = (compliance_inputs_fingerprint IS NULL))
        );
        CREATE INDEX ix_properties_client_id ON properties (client_id);

        CREATE TABLE documents (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            property_id      bigint NOT NULL REFERENCES properties (id),
            requirement_code compliance_requirement NOT NULL,
            status           document_status NOT NULL DEFAULT 'pending_verification',
            expires_at       date,
            file_name        text NOT NULL CHECK (length(file_name) BETWEEN 1 AND 255),
            size_bytes       bigint NOT NULL CHECK (size_bytes >= 0),
            sha256           text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
            source           document_source NOT NULL,
            rejection_reason text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            deleted_at       timestamptz,
            CONSTRAINT ck_documents_rejected_has_reason
                CHECK ((status = 'rejected') = (rejection_reason IS NOT NULL))
        );
        CREATE INDEX ix_documents_property_live ON documents (property_id) WHERE deleted_at IS NULL;
        CREATE INDEX ix_documents_expires_at ON documents (expires_at)
            WHERE deleted_at IS NULL AND expires_at IS NOT NULL;

        -- One snapshot per applied recalculation; job_id makes a second application impossible.
        -- No foreign key to outbox_job: finished jobs are pruned, history is kept.
        CREATE TABLE property_compliance_score_history (
            id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            property_id        bigint NOT NULL REFERENCES properties (id),
            job_id             bigint NOT NULL,
            score              integer NOT NULL CHECK (score BETWEEN 0 AND 100),
            breakdown          jsonb NOT NULL,
            version            integer NOT NULL,
            as_of              date NOT NULL,
            inputs_fingerprint text NOT NULL,
            generation         bigint NOT NULL,
            calculated_at      timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT uq_score_history_job UNIQUE (job_id)
        );
        CREATE INDEX ix_score_history_property ON property_compliance_score_history (property_id, id DESC);

        -- Append-only record of who did what. Ids only, no foreign keys: audit outlives rows.
        CREATE TABLE audit_log (
            id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            action         text NOT NULL CHECK (action ~ '^[A-Z][A-Z_]{2,63}$'),
            actor_type     text NOT NULL,
            actor_id       text,
            property_id    bigint,
            client_id      bigint,
            correlation_id text,
            job_id         bigint,
            details        jsonb NOT NULL DEFAULT '{}'::jsonb,
            at             timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_audit_log_property ON audit_log (property_id, id DESC);
        CREATE INDEX ix_audit_log_action ON audit_log (action, id DESC);
        -- A job's effects are audited once, however often its message arrives.
        CREATE UNIQUE INDEX ux_audit_log_job_effect ON audit_log (job_id, action)
            WHERE action IN ('COMPLIANCE_SCORE_UPDATED', 'COMPLIANCE_SCORE_DRIFT_DETECTED');

        INSERT INTO outbox_task (name, description)
        VALUES ('compliance.recalculate_property', 'Recompute one property''s compliance score');
        """
    )
    op.execute(pinned_sql("functions/compliance_v1.sql"))
    op.execute(
        """
        -- R-A1: the queue by property and status.
        CREATE INDEX ix_outbox_job_compliance_property_status
            ON outbox_job (compliance_property_id(payload), status)
            WHERE task = 'compliance.recalculate_property';
        """
    )
    op.execute(pinned_sql("views/compliance_recalc_queue_v1.sql"))


def downgrade() -> None:
    op.execute(
        """
        DROP VIEW IF EXISTS compliance_recalc_queue;
        DROP INDEX IF EXISTS ix_outbox_job_compliance_property_status;
        DELETE FROM outbox_request r USING outbox_job j
         WHERE j.id = r.job_id AND j.task = 'compliance.recalculate_property';
        DELETE FROM outbox_job WHERE task = 'compliance.recalculate_property';
        DELETE FROM outbox_task WHERE name = 'compliance.recalculate_property';
        DROP FUNCTION IF EXISTS compliance_request_recalculation(bigint, text, text, text, text, integer, boolean);
        DROP FUNCTION IF EXISTS compliance_property_id(jsonb);
        DROP TABLE IF EXISTS audit_log;
        DROP TABLE IF EXISTS property_compliance_score_history;
        DROP TABLE IF EXISTS documents;
        DROP TABLE IF EXISTS properties;
        DROP TABLE IF EXISTS clients;
        DROP TYPE IF EXISTS compliance_requirement;
        DROP TYPE IF EXISTS document_source;
        DROP TYPE IF EXISTS document_status;
        """
    )
