"""Uploaded document files: what we accept, how archives are unpacked, how files are stored.

Three rules run through this module:

- Content decides. A file is a PDF because its bytes open as one, or plain text because they
  decode as UTF-8; its name and declared type may only agree with that, never overrule it.
- An archive is hostile until read. Limits are enforced on the bytes actually inflated (a
  stream is read at most one byte past its limit), never on the sizes its headers claim; any
  unsafe entry refuses the whole archive, so a refused upload stores nothing.
- Files and rows never disagree. A file is written under an advisory lock on its hash that is
  held until the documents rows commit; on any failure the rows roll back and, under the same
  lock, every file no row references is removed (see `store_and_add_documents`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import lzma
import mimetypes
import re
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from functools import cache

import psycopg
from psycopg.pq import TransactionStatus
from pypdf import PasswordType, PdfReader

from services.display_text import unsafe_characters
from services.documents import MAX_DOCUMENTS_PER_REQUEST, DocumentsAdded, NewDocument, add_documents
from services.errors import InvalidInput, PayloadTooLarge, UnsupportedContent
from services.file_store import FileStore
from services.queries import QUERIES
from services.scoring import REQUIREMENTS, DocumentStatus
from services.vocabulary import Actor, TriggerReason

log = logging.getLogger(__name__)


MiB = 1 << 20


class FileKind(StrEnum):
    PDF = "application/pdf"
    TEXT = "text/plain"


ACCEPTED_TYPES: tuple[str, ...] = tuple(kind.value for kind in FileKind)
ZIP_TYPE = "application/zip"


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 10 * MiB
    max_files: int = MAX_DOCUMENTS_PER_REQUEST
    #: The archive as uploaded (compressed).
    max_zip_bytes: int = 50 * MiB
    #: Files in an archive, not counting directories and the entries we ignore.
    max_zip_entries: int = MAX_DOCUMENTS_PER_REQUEST
    max_zip_total_uncompressed: int = 100 * MiB
    #: Inflated bytes per compressed byte, for an entry and for the whole archive.
    max_zip_ratio: int = 100
    #: Below this many inflated bytes a ratio is not judged: small text compresses very well
    #: and inflating it costs nothing.
    zip_ratio_floor_bytes: int = 1 * MiB
    #: Central-directory records of any kind (macOS adds one `__MACOSX/._x` per file). Counted
    #: before zipfile parses the directory, which costs memory per record.
    max_zip_records: int = 1000


@dataclass(frozen=True)
class IncomingFile:
    file_name: str
    content: bytes
    declared_type: str | None = None


@dataclass(frozen=True)
class InspectedFile:
    file_name: str
    content: bytes
    kind: FileKind
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class ZipEntry:
    """One file of an archive, already inspected.

    file_name is the entry's base name (what a documents row records); path is the entry's full
    path in the archive (what error messages name); requirement_code comes from that path.
    """

    file_name: str
    content: bytes
    requirement_code: str
    path: str
    inspected: InspectedFile


# ---------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------

#: Bidirectional-text controls make "evil\u202efdp.exe" display as "evilexe.pdf".
_NO_TYPE_CLAIM = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_TYPE_ALIASES = {"application/x-pdf": FileKind.PDF.value, "application/acrobat": FileKind.PDF.value}
#: Text that a browser would render as a page, not show as text.
_MARKUP = re.compile(rb"^\s*<(?:!doctype|html|\?xml|svg|script|head|body|iframe)\b", re.IGNORECASE)


def clean_file_name(raw: str, *, field: str = "file_name") -> str:
    """The name we record: directories stripped (both separators), surrounding blanks trimmed,
    1 to 255 characters, no control or bidirectional-override characters."""
    if not isinstance(raw, str):
        raise InvalidInput("file name must be text", field=field, rule="text")
    if _has_control_characters(raw):
        raise InvalidInput(
            f"file name {raw!r} contains control characters", field=field, rule="no_control_characters"
        )
    name = re.split(r"[\\/]", raw)[-1].strip()
    if name in {".", ".."}:
        raise InvalidInput(f"file name {raw!r} names a directory, not a file", field=field, rule="length_1_255")
    if not 1 <= len(name) <= 255:
        raise InvalidInput(
            f"file name must be 1 to 255 characters once directories are stripped; got {len(name)}",
            field=field, rule="length_1_255",
        )
    return name


def sniff_kind(content: bytes) -> FileKind | None:
    """What the bytes look like, by their first bytes and encoding only (no parsing)."""
    if content.startswith(b"%PDF-"):
        return FileKind.PDF
    if b"\x00" in content:
        return None
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return FileKind.TEXT


def inspect_file(incoming: IncomingFile, limits: UploadLimits | None = None, *, field: str = "file") -> InspectedFile:
    """Accepts a PDF that opens and has pages, or UTF-8 text without NUL bytes; refuses
    everything else, and a name or declared type that contradicts the content.

    field: the request field the content came in (a single upload's "file", a bulk upload's
    "files"), named in every refusal except the file name's own ("file_name").
    """
    limits = limits or UploadLimits()
    name = clean_file_name(incoming.file_name)
    content = incoming.content
    if not content:
        raise InvalidInput(f"{name!r} is empty", field=field, rule="not_empty")
    if len(content) > limits.max_file_bytes:
        raise PayloadTooLarge(
            f"{name!r} is {len(content)} bytes; at most {limits.max_file_bytes} bytes per file",
            field=field, rule="max_size",
        )
    kind = sniff_kind(content)
    if kind is None:
        raise UnsupportedContent(
            f"{name!r} is neither a PDF nor UTF-8 text", field=field, rule="content_type", valid_values=ACCEPTED_TYPES
        )
    if kind is FileKind.PDF:
        _check_pdf_opens(name, content, field)
    elif _MARKUP.match(content.removeprefix(b"\xef\xbb\xbf")):
        raise UnsupportedContent(
            f"{name!r} is markup (HTML, XML or SVG), not plain text",
            field=field, rule="content_type", valid_values=ACCEPTED_TYPES,
        )
    _check_claims_agree(name, incoming.declared_type, kind, field)
    return InspectedFile(
        file_name=name, content=content, kind=kind,
        sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content),
    )


def _check_pdf_opens(name: str, content: bytes, field: str) -> None:
    def refuse(why: str, rule: str = "content_type") -> UnsupportedContent:
        return UnsupportedContent(f"{name!r} starts like a PDF but {why}", field=field, rule=rule,
                                  valid_values=ACCEPTED_TYPES)

    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise refuse("is protected by a password", rule="pdf_password")
        pages = len(reader.pages)
    except UnsupportedContent:
        raise
    except Exception as error:
        # pypdf answers hostile bytes with many exception types (its own, ValueError,
        # KeyError, RecursionError...); any of them means "not a PDF we can read".
        raise refuse(f"does not open as one ({type(error).__name__}: {error})") from None
    if pages < 1:
        raise refuse("has no pages")


def _check_claims_agree(name: str, declared_type: str | None, kind: FileKind, field: str) -> None:
    declared = (declared_type or "").split(";", 1)[0].strip().lower()
    if declared not in _NO_TYPE_CLAIM and _TYPE_ALIASES.get(declared, declared) != kind.value:
        raise UnsupportedContent(
            f"{name!r} was declared {declared} but its content is {kind.value}",
            field=field, rule="declared_type_matches_content", valid_values=ACCEPTED_TYPES,
        )
    by_name = _name_types().guess_type(name, strict=True)[0]
    if by_name is not None and _TYPE_ALIASES.get(by_name, by_name) != kind.value:
        raise UnsupportedContent(
            f"{name!r}: the name says {by_name} but the content is {kind.value}",
            field=field, rule="name_matches_content", valid_values=ACCEPTED_TYPES,
        )


@cache
def _name_types() -> mimetypes.MimeTypes:
    """Python's built-in extension table only, not the host's /etc/mime.types, so the same
    name gets the same answer on every machine."""
    return mimetypes.MimeTypes()


def _has_control_characters(text: str) -> bool:
    return bool(unsafe_characters(text))


# ---------------------------------------------------------------------------------------------
# Zip archives
# ---------------------------------------------------------------------------------------------

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_CENTRAL_RECORD = b"PK\x01\x02"
_READABLE_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
_FLAG_ENCRYPTED = 0x1
_FLAG_STRONG_ENCRYPTION = 0x40
_DRIVE = re.compile(r"^[A-Za-z]:")
_READ_CHUNK = 64 * 1024
#: What a corrupt entry raises while inflating, by decompressor.
_INFLATE_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError, struct.error)
_ARCHIVE_MAGIC = (
    (0, b"PK\x03\x04"), (0, b"PK\x05\x06"), (0, b"PK\x07\x08"),  # zip
    (0, b"\x1f\x8b"),  # gzip
    (0, b"7z\xbc\xaf\x27\x1c"),
    (0, b"Rar!\x1a\x07"),
    (0, b"\xfd7zXZ\x00"),  # xz
    (257, b"ustar"),  # tar
)
_BZIP2 = re.compile(rb"^BZh[1-9]1AY&SY")


def unpack_zip(content: bytes, limits: UploadLimits | None = None, *, field: str = "file") -> list[ZipEntry]:
    """The archive's files, each inspected like a single upload, in archive order.

    Each file's requirement comes from its path: a directory named after a requirement code
    (`gas_safety/cert.pdf`, the first such directory from the top), else a file name that
    starts with one (`eicr_2026.pdf`, `epc-cert.pdf`; `-` and spaces read as `_`).
    Directories, `__MACOSX/` and dot-files are skipped. Anything unsafe anywhere in the archive
    refuses all of it.
    """
    limits = limits or UploadLimits()
    if not content:
        raise InvalidInput("the archive is empty", field=field, rule="not_empty")
    if len(content) > limits.max_zip_bytes:
        raise PayloadTooLarge(
            f"the archive is {len(content)} bytes; at most {limits.max_zip_bytes}", field=field, rule="max_size"
        )
    if not content.startswith(_ZIP_MAGIC):
        raise UnsupportedContent("the upload is not a zip archive", field=field, rule="content_type",
                                 valid_values=(ZIP_TYPE,))
    # Every record zipfile parses starts with this signature, so this bounds its work and memory.
    if (records := content.count(_CENTRAL_RECORD)) > limits.max_zip_records:
        raise InvalidInput(
            f"the archive has up to {records} directory records; at most {limits.max_zip_records}",
            field=field, rule="max_items",
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, NotImplementedError, *_INFLATE_ERRORS) as error:
        raise UnsupportedContent(f"the zip archive is corrupt ({error})", field=field, rule="zip_corrupt",
                                 valid_values=(ZIP_TYPE,)) from None
    with archive:
        wanted: list[tuple[zipfile.ZipInfo, str, list[str]]] = []
        for info in archive.infolist():
            path, parts = _safe_entry_path(info, field)
            if not (info.is_dir() or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)):
                wanted.append((info, path, parts))
        _check_entry_list(wanted, limits, field)
        planned = [(info, path, parts, requirement_from_path(path, field=field)) for info, path, parts in wanted]
        entries = []
        inflated = 0
        for info, path, parts, requirement in planned:
            data = _read_entry(archive, info, path, limits, inflated, len(content), field)
            inflated += len(data)
            entries.append(_inspect_entry(path, parts[-1], data, requirement, limits, field))
    return entries


def requirement_from_path(path: str, *, field: str = "file") -> str:
    """The requirement code an archive path names (see `unpack_zip`)."""
    parts = path.split("/")
    for directory in parts[:-1]:
        if (code := _normalise(directory)) in REQUIREMENTS:
            return code
    stem = _normalise(parts[-1])
    for code in REQUIREMENTS:
        if stem == code or (stem.startswith(code) and stem[len(code)] in "_."):
            return code
    raise InvalidInput(
        f"zip entry {path!r}: cannot tell its requirement; put it in a folder named after one "
        f"(gas_safety/cert.pdf) or start its name with one (eicr_2026.pdf)",
        field=field, rule="requirement_from_path", valid_values=REQUIREMENTS,
    )


def _normalise(name: str) -> str:
    return re.sub(r"[-\s]", "_", name.strip().lower())


def _safe_entry_path(info: zipfile.ZipInfo, field: str) -> tuple[str, list[str]]:
    # orig_filename: zipfile cuts `filename` at a NUL, which would hide "cert.pdf\0.exe".
    path = info.orig_filename

    def unsafe(why: str) -> InvalidInput:
        return InvalidInput(f"zip entry {path!r} {why}", field=field, rule="safe_path")

    if _has_control_characters(path):
        raise unsafe("has control characters in its path")
    if "\\" in path:
        raise unsafe("has a backslash in its path")
    if path.startswith("/") or _DRIVE.match(path):
        raise unsafe("has an absolute path")
    parts = path.split("/")
    if info.is_dir():
        parts = parts[:-1]
    if not parts or any(part in {"", ".", ".."} for part in parts):
        raise unsafe("has an empty, '.' or '..' path component")
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise unsafe("is a symbolic link")
    if file_type not in {0, stat.S_IFREG, stat.S_IFDIR}:
        raise unsafe("is not a regular file")
    if info.flag_bits & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION):
        raise UnsupportedContent(f"zip entry {path!r} is encrypted", field=field, rule="not_encrypted",
                                 valid_values=ACCEPTED_TYPES)
    return path, parts


def _check_entry_list(
    wanted: list[tuple[zipfile.ZipInfo, str, list[str]]], limits: UploadLimits, field: str
) -> None:
    """Refusals decided from the directory alone, before any byte is inflated. Header sizes
    may refuse an archive here; they never accept one (reading enforces the limits)."""
    if not wanted:
        raise InvalidInput("the archive contains no files", field=field, rule="not_empty")
    if len(wanted) > limits.max_zip_entries:
        raise InvalidInput(
            f"the archive has {len(wanted)} files; at most {limits.max_zip_entries}", field=field, rule="max_items"
        )
    seen: set[str] = set()
    declared_total = 0
    for info, path, _parts in wanted:
        if path in seen:
            raise InvalidInput(f"zip entry {path!r} appears twice", field=field, rule="unique_entries")
        seen.add(path)
        if info.compress_type not in _READABLE_METHODS:
            raise UnsupportedContent(
                f"zip entry {path!r} uses compression method {info.compress_type}; "
                "we read stored, deflate, bzip2 and lzma", field=field, rule="zip_method",
                valid_values=(ZIP_TYPE,),
            )
        if info.file_size > limits.max_file_bytes:
            raise _entry_too_large(path, limits, field)
        declared_total += info.file_size
    if declared_total > limits.max_zip_total_uncompressed:
        raise _archive_too_large(limits, field)


def _read_entry(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    path: str,
    limits: UploadLimits,
    inflated_before: int,
    archive_bytes: int,
    field: str,
) -> bytes:
    """Inflates one entry, never asking the stream for more than one byte past what any limit
    still allows, and judging the ratio as it goes."""
    out = bytearray()
    try:
        with archive.open(info) as stream:
            while True:
                allowance = min(
                    limits.max_file_bytes - len(out),
                    limits.max_zip_total_uncompressed - inflated_before - len(out),
                )
                chunk = stream.read(min(_READ_CHUNK, allowance + 1))
                if not chunk:
                    break
                out += chunk
                if len(out) > limits.max_file_bytes:
                    raise _entry_too_large(path, limits, field)
                total = inflated_before + len(out)
                if total > limits.max_zip_total_uncompressed:
                    raise _archive_too_large(limits, field)
                if len(out) > limits.zip_ratio_floor_bytes and len(out) > limits.max_zip_ratio * max(
                    info.compress_size, 1
                ):
                    raise _bomb(f"zip entry {path!r} inflates more than {limits.max_zip_ratio} times", field)
                if total > limits.zip_ratio_floor_bytes and total > limits.max_zip_ratio * archive_bytes:
                    raise _bomb(f"the archive inflates more than {limits.max_zip_ratio} times its size", field)
    except _INFLATE_ERRORS as error:
        raise UnsupportedContent(f"zip entry {path!r} is corrupt ({error})", field=field, rule="zip_corrupt",
                                 valid_values=(ZIP_TYPE,)) from None
    return bytes(out)


def _inspect_entry(
    path: str, base_name: str, data: bytes, requirement: str, limits: UploadLimits, field: str
) -> ZipEntry:
    if _is_archive(data):
        raise UnsupportedContent(f"zip entry {path!r} is itself an archive", field=field, rule="nested_archive",
                                 valid_values=ACCEPTED_TYPES)
    try:
        inspected = inspect_file(IncomingFile(base_name, data), limits, field=field)
    except InvalidInput as error:
        raise type(error)(
            f"zip entry {path!r}: {error}", field=error.field, rule=error.rule, valid_values=error.valid_values
        ) from error
    return ZipEntry(
        file_name=inspected.file_name, content=data, requirement_code=requirement, path=path, inspected=inspected
    )


def _is_archive(data: bytes) -> bool:
    return any(data[offset : offset + len(magic)] == magic for offset, magic in _ARCHIVE_MAGIC) or bool(
        _BZIP2.match(data)
    )


def _entry_too_large(path: str, limits: UploadLimits, field: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"zip entry {path!r} is over {limits.max_file_bytes} bytes inflated", field=field, rule="max_size"
    )


def _archive_too_large(limits: UploadLimits, field: str) -> PayloadTooLarge:
    return _bomb(f"the archive inflates to more than {limits.max_zip_total_uncompressed} bytes", field)


def _bomb(message: str, field: str) -> PayloadTooLarge:
    return PayloadTooLarge(message, field=field, rule="zip_bomb")


# ---------------------------------------------------------------------------------------------
# Storing files with their rows
# ---------------------------------------------------------------------------------------------

Reconnect = Callable[[], AbstractContextManager[psycopg.Connection]]


def store_and_add_documents(
    conn: psycopg.Connection,
    store: FileStore,
    *,
    property_id: int,
    files: Sequence[tuple[InspectedFile, str, date | None]],
    source: str,
    actor: Actor,
    trigger: TriggerReason,
    correlation_id: str,
    status: DocumentStatus = DocumentStatus.PENDING_VERIFICATION,
    reconnect: Reconnect | None = None,
    before_commit: Callable[[psycopg.Connection, DocumentsAdded], None] | None = None,
) -> DocumentsAdded:
    """Stores the files and adds their documents rows (one per (file, requirement_code,
    expires_at)) in one transaction that this function commits.

    Protocol, per file hash, in sorted order (so two requests never deadlock on each other):
    1. take `pg_advisory_xact_lock` on the hash; 2. write the file; 3. add the rows; 4. commit
    (which releases the locks). On any failure (a refused or replayed request, a database
    error, a lost connection, an interrupt) the transaction rolls back; then, in a fresh
    transaction, under the same locks, every file that no documents row references (deleted or
    not) is removed, and the failure is re-raised. The lock is what makes this safe against a
    concurrent request storing the same bytes: its file write and its commit happen while it
    holds the lock, so the clean-up either runs before it writes or sees its committed row.

    `before_commit` runs in the transaction once the rows are added (an API route stores its
    answer there, so the answer exists exactly when the rows do); if it raises, nothing commits.

    If the connection is lost the clean-up runs on `reconnect()` (a context manager giving a
    connection to the same database, e.g. `pool.connection`); the new transaction waits for
    the lost session's locks, so it sees whether that session's commit happened.

    The window that remains: a process killed after writing files and before its commit (or
    a clean-up that cannot reach the database) leaves files no row references. They are
    orphans, never a row without its file; `remove_orphans` is the sweep that removes them.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise RuntimeError(
            "store_and_add_documents commits its own transaction; call it with no transaction open"
        )
    documents = [
        NewDocument(
            requirement_code=requirement_code, file_name=file.file_name, size_bytes=file.size_bytes,
            sha256=file.sha256, expires_at=expires_at, status=status,
        )
        for file, requirement_code, expires_at in files
    ]
    _validate_before_writing(documents)
    contents = {file.sha256: file.content for file, _, _ in files}
    hashes = sorted(contents)
    try:
        with conn.transaction():
            _lock_files(conn, hashes)
            for sha256 in hashes:
                store.write(contents[sha256], expected_sha256=sha256)
            added = add_documents(
                conn, property_id=property_id, documents=documents, source=source, actor=actor,
                trigger=trigger, correlation_id=correlation_id,
            )
            if before_commit is not None:
                before_commit(conn, added)
            return added
    except BaseException:
        _discard_unreferenced_after_failure(conn, store, hashes, reconnect)
        raise


