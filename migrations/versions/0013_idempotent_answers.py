"""Stored answers of keyed changes: a retry under the same Idempotency-Key gets the first answer.

One row per (scope, key), written in the transaction that makes the change, so the row exists
exactly when the change committed. A new table only: nothing that runs today is locked or
rewritten, and a release that does not know the table keeps working beside it.

Revision ID: 0013_idempotent_answers
Revises: 0012_mode_indexes
Create Date: 2026-12-02
"""

from alembic import op

revision = "0013_idempotent_answers"
down_revision = "0012_mode_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE idempotent_answer (
            -- Whose key it is: the caller ("client:7", "admin:key:..."); a key is the caller's,
            -- across every route.
            scope text NOT NULL CONSTRAINT ck_idempotent_answer_scope CHECK (scope <> ''),
            key text NOT NULL
                CONSTRAINT ck_idempotent_answer_key CHECK (key ~ '^[\\x21-\\x7e]{1,128}$'),
            -- sha256 (hex) of the request's method, path and every value it sent: the same key
            -- with anything else is another request, refused rather than answered.
            fingerprint text NOT NULL CONSTRAINT ck_idempotent_answer_fingerprint CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
            method text NOT NULL,
            path text NOT NULL,
            -- What a retry is answered with (secrets removed), whatever happened since.
            body jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (scope, key)
        );
        CREATE INDEX ix_idempotent_answer_created_at ON idempotent_answer (created_at);
        COMMENT ON TABLE idempotent_answer IS
            'The first answer of each keyed change, committed with it; pruned after the retention';
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE idempotent_answer")
