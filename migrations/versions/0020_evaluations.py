"""Property evaluations: their snapshots, and their task's policy row.

An evaluation is a watched job of a dozen slow external look-ups. What it finds outlives the
job (which is pruned like any other): `property_evaluations` keeps one snapshot per finished
evaluation, written in the job's last unit together with its completion, so the snapshot
exists exactly when the job is done. No foreign key points at outbox_job (pruning must not be
blocked); `job_id` is unique, so a takeover that reaches the last unit twice keeps one snapshot.

The task runs on its own Celery queue (`evaluations`), so evaluations never hold the workers
recalculations need; one active evaluation per client and property or address (unique_active);
a running one may be cancelled; heartbeats keep its lease alive across slow stages.

Revision ID: 0020_evaluations
Revises: 0019_property_notify
Create Date: 2026-12-03
"""

import json

from alembic import op

revision = "0020_evaluations"
down_revision = "0019_property_notify"
branch_labels = None
depends_on = None

#: The stages as this revision registers them (services/evaluations.py declares the same keys;
#: a test holds the two together).
STAGES = [
    {"key": "locate_address", "display": "Locating the address"},
    {"key": "energy_register", "display": "Checking the energy performance register"},
    {"key": "gas_register", "display": "Checking the gas safety register"},
    {"key": "electrical_register", "display": "Checking electrical safety records"},
    {"key": "flood_risk", "display": "Assessing flood risk"},
    {"key": "licensing", "display": "Checking landlord licensing"},
    {"key": "planning", "display": "Checking planning and building control"},
    {"key": "council_tax", "display": "Looking up the council tax band"},
    {"key": "broadband", "display": "Checking broadband coverage"},
    {"key": "radon", "display": "Checking the radon map"},
    {"key": "crime", "display": "Reviewing local crime figures"},
    {"key": "saving_results", "display": "Saving your results"},
]


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        """
        CREATE TABLE property_evaluations (
            id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            client_id   bigint NOT NULL REFERENCES clients (id),
            -- NULL: an address not yet onboarded as a property.
            property_id bigint REFERENCES properties (id),
            address     text NOT NULL CONSTRAINT ck_property_evaluations_address
                            CHECK (length(btrim(address)) BETWEEN 1 AND 300),
            job_id      bigint NOT NULL CONSTRAINT ux_property_evaluations_job UNIQUE,
            -- stage key -> what its provider answered
            answers     jsonb NOT NULL CONSTRAINT ck_property_evaluations_answers
                            CHECK (jsonb_typeof(answers) = 'object'),
            summary     jsonb NOT NULL DEFAULT '{}'::jsonb,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ix_property_evaluations_client ON property_evaluations (client_id, id DESC);
        COMMENT ON TABLE property_evaluations IS 'What each finished evaluation found; outlives its job';
        """
    )
    op.get_bind().exec_driver_sql(
        """
        INSERT INTO outbox_task (name, description, watched, stages, mode, cancellable, queue, lease_seconds,
                                 time_limit_seconds, soft_time_limit_seconds, heartbeats, max_attempts)
        VALUES ('evaluation.evaluate_property', 'a property evaluation: a dozen external look-ups', true,
                %(stages)s::jsonb, 'unique_active', true, 'evaluations', 60, 900, 840, true, 3)
        """,
        {"stages": json.dumps(STAGES)},
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DELETE FROM outbox_task WHERE name = 'evaluation.evaluate_property'")
    op.execute("DROP TABLE property_evaluations")
