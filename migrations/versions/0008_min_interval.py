"""Outbox v3: a task may set a minimum interval between the runs of one coalescing key, so a
long burst of mutations on one key costs a bounded number of runs while an isolated change
still runs at once.

Revision ID: 0008_min_interval
Revises: 0007_enqueue_v2
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_function, pinned_sql

revision = "0008_min_interval"
down_revision = "0007_enqueue_v2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0 keeps every existing task as it was; `recalq migrate` sets the recalculation task's
    # value from RECALQ_RECALC_MIN_INTERVAL_SECONDS. The upper bound catches a unit mistake
    # (an interval of days would leave a hot key's changes unapplied for that long).
    op.execute(
        """
        ALTER TABLE outbox_task
            ADD COLUMN min_interval interval NOT NULL DEFAULT '0'
            CONSTRAINT ck_outbox_task_min_interval_range
                CHECK (min_interval >= interval '0' AND min_interval <= interval '1 hour')
        """
    )
    # Same name and signature; outbox_enqueue and compliance_request_recalculation call it by name.
    op.execute(pinned_sql("functions/outbox_v3.sql"))


def downgrade() -> None:
    op.execute(pinned_function("functions/outbox_v2.sql", "outbox_enqueue_request"))
    op.execute("ALTER TABLE outbox_task DROP COLUMN min_interval")
