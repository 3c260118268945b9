"""The keys that sign stream tokens, shared by every API process.

A browser's EventSource sends no headers, so a job's stream URL carries a signed token. Every
API process must verify a token any other one signed, and a key must be replaceable without
cutting open streams: the keys live here, each with an id the token names, the newest active
one signs, and a retired key stops verifying once `retired_at` has passed.

Revision ID: 0018_signing_keys
Revises: 0017_validate_watched
Create Date: 2026-12-02
"""

from alembic import op

revision = "0018_signing_keys"
down_revision = "0017_validate_watched"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_signing_key (
            kid        text PRIMARY KEY CONSTRAINT ck_api_signing_key_kid CHECK (kid ~ '^[A-Za-z0-9_-]{4,32}$'),
            secret     bytea NOT NULL CONSTRAINT ck_api_signing_key_secret CHECK (octet_length(secret) >= 32),
            created_at timestamptz NOT NULL DEFAULT now(),
            -- Tokens signed with it stop verifying after this (NULL: still active).
            retired_at timestamptz
        );
        COMMENT ON TABLE api_signing_key IS 'Keys of signed stream tokens; the newest active one signs';
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE api_signing_key")
