"""Properties announce score changes, for the web page's live "Updating…".

A page that shows a property being recomputed keeps one stream open; the API process serving
it listens once (PostgreSQL LISTEN) and needs to hear when a property's score or pending flag
changes. The trigger fires only when those columns change, and the notification carries the
client id alone.

Revision ID: 0019_property_notify
Revises: 0018_signing_keys
Create Date: 2026-12-03
"""

from alembic import op

from migrations.pinned import pinned_sql

revision = "0019_property_notify"
down_revision = "0018_signing_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(pinned_sql("functions/compliance_v2.sql"))
    op.execute(
        """
        CREATE TRIGGER tr_properties_changed
            AFTER UPDATE OF compliance_score, generation, scored_generation ON properties
            FOR EACH ROW
            WHEN (OLD.compliance_score IS DISTINCT FROM NEW.compliance_score
                  OR OLD.compliance_score_pending IS DISTINCT FROM NEW.compliance_score_pending)
            EXECUTE FUNCTION compliance_property_changed();
        """
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP TRIGGER tr_properties_changed ON properties; DROP FUNCTION compliance_property_changed();")
