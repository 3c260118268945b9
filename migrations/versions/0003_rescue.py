"""Rescue bookkeeping: when a job's message was last re-sent because it looked lost.

Revision ID: 0003_rescue
Revises: 0002_compliance
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003_rescue"
down_revision = "0002_compliance"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- A relay re-sends the message of a job that looks lost (published or retrying long
        -- past due, or running with an expired lease). rescued_at throttles that to once per
        -- grace period, so a job nobody can run is not re-sent on every pass.
        ALTER TABLE outbox_job
            ADD COLUMN rescued_at   timestamptz,
            ADD COLUMN rescue_count integer NOT NULL DEFAULT 0 CHECK (rescue_count >= 0);
        -- The rescue scan needs no index of its own: ix_outbox_job_status_next_run_at finds
        -- jobs by status, and another index would cost a write on every status transition.
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE outbox_job DROP COLUMN IF EXISTS rescue_count, DROP COLUMN IF EXISTS rescued_at;
        """
    )
