"""Client API tokens: how a client's bearer token maps to its client, stored only as a hash.

Revision ID: 0004_client_tokens
Revises: 0003_rescue
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004_client_tokens"
down_revision = "0003_rescue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        -- The secret itself is shown once, when issued; only its SHA-256 is kept, so a copy of
        -- the database does not hand out working tokens. A client may hold several tokens at
        -- once, which is what lets a secret be rotated without downtime.
        CREATE TABLE client_tokens (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id    bigint NOT NULL REFERENCES clients (id),
            token_sha256 bytea NOT NULL CHECK (length(token_sha256) = 32),
            label        text NOT NULL DEFAULT '' CHECK (length(label) <= 100),
            created_at   timestamptz NOT NULL DEFAULT now(),
            revoked_at   timestamptz,
            CONSTRAINT uq_client_tokens_sha256 UNIQUE (token_sha256),
            CONSTRAINT ck_client_tokens_revoked_after_created CHECK (revoked_at IS NULL OR revoked_at >= created_at)
        );
        CREATE INDEX ix_client_tokens_client ON client_tokens (client_id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS client_tokens;")
