"""Stored files and documents rows against real PostgreSQL: they never disagree.

"Agree" means: every documents row (deleted or not) has its file in the store, and every file
in the store has a row. Checked after successful uploads, refused ones, replays, a killed
connection, and a concurrent pair storing the same bytes. Then the AI suggestion flow reads
those files back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest

from services.ai_suggestions import apply_suggestion, suggest_for_document
from services.documents import DocumentsAdded, delete_document
from services.errors import DocumentNotFound, DuplicateRequest, InvalidInput, PropertyNotFound
from services.file_store import FileStore, StoredFileMissing
from services.uploads import (
    IncomingFile,
    InspectedFile,
    inspect_file,
    orphan_files,
    remove_orphans,
    store_and_add_documents,
)
from services.vocabulary import Actor, ActorType, TriggerReason
from tests.harness.data import cid, provision
from tests.harness.observe import connect
from tests.harness.pdf import make_pdf
from tests.harness.system import wait_until

CLIENT = Actor(ActorType.CLIENT, "client-1")
AI = Actor.system("extractor")
NO_SUCH_PROPERTY = 987654321
GAS_PDF = make_pdf(["Landlord Gas Safety Record (CP12)", "Expiry date: 30/04/2027"])


def inspected(content: bytes | str, name: str = "cert.txt") -> InspectedFile:
    raw = content.encode() if isinstance(content, str) else content
    return inspect_file(IncomingFile(name, raw))


def upload(
    conn: psycopg.Connection,
    store: FileStore,
    property_id: int,
    *files: InspectedFile,
    correlation_id: str | None = None,
    requirement_code: str = "gas_safety",
    expires_at: date | None = None,
    **options: object,
) -> DocumentsAdded:
    return store_and_add_documents(
        conn, store, property_id=property_id,
        files=[(file, requirement_code, expires_at) for file in files],
        source="client", actor=CLIENT, trigger=TriggerReason.CLIENT_UPLOAD,
        correlation_id=correlation_id or cid(), **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "files")


@pytest.fixture
def observer(database_url: str) -> Iterator[psycopg.Connection]:
    """Autocommit, so reading never leaves a transaction open on the connection under test."""
    with connect(database_url) as connection:
        yield connection


def stored(store: FileStore) -> set[str]:
    return {sha for sha, _mtime in store.stored()}


def row_hashes(observer: psycopg.Connection) -> set[str]:
    return {row[0] for row in observer.execute("SELECT sha256 FROM documents").fetchall()}


def assert_files_and_rows_agree(observer: psycopg.Connection, store: FileStore) -> None:
    assert stored(store) == row_hashes(observer)


def backend_waits_on(observer: psycopg.Connection, pid: int, *events: str) -> bool:
    row = observer.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row is not None and row[0] in events


@contextmanager
def property_lock(database_url: str, property_id: int) -> Iterator[Callable[[], None]]:
    """Holds a property's row lock (every mutation takes it first, after an upload has written
    its files) until release() or the end of the block. Enter it inside the thread pool's block,
    so a failing test releases it before the pool waits for its threads."""
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM properties WHERE id = %s FOR UPDATE", [property_id])
        try:
            yield holder.rollback
        finally:
            holder.rollback()


ROW_LOCK = ("transactionid", "tuple")
ADVISORY_LOCK = ("advisory",)


# --- success and refusal -----------------------------------------------------------------------


def test_a_successful_upload_stores_each_distinct_file_once_and_adds_a_row_for_each(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    pdf = inspected(GAS_PDF, "gas.pdf")
    text = inspected("Electrical Installation Condition Report\n", "eicr.txt")

    result = upload(conn, store, property_id, pdf, text, pdf)

    assert len(result.document_ids) == 3
    rows = observer.execute(
        "SELECT sha256, file_name, size_bytes FROM documents WHERE id = ANY(%s) ORDER BY id",
        [list(result.document_ids)],
    ).fetchall()
    assert rows == [(pdf.sha256, "gas.pdf", len(GAS_PDF)), (text.sha256, "eicr.txt", text.size_bytes),
                    (pdf.sha256, "gas.pdf", len(GAS_PDF))]
    assert store.read(pdf.sha256) == GAS_PDF
    assert stored(store) == {pdf.sha256, text.sha256}
    assert_files_and_rows_agree(observer, store)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "the upload committed"


def test_an_upload_to_a_missing_property_stores_no_file_and_adds_no_row(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    with pytest.raises(PropertyNotFound):
        upload(conn, store, NO_SUCH_PROPERTY, inspected("Gas safety record\n"))

    assert stored(store) == set()
    assert row_hashes(observer) == set()


def test_a_replayed_upload_removes_its_new_files_and_keeps_the_ones_rows_reference(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    first = inspected("Gas safety record, first\n")
    new = inspected("Gas safety record, new\n")
    correlation_id = cid()
    original = upload(conn, store, property_id, first, correlation_id=correlation_id)

    with pytest.raises(DuplicateRequest) as replay:
        upload(conn, store, property_id, first, new, correlation_id=correlation_id)

    assert replay.value.job_id == original.job_id
    assert stored(store) == {first.sha256}
    assert observer.execute("SELECT count(*) FROM documents").fetchone() == (1,)
    assert_files_and_rows_agree(observer, store)


def test_a_failed_upload_keeps_a_file_that_a_deleted_document_still_references(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    file = inspected("Gas safety record\n")
    [document_id] = upload(conn, store, property_id, file).document_ids
    delete_document(conn, document_id=document_id, actor=CLIENT, trigger=TriggerReason.CLIENT_DELETE,
                    correlation_id=cid())
    conn.commit()

    with pytest.raises(PropertyNotFound):
        upload(conn, store, NO_SUCH_PROPERTY, file)

    assert store.exists(file.sha256)
    assert_files_and_rows_agree(observer, store)


def test_an_invalid_document_is_refused_before_any_file_is_written(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)

    with pytest.raises(InvalidInput) as refused:
        upload(conn, store, property_id, inspected("Gas safety record\n"), requirement_code="boiler")

    assert refused.value.rule == "one_of"
    assert stored(store) == set()
    assert row_hashes(observer) == set()


def test_an_upload_refuses_a_connection_with_a_transaction_already_open(
    conn: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    conn.execute("SELECT 1")

    with pytest.raises(RuntimeError, match="commits its own transaction"):
        upload(conn, store, property_id, inspected("Gas safety record\n"))

    assert stored(store) == set()


# --- failures while the upload holds its files ---------------------------------------------------


def test_a_failing_upload_does_not_remove_the_file_a_concurrent_upload_of_the_same_bytes_commits(
    database_url: str, conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    """B writes the file, then fails (a replay) after A queued for the file's lock; A takes the
    lock as B rolls back, finds the file already there, and is held before its commit. B's
    clean-up must wait for A and then keep the file, which A's row now references."""
    p_a, p_b = provision(conn, n_properties=2)
    replayed = cid()
    upload(conn, store, p_b, inspected("an earlier upload\n"), correlation_id=replayed)
    shared = inspected("Landlord gas safety record, shared\n")

    with (
        psycopg.connect(database_url) as conn_a, psycopg.connect(database_url) as conn_b,
        ThreadPoolExecutor(max_workers=2) as pool,
        property_lock(database_url, p_a) as release_a, property_lock(database_url, p_b) as release_b,
    ):
        b: Future[DocumentsAdded] = pool.submit(upload, conn_b, store, p_b, shared, correlation_id=replayed)
        wait_until(lambda: backend_waits_on(observer, conn_b.info.backend_pid, *ROW_LOCK), 10, "B at the row lock")
        assert store.exists(shared.sha256), "B wrote the file before its rows"

        a: Future[DocumentsAdded] = pool.submit(upload, conn_a, store, p_a, shared)
        wait_until(lambda: backend_waits_on(observer, conn_a.info.backend_pid, *ADVISORY_LOCK), 10,
                   "A queued for the file lock")

        release_b()  # B fails: replayed correlation id
        wait_until(lambda: backend_waits_on(observer, conn_a.info.backend_pid, *ROW_LOCK), 10,
                   "A holding the file lock, held before its commit")
        wait_until(lambda: backend_waits_on(observer, conn_b.info.backend_pid, *ADVISORY_LOCK), 10,
                   "B's clean-up waiting for A's file lock")
        assert store.exists(shared.sha256), "B's clean-up must not run while A holds the file"

        release_a()  # A commits
        added = a.result(timeout=10)
        with pytest.raises(DuplicateRequest):
            b.result(timeout=10)

    assert store.read(shared.sha256) == shared.content
    assert observer.execute("SELECT property_id FROM documents WHERE id = %s", [added.document_ids[0]]).fetchone() \
        == (p_a,)
    assert_files_and_rows_agree(observer, store)


