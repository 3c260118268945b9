"""compliance_recalc_queue v2 (adds job_id and coalescing_key) and an index that reads one
property's jobs newest first, so the operator's "latest jobs of this property" stays an index
range read however long the property's history grows (issue 5, bench 6: 795 ms for a property
with 100k jobs, because v1 could only be ordered by the request's created_at).

The index is built with a plain CREATE INDEX, inside this revision's transaction: the view and
the index change together or not at all, and a failed build leaves nothing behind. The build
holds a SHARE lock on outbox_job, which blocks enqueues (every producer's mutation) for as long
as it takes (2.3 s for a million jobs on a busy 2-core machine). Where that pause matters, build
the same index beforehand, outside any transaction:

    CREATE INDEX CONCURRENTLY ix_outbox_job_compliance_property_id
        ON outbox_job (compliance_property_id(payload), id DESC)
        WHERE task = 'compliance.recalculate_property';

and then upgrade: the revision keeps an existing valid index of that name and rebuilds one a
failed concurrent build left invalid. CONCURRENTLY is not used here because it cannot run in a
transaction (alembic's autocommit_block would commit the view change on its own first), waits
for every open transaction on the table, and leaves an invalid index behind when it fails.

No statistics object on compliance_property_id(payload) comes with it, on purpose. The planner
ignores the statistics of a partial index's expressions, so it guesses 0.5 % of all jobs for any
property; with that guess `property_id = X ORDER BY job_id DESC LIMIT n` always walks this index
(under 2 ms, hot property or not). True per-property frequencies (CREATE STATISTICS) would make a
bare `property_id = X` serial and ~2 ms instead of a parallel ~15-35 ms, but would also let the
planner walk the primary key backwards for a hot property's latest rows, which is fast only while
that property's jobs are recent (seconds for a property that was hot last month).

Revision ID: 0009_recalc_queue_v2
Revises: 0008_min_interval
Create Date: 2026-11-23
"""

from alembic import op

from migrations.pinned import pinned_sql

revision = "0009_recalc_queue_v2"
down_revision = "0008_min_interval"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_index
                        WHERE indexrelid = to_regclass('ix_outbox_job_compliance_property_id')
                          AND NOT indisvalid) THEN
                DROP INDEX ix_outbox_job_compliance_property_id;
            END IF;
        END
        $$;
        -- One property's jobs, newest first (the view's property_id ... ORDER BY job_id DESC).
        CREATE INDEX IF NOT EXISTS ix_outbox_job_compliance_property_id
            ON outbox_job (compliance_property_id(payload), id DESC)
            WHERE task = 'compliance.recalculate_property';
        """
    )
    op.execute(pinned_sql("views/compliance_recalc_queue_v2.sql"))


def downgrade() -> None:
    # CREATE OR REPLACE VIEW cannot drop columns: v1 is recreated from its pinned file.
    op.execute("DROP VIEW compliance_recalc_queue")
    op.execute(pinned_sql("views/compliance_recalc_queue_v1.sql"))
    op.execute("DROP INDEX ix_outbox_job_compliance_property_id")
