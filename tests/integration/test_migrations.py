"""The Alembic history: it builds the schema from nothing, takes it all away again, and
rebuilds the same schema, so a rollback of a release leaves no recalq object behind."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from alembic.script import ScriptDirectory

import migrations
from recalq import migrate
from recalq.settings import Settings
from services.vocabulary import RECALCULATE_TASK
from tests.harness.data import provision, upload
from tests.harness.databases import DatabaseFactory

OUTBOX_ONLY = "0001_outbox"
COMPLIANCE = "0002_compliance"
ENQUEUE_V2 = "0007_enqueue_v2"
MIN_INTERVAL = "0008_min_interval"
NEWEST_FIRST_INDEX = "ix_outbox_job_compliance_property_id"

#: Every object recalq owns in the public schema, with its definition: tables with their
#: columns, constraints and indexes, types, functions and views. Alembic's own bookkeeping
#: table is not recalq's and stays after a downgrade.
SCHEMA_SQL = """
SELECT 'relation ' || c.relname || ' ' || c.relkind::text, coalesce(pg_get_viewdef(c.oid), '')
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relname NOT LIKE 'alembic_version%%'
UNION ALL
SELECT 'column ' || a.attrelid::regclass || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull || ' '
       || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid AND c.relkind IN ('r', 'v')
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'public'::regnamespace AND c.relname <> 'alembic_version'
   AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
  FROM pg_constraint
 WHERE connamespace = 'public'::regnamespace AND conname NOT LIKE 'alembic_version%%'
UNION ALL
SELECT 'index ' || indexrelid::regclass, pg_get_indexdef(indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
 WHERE c.relnamespace = 'public'::regnamespace AND c.relname <> 'alembic_version'
UNION ALL
SELECT 'type ' || typname || ' ' || typtype::text,
       coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = t.oid), '')
  FROM pg_type t
 WHERE typnamespace = 'public'::regnamespace AND typname NOT LIKE '%%alembic_version'
UNION ALL
SELECT 'function ' || p.oid::regprocedure, pg_get_functiondef(p.oid)
  FROM pg_proc p
 WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'extension ' || extname, extversion FROM pg_extension WHERE extname <> 'plpgsql'