def _validate_before_writing(documents: list[NewDocument]) -> None:
    """The checks add_documents would make, made before any file touches the disk."""
    if not documents:
        raise InvalidInput("at least one file is required", field="files", rule="not_empty")
    if len(documents) > MAX_DOCUMENTS_PER_REQUEST:
        raise InvalidInput(
            f"at most {MAX_DOCUMENTS_PER_REQUEST} files per request", field="files", rule="max_items"
        )
    for document in documents:
        document.validate()


def _lock_files(conn: psycopg.Connection, hashes: list[str]) -> None:
    with conn.cursor() as cur:
        cur.executemany(QUERIES["lock_document_file"], [{"sha256": sha256} for sha256 in hashes])


def _discard_unreferenced_after_failure(
    conn: psycopg.Connection, store: FileStore, hashes: list[str], reconnect: Reconnect | None
) -> None:
    """Never raises: the caller is already handling the failure that matters. A clean-up that
    cannot finish leaves orphan files for the sweep, which is safe."""
    try:
        _discard_unreferenced(conn, store, hashes)
        return
    except psycopg.Error:
        if reconnect is None:
            log.warning("could not remove unreferenced document files %s; the orphan sweep will", hashes,
                        exc_info=True)
            return
    try:
        with reconnect() as fresh:
            _discard_unreferenced(fresh, store, hashes)
    except Exception:
        log.warning("could not remove unreferenced document files %s; the orphan sweep will", hashes,
                    exc_info=True)


