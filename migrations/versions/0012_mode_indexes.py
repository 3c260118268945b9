"""The unique indexes of the coalescing modes, built CONCURRENTLY, and the validation of 0011's
constraint on outbox_job, without blocking writes.

G3's two indexes (one waiting and one running job per key) now cover coalescing jobs only, so a
task of mode `none` may have many jobs per key; a third, over the active statuses, is the lock of
a `unique_active` task. Each index is built beside the one it replaces, which keeps enforcing the
rule until the new one is valid, and then takes its name (tests, docs and operators name them).

Nothing here runs in a transaction (alembic's autocommit_block): CREATE/DROP INDEX CONCURRENTLY
cannot, and VALIDATE CONSTRAINT in a transaction of its own holds only a SHARE UPDATE EXCLUSIVE
lock while it scans, which lets producers and workers write meanwhile (in 0011's transaction it
would have kept the ACCESS EXCLUSIVE lock of ADD CONSTRAINT for the whole scan). A build that
failed half-way leaves an invalid index; running the revision again drops it and builds it anew.
Locks wait at most lock_timeout, so a step never queues the whole queue behind a long
transaction; if one times out, run the upgrade again.

Revision ID: 0012_mode_indexes
Revises: 0011_task_policy
Create Date: 2026-12-02
"""

from alembic import op

revision = "0012_mode_indexes"
down_revision = "0011_task_policy"
branch_labels = None
depends_on = None

WAITING = "status IN ('pending', 'published', 'retrying')"
ACTIVE = "status IN ('pending', 'published', 'running', 'retrying')"

#: name -> (predicate after this revision, predicate before it; None: the index is new)
INDEXES = {
    "ux_outbox_job_waiting_key": (f"mode = 'coalesce' AND {WAITING}", WAITING),
    "ux_outbox_job_running_key": ("mode = 'coalesce' AND status = 'running'", "status = 'running'"),
    "ux_outbox_job_active_key": (f"mode = 'unique_active' AND {ACTIVE}", None),
}


def _drop_invalid(name: str) -> None:
    """A concurrent build that failed leaves an invalid index behind; a DO block cannot drop it
    (DROP INDEX CONCURRENTLY is refused in a transaction), so it is looked up first."""
    conn = op.get_bind()
    invalid = conn.exec_driver_sql(
        "SELECT 1 FROM pg_index WHERE indexrelid = to_regclass(%(name)s) AND NOT indisvalid", {"name": name}
    ).fetchone()
    if invalid:
        op.execute(f"DROP INDEX CONCURRENTLY {name}")


def _replace_index(name: str, predicate: str | None) -> None:
    """Builds `name` over `predicate` beside the index of that name (if any), then swaps them."""
    staged = f"{name}_next"
    _drop_invalid(staged)
    if predicate is None:
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        return
    op.execute(f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {staged} ON outbox_job (coalescing_key) WHERE {predicate}")
    op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(f"ALTER INDEX {staged} RENAME TO {name}")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("SET lock_timeout = '5s'")
        for name, (new, _old) in INDEXES.items():
            _replace_index(name, new)
        op.execute("ALTER TABLE outbox_job VALIDATE CONSTRAINT ck_outbox_job_superseded_only_coalesced")
        op.execute("RESET lock_timeout")


def downgrade() -> None:
    """Back to what 0011 built. Refused (an index does not build) while a key has two jobs a
    coalescing index of 0010 forbids, i.e. while a job of a non-coalescing task exists."""
    with op.get_context().autocommit_block():
        op.execute("SET lock_timeout = '5s'")
        for name, (_new, old) in INDEXES.items():
            _replace_index(name, old)
        op.execute("RESET lock_timeout")