ORDER BY 1
"""


def schema(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return dict(conn.execute(SCHEMA_SQL).fetchall())


def below_0015(found: dict[str, str]) -> dict[str, str]:
    """A schema as a revision older than 0015 sees it. PostgreSQL cannot drop an enum value, so
    a downgrade past 0015 keeps `cancelled` in outbox_job_status (no row can hold it once 0016 is
    undone, and re-upgrading is a no-op): the one difference a downgrade may leave, and only that."""
    key = "type outbox_job_status e"
    return {**found, key: found[key].replace(",cancelled", "")} if key in found else found


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config("postgresql+psycopg://unused/unused"))


HEAD = script_directory().get_current_head()


def alembic_revision(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [version for (version,) in conn.execute("SELECT version_num FROM alembic_version")]


def names(objects: dict[str, str], kind: str) -> set[str]:
    return {name.split(" ")[1] for name in objects if name.startswith(f"{kind} ")}


def test_the_migration_history_has_exactly_one_head_and_one_base_on_a_single_line() -> None:
    script = script_directory()

    assert len(script.get_heads()) == 1
    assert script.get_bases() == [OUTBOX_ONLY]
    revisions = list(script.walk_revisions("base", "heads"))
    assert all(len(r.nextrev) <= 1 and not isinstance(r.down_revision, tuple) for r in revisions), "no branch or merge"
    chain = [revision.revision for revision in revisions]
    assert chain[-2:] == [COMPLIANCE, OUTBOX_ONLY]
    files = sorted(p.stem for p in (Path(migrations.__file__).parent / "versions").glob("*.py"))
    assert sorted(chain) == files, "every revision file must be on the one line of history"


def test_an_empty_database_upgrades_to_head_downgrades_to_nothing_and_upgrades_to_the_same_schema(
    db_factory: DatabaseFactory,
) -> None:
    url = db_factory.create_empty()
    settings = Settings(database_url=url)
    try:
        assert schema(url) == {}

        migrate.upgrade(settings)
        first = schema(url)
        assert alembic_revision(url) == [HEAD]
        assert {"outbox_job", "outbox_request", "outbox_task", "properties", "documents", "audit_log"} <= names(
            first, "relation"
        )
        assert {"compliance_recalc_queue", "outbox_queue_state"} <= names(first, "relation")
        assert {"outbox_job_status", "document_status", "compliance_requirement"} <= names(first, "type")
        assert {
            "outbox_enqueue(text,text,jsonb,text,text,text,text,integer)",
            "outbox_start(bigint,boolean,interval,integer)",
            "outbox_complete(bigint,integer)",
            "outbox_fail(bigint,integer,text,boolean,interval)",
            "outbox_requeue(bigint)",
            "compliance_request_recalculation(bigint,text,text,text,text,integer,boolean)",
            "compliance_property_id(jsonb)",
        } <= names(first, "function")

        migrate.downgrade(settings, "base")
        assert schema(url) == {}, "a downgrade to base must leave no recalq object"
        assert alembic_revision(url) == []

        migrate.upgrade(settings)
        assert schema(url) == first
        assert alembic_revision(url) == [HEAD]
        with psycopg.connect(url) as conn:
            [property_id] = provision(conn)
            assert upload(conn, property_id) > 0
    finally:
        db_factory.drop(url)


def test_downgrading_the_compliance_revision_leaves_a_working_generic_outbox(db_factory: DatabaseFactory) -> None:
    url = db_factory.create_empty()
    settings = Settings(database_url=url)
    try:
        migrate.upgrade(settings)
        head = schema(url)
        migrate.downgrade(settings, OUTBOX_ONLY)
        outbox_only = schema(url)

        assert alembic_revision(url) == [OUTBOX_ONLY]
        assert names(outbox_only, "relation") >= {"outbox_job", "outbox_request", "outbox_task", "outbox_queue_state"}
        assert not any(
            word in name
            for name in outbox_only
            for word in ("compliance", "propert", "document", "audit", "client", "score_history")
        ), sorted(outbox_only)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM outbox_task").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
                conn.execute("SELECT outbox_enqueue('x.y', 'k', '{}', 'c', 'r', 'a', NULL)")
            assert refused.value.diag.message_hint == "known tasks: (none registered)"

        migrate.upgrade(settings)
        assert schema(url) == head
    finally:
        db_factory.drop(url)


def test_a_database_full_of_jobs_and_domain_data_still_downgrades_to_nothing(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        first, second = provision(conn, n_properties=2)
        upload(conn, first)
        job_id = conn.execute("SELECT min(id) FROM outbox_job").fetchone()[0]
        conn.execute("SELECT outbox_start(%s, false, interval '1 minute')", [job_id])
        conn.commit()
        upload(conn, first)  # a waiting job behind a running one
        upload(conn, second)
        assert conn.execute("SELECT count(*) FROM outbox_job").fetchone()[0] >= 3

    migrate.downgrade(Settings(database_url=database_url), "base")

    assert schema(database_url) == {}
    assert alembic_revision(database_url) == []


def test_downgrading_the_min_interval_revision_restores_outbox_v2_and_drops_the_column(
    db_factory: DatabaseFactory,
) -> None:
    v2 = db_factory.create_empty()
    url = db_factory.create_empty()
    try:
        migrate.upgrade(Settings(database_url=v2), ENQUEUE_V2)
        settings = Settings(database_url=url, recalc_min_interval_seconds=3)
        migrate.upgrade(settings)
        head = schema(url)
        assert "column outbox_task.min_interval" in head
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT min_interval FROM outbox_task WHERE name = %s",
                                [RECALCULATE_TASK]).fetchone() == (timedelta(seconds=3),)

        migrate.downgrade(settings, ENQUEUE_V2)
        assert alembic_revision(url) == [ENQUEUE_V2]
        assert below_0015(schema(url)) == schema(v2), "the downgrade leaves exactly what 0007 built"
        with psycopg.connect(url) as conn:
            [property_id] = provision(conn)
            assert upload(conn, property_id) > 0

        migrate.upgrade(settings)
        assert schema(url) == head
    finally:
        db_factory.drop(v2)
        db_factory.drop(url)


def test_downgrading_the_queue_view_v2_revision_restores_view_v1_and_drops_its_index(
    db_factory: DatabaseFactory,
) -> None:
    v1 = db_factory.create_empty()
    url = db_factory.create_empty()
    try:
        migrate.upgrade(Settings(database_url=v1), MIN_INTERVAL)
        settings = Settings(database_url=url)
        migrate.upgrade(settings)
        head = schema(url)
        assert f"index {NEWEST_FIRST_INDEX}" in head
        assert "column compliance_recalc_queue.job_id" in head
        with psycopg.connect(url) as conn:
            [property_id] = provision(conn)
            upload(conn, property_id)

        migrate.downgrade(settings, MIN_INTERVAL)
        assert alembic_revision(url) == [MIN_INTERVAL]
        assert below_0015(schema(url)) == schema(v1), "the downgrade leaves exactly what 0008 built"
        with psycopg.connect(url) as conn:
            assert conn.execute(
                "SELECT count(*) FROM compliance_recalc_queue WHERE property_id = %s", [property_id]
            ).fetchone()[0] >= 2

        migrate.upgrade(settings)
        assert schema(url) == head
    finally:
        db_factory.drop(v1)
        db_factory.drop(url)


def test_the_queue_view_v2_revision_keeps_an_index_built_concurrently_beforehand_and_rebuilds_an_invalid_one(
    db_factory: DatabaseFactory,
) -> None:
    url = db_factory.create_empty()
    settings = Settings(database_url=url)
    definition = (
        "ON outbox_job (compliance_property_id(payload), id DESC) WHERE task = 'compliance.recalculate_property'"
    )
    index_oid = "SELECT indexrelid::oid, indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)"
    try:
        migrate.upgrade(settings, MIN_INTERVAL)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE INDEX CONCURRENTLY {NEWEST_FIRST_INDEX} {definition}")
            [(prebuilt, _)] = conn.execute(index_oid, [NEWEST_FIRST_INDEX]).fetchall()
        migrate.upgrade(settings)
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute(index_oid, [NEWEST_FIRST_INDEX]).fetchall() == [(prebuilt, True)], "kept, not rebuilt"

        migrate.downgrade(settings, MIN_INTERVAL)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE INDEX CONCURRENTLY {NEWEST_FIRST_INDEX} {definition}")
            # What a concurrent build that failed (cancelled, deadlocked) leaves behind.
            conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)",
                         [NEWEST_FIRST_INDEX])
            [(invalid, valid)] = conn.execute(index_oid, [NEWEST_FIRST_INDEX]).fetchall()
            assert not valid
        migrate.upgrade(settings)
        with psycopg.connect(url, autocommit=True) as conn:
            [(rebuilt, valid)] = conn.execute(index_oid, [NEWEST_FIRST_INDEX]).fetchall()
            assert valid and rebuilt != invalid
    finally:
        db_factory.drop(url)
