"""The job status `cancelled`, in a revision of its own.

A new enum value cannot be used in the transaction that adds it, so the constraints, functions
and views that use it come in the next revision. ADD VALUE takes no table lock and rewrites
nothing: safe on a live queue.

Downgrade: PostgreSQL cannot drop an enum value; the value stays (no job uses it once the next
revision is downgraded) and upgrading again is a no-op (IF NOT EXISTS).

Revision ID: 0015_cancelled_status
Revises: 0014_suggestion_cache
Create Date: 2026-12-02
"""

from alembic import op

revision = "0015_cancelled_status"
down_revision = "0014_suggestion_cache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("ALTER TYPE outbox_job_status ADD VALUE IF NOT EXISTS 'cancelled' AFTER 'superseded'")


def downgrade() -> None:
    pass
