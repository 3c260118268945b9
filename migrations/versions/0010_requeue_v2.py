"""Outbox v4: requeueing a DEAD job while a producer commits the key's next job supersedes the
dead one instead of failing on the unique index of waiting jobs.

Revision ID: 0010_requeue_v2
Revises: 0009_recalc_queue_v2
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_function, pinned_sql

revision = "0010_requeue_v2"
down_revision = "0009_recalc_queue_v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Same name and signature: callers (outbox.lifecycle.requeue, the CLI, the admin API) keep working.
    op.execute(pinned_sql("functions/outbox_v4.sql"))


def downgrade() -> None:
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_requeue"))
