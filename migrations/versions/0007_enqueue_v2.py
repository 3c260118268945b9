"""Outbox v2: a request that joins a waiting job locks it instead of rewriting it, and a
retryable failure yields to the key's waiting job instead of breaking its unique index.

Revision ID: 0007_enqueue_v2
Revises: 0006_superseded_by_index
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_function, pinned_sql

revision = "0007_enqueue_v2"
down_revision = "0006_superseded_by_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Same names and signatures; outbox_enqueue and compliance_request_recalculation call
    # outbox_enqueue_request by name, so they pick it up as they are.
    op.execute(pinned_sql("functions/outbox_v2.sql"))


def downgrade() -> None:
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_enqueue_request"))
    op.execute(pinned_function("functions/outbox_v1.sql", "outbox_fail"))
