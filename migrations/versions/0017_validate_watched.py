"""Validates the constraints 0016 added NOT VALID, outside any transaction.

VALIDATE CONSTRAINT in a transaction of its own holds only a SHARE UPDATE EXCLUSIVE lock while
it scans, so producers and workers keep writing meanwhile. The terminal-status rule then takes
its old name back; the downgrade gives it the name 0016's downgrade drops.

Revision ID: 0017_validate_watched
Revises: 0016_watched_jobs
Create Date: 2026-12-02
"""

from alembic import op

revision = "0017_validate_watched"
down_revision = "0016_watched_jobs"
branch_labels = None
depends_on = None

CONSTRAINTS = ("ck_outbox_job_finished_iff_terminal_v2", "ck_outbox_job_watched_has_owner",
               "ck_outbox_job_result_small", "ck_outbox_job_error_small")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("SET lock_timeout = '5s'")
        for name in CONSTRAINTS:
            op.execute(f"ALTER TABLE outbox_job VALIDATE CONSTRAINT {name}")
        # The replaced rule takes its old name back (tests, docs and operators name it).
        op.execute("ALTER TABLE outbox_job RENAME CONSTRAINT ck_outbox_job_finished_iff_terminal_v2 "
                   "TO ck_outbox_job_finished_iff_terminal")
        op.execute("RESET lock_timeout")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_job RENAME CONSTRAINT ck_outbox_job_finished_iff_terminal "
               "TO ck_outbox_job_finished_iff_terminal_v2")
