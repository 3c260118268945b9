"""An index on documents.sha256: upload clean-up and the orphan-file sweep look files up by hash.

Revision ID: 0005_documents_sha256
Revises: 0004_client_tokens
Create Date: 2026-11-23
"""

from alembic import op

revision = "0005_documents_sha256"
down_revision = "0004_client_tokens"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every failed upload asks "does any row still reference this file?" under the file's lock;
    # without the index that question scans the table while the lock is held.
    op.execute("CREATE INDEX ix_documents_sha256 ON documents (sha256);")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_documents_sha256;")