def _upload_killed_while_waiting(
    database_url: str, observer: psycopg.Connection, store: FileStore, property_id: int, file: InspectedFile,
    **options: object,
) -> BaseException:
    with (
        psycopg.connect(database_url) as victim,
        ThreadPoolExecutor(max_workers=1) as pool,
        property_lock(database_url, property_id) as release,
    ):
        pending = pool.submit(upload, victim, store, property_id, file, **options)
        wait_until(lambda: backend_waits_on(observer, victim.info.backend_pid, *ROW_LOCK), 10,
                   "the upload waiting before its commit")
        assert store.exists(file.sha256), "the file is written before the rows commit"
        observer.execute("SELECT pg_terminate_backend(%s)", [victim.info.backend_pid])
        error = pending.exception(timeout=10)
        release()
    assert error is not None
    return error


def test_an_upload_whose_connection_is_killed_removes_its_file_over_a_new_connection(
    database_url: str, conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    file = inspected("Gas safety record, killed\n")

    error = _upload_killed_while_waiting(
        database_url, observer, store, property_id, file, reconnect=lambda: psycopg.connect(database_url)
    )

    assert isinstance(error, psycopg.OperationalError)
    assert not store.exists(file.sha256)
    assert_files_and_rows_agree(observer, store)


def test_without_a_new_connection_a_killed_upload_leaves_an_orphan_that_the_sweep_removes(
    database_url: str, conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    kept = inspected("Gas safety record, kept\n")
    upload(conn, store, property_id, kept)
    orphan = inspected("Gas safety record, orphaned\n")

    error = _upload_killed_while_waiting(database_url, observer, store, property_id, orphan)

    assert isinstance(error, psycopg.OperationalError)
    assert stored(store) == {kept.sha256, orphan.sha256}, "an orphan file, never a row without its file"
    assert orphan_files(conn, store, timedelta(0)) == [orphan.sha256]
    assert remove_orphans(conn, store, timedelta(0)) == [orphan.sha256]
    assert_files_and_rows_agree(observer, store)


# --- the orphan sweep ---------------------------------------------------------------------------


def test_orphan_files_lists_only_unreferenced_files_older_than_the_threshold(
    conn: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    referenced = inspected("Gas safety record, referenced\n")
    upload(conn, store, property_id, referenced)
    old_orphan = store.write(b"old orphan")
    young_orphan = store.write(b"young orphan")
    for sha in (referenced.sha256, old_orphan):
        os.utime(store.path_of(sha), (1_000_000, 1_000_000))

    assert orphan_files(conn, store, timedelta(hours=1)) == [old_orphan]
    assert young_orphan not in orphan_files(conn, store, timedelta(hours=1))


def test_the_sweep_skips_a_file_an_upload_is_storing_right_now(
    database_url: str, conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    file = inspected("Gas safety record, in flight\n")
    with (
        psycopg.connect(database_url) as uploader,
        ThreadPoolExecutor(max_workers=1) as pool,
        property_lock(database_url, property_id) as release,
    ):
        pending = pool.submit(upload, uploader, store, property_id, file)
        wait_until(lambda: backend_waits_on(observer, uploader.info.backend_pid, *ROW_LOCK), 10,
                   "the upload holding its file before its commit")

        assert orphan_files(conn, store, timedelta(0)) == [file.sha256], "it looks like an orphan"
        assert remove_orphans(conn, store, timedelta(0)) == []
        assert store.exists(file.sha256)

        release()
        pending.result(timeout=10)
    assert_files_and_rows_agree(observer, store)


# --- AI suggestions -----------------------------------------------------------------------------


def test_a_suggestion_is_read_from_the_stored_pdf(conn: psycopg.Connection, store: FileStore) -> None:
    [property_id] = provision(conn)
    scan = inspected(GAS_PDF, "scan.pdf")
    [document_id] = upload(conn, store, property_id, scan, requirement_code="epc").document_ids

    suggestion = suggest_for_document(conn, store, document_id=document_id)

    assert (suggestion.requirement_code, suggestion.expires_at) == ("gas_safety", date(2027, 4, 30))
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_applying_a_suggestion_updates_the_document_audits_it_and_requests_a_recalculation(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    scan = inspected(GAS_PDF, "scan.pdf")
    [document_id] = upload(conn, store, property_id, scan, requirement_code="epc").document_ids
    correlation_id = cid()

    suggestion, changed = apply_suggestion(
        conn, store, document_id=document_id, actor=AI, correlation_id=correlation_id
    )
    conn.commit()

    assert suggestion.requirement_code == "gas_safety"
    assert changed.document_id == document_id
    assert observer.execute(
        "SELECT requirement_code::text, expires_at, source::text FROM documents WHERE id = %s", [document_id]
    ).fetchone() == ("gas_safety", date(2027, 4, 30), "ai")
    assert observer.execute(
        "SELECT job_id, trigger_reason FROM outbox_request WHERE correlation_id = %s", [correlation_id]
    ).fetchall() == [(changed.job_id, "ai_apply")]
    assert observer.execute(
        "SELECT count(*) FROM audit_log WHERE action = 'AI_SUGGESTION_APPLIED' AND correlation_id = %s",
        [correlation_id],
    ).fetchone() == (1,)
    assert observer.execute(
        "SELECT compliance_score_pending FROM properties WHERE id = %s", [property_id]
    ).fetchone() == (True,)


def test_a_field_the_extractor_did_not_find_keeps_its_current_value(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    no_dates = inspected("Landlord Gas Safety Record\nEngineer: A. Fitter\n")
    [document_id] = upload(
        conn, store, property_id, no_dates, requirement_code="eicr", expires_at=date(2027, 1, 1)
    ).document_ids

    suggestion, _changed = apply_suggestion(conn, store, document_id=document_id, actor=AI, correlation_id=cid())
    conn.commit()

    assert suggestion.expires_at is None
    assert observer.execute(
        "SELECT requirement_code::text, expires_at FROM documents WHERE id = %s", [document_id]
    ).fetchone() == ("gas_safety", date(2027, 1, 1))


def test_a_suggestion_with_nothing_found_is_refused_and_changes_nothing(
    conn: psycopg.Connection, observer: psycopg.Connection, store: FileStore
) -> None:
    [property_id] = provision(conn)
    [document_id] = upload(conn, store, property_id, inspected("Invoice for plumbing\n")).document_ids
    correlation_id = cid()

    with pytest.raises(InvalidInput) as refused:
        apply_suggestion(conn, store, document_id=document_id, actor=AI, correlation_id=correlation_id)
    conn.commit()

    assert (refused.value.field, refused.value.rule) == ("document", "nothing_to_apply")
    assert "no requirement keywords found" in str(refused.value)
    assert observer.execute("SELECT source::text FROM documents WHERE id = %s", [document_id]).fetchone() == ("client",)
    assert observer.execute(
        "SELECT count(*) FROM outbox_request WHERE correlation_id = %s", [correlation_id]
    ).fetchone() == (0,)


def test_a_replayed_apply_raises_duplicate_request(conn: psycopg.Connection, store: FileStore) -> None:
    [property_id] = provision(conn)
    [document_id] = upload(conn, store, property_id, inspected(GAS_PDF, "scan.pdf")).document_ids
    correlation_id = cid()
    _suggestion, first = apply_suggestion(conn, store, document_id=document_id, actor=AI, correlation_id=correlation_id)
    conn.commit()

    with pytest.raises(DuplicateRequest) as replay:
        apply_suggestion(conn, store, document_id=document_id, actor=AI, correlation_id=correlation_id)

    assert replay.value.job_id == first.job_id


def test_a_deleted_or_unknown_document_has_no_suggestion(conn: psycopg.Connection, store: FileStore) -> None:
    [property_id] = provision(conn)
    [document_id] = upload(conn, store, property_id, inspected(GAS_PDF, "scan.pdf")).document_ids
    delete_document(conn, document_id=document_id, actor=CLIENT, trigger=TriggerReason.CLIENT_DELETE,
                    correlation_id=cid())
    conn.commit()

    for missing in (document_id, 987654321):
        with pytest.raises(DocumentNotFound):
            suggest_for_document(conn, store, document_id=missing)
        with pytest.raises(DocumentNotFound):
            apply_suggestion(conn, store, document_id=missing, actor=AI, correlation_id=cid())


def test_a_document_whose_file_is_gone_raises_stored_file_missing(conn: psycopg.Connection, store: FileStore) -> None:
    [property_id] = provision(conn)
    file = inspected(GAS_PDF, "scan.pdf")
    [document_id] = upload(conn, store, property_id, file).document_ids
    store.discard(file.sha256)

    with pytest.raises(StoredFileMissing):
        suggest_for_document(conn, store, document_id=document_id)