def _discard_unreferenced(conn: psycopg.Connection, store: FileStore, hashes: list[str]) -> list[str]:
    with conn.transaction():
        _lock_files(conn, hashes)
        referenced = _referenced(conn, hashes)
        return [sha256 for sha256 in hashes if sha256 not in referenced and store.discard(sha256)]


def _referenced(conn: psycopg.Connection, hashes: list[str]) -> set[str]:
    rows = conn.execute(QUERIES["referenced_document_files"], {"sha256s": hashes}).fetchall()
    return {row[0] for row in rows}


def orphan_files(conn: psycopg.Connection, store: FileStore, older_than: timedelta) -> list[str]:
    """Stored files older than `older_than` that no documents row (deleted or not) references,
    sorted. A snapshot: `remove_orphans` re-checks each one under its lock before removing it."""
    cutoff = time.time() - older_than.total_seconds()
    candidates = sorted(sha256 for sha256, mtime in store.stored() if mtime < cutoff)
    referenced: set[str] = set()
    with conn.transaction():
        for start in range(0, len(candidates), 1000):
            referenced |= _referenced(conn, candidates[start : start + 1000])
    return [sha256 for sha256 in candidates if sha256 not in referenced]


def remove_orphans(conn: psycopg.Connection, store: FileStore, older_than: timedelta) -> list[str]:
    """Removes the orphan files (and temporaries killed writers left) older than
    `older_than`; returns the hashes removed.

    Each file is re-checked in its own transaction under a non-blocking try of the upload
    lock: a request storing the same bytes right now holds it, so the file is skipped this
    time, never removed under a commit about to reference it. The age only spares the sweep
    from lock contention with uploads in flight; safety does not depend on it.
    """
    removed = []
    for sha256 in orphan_files(conn, store, older_than):
        with conn.transaction():
            locked = conn.execute(QUERIES["try_lock_document_file"], {"sha256": sha256}).fetchone()
            if not (locked and locked[0]) or _referenced(conn, [sha256]):
                continue
            if store.discard(sha256):
                conn.execute(QUERIES["forget_file_suggestions"], {"sha256": sha256})
                removed.append(sha256)
    store.discard_stale_temporaries(older_than)
    return removed
