"""The extractor's suggestion for each stored file, computed once.

A file's bytes never change (it is stored under its hash) and the extractor is deterministic,
so (sha256, extractor_version) names one answer forever: a document's suggestion is read, not
recomputed, on every call after the first. A new extractor version computes afresh. A new
table only; nothing running today is locked or rewritten.

Revision ID: 0014_suggestion_cache
Revises: 0013_idempotent_answers
Create Date: 2026-12-02
"""

from alembic import op

revision = "0014_suggestion_cache"
down_revision = "0013_idempotent_answers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE document_suggestion (
            sha256 text NOT NULL CONSTRAINT ck_document_suggestion_sha256 CHECK (sha256 ~ '^[0-9a-f]{64}$'),
            extractor_version text NOT NULL CONSTRAINT ck_document_suggestion_version CHECK (extractor_version <> ''),
            suggestion jsonb NOT NULL,
            computed_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sha256, extractor_version)
        );
        COMMENT ON TABLE document_suggestion IS
            'What the extractor read in each stored file, per extractor version (a cache: safe to empty)';
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE document_suggestion")
