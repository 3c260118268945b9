"""A recalculation that dies announces it, for the web page's live "Updating…".

"Update failed" is the property's pending flag together with its latest job being DEAD; the
job's death touches no column of `properties`, so 0019's trigger does not hear it and a page
showing "Updating…" would wait for ever. This trigger, on the job row, sends the same
notification (the client's id) when a recalculation becomes DEAD.

Revision ID: 0021_recalculation_died_notify
Revises: 0020_evaluations
Create Date: 2026-12-03
"""

from alembic import op

from migrations.pinned import pinned_sql

revision = "0021_recalculation_died_notify"
down_revision = "0020_evaluations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(pinned_sql("functions/compliance_v3.sql"))
    op.execute(
        """
        CREATE TRIGGER tr_outbox_job_recalculation_died
            AFTER UPDATE OF status ON outbox_job
            FOR EACH ROW
            WHEN (NEW.status = 'dead' AND OLD.status IS DISTINCT FROM NEW.status
                  AND NEW.task = 'compliance.recalculate_property')
            EXECUTE FUNCTION compliance_recalculation_died();
        """
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP TRIGGER tr_outbox_job_recalculation_died ON outbox_job; "
               "DROP FUNCTION compliance_recalculation_died();")
