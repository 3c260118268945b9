"""What an upload may contain: single files judged by their bytes, and hostile zip archives."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile

import pytest
from pypdf import PdfReader, PdfWriter

from services.errors import InvalidInput, PayloadTooLarge, UnsupportedContent
from services.scoring import REQUIREMENTS
from services.uploads import (
    ACCEPTED_TYPES,
    FileKind,
    IncomingFile,
    UploadLimits,
    _read_entry,
    inspect_file,
    requirement_from_path,
    unpack_zip,
)
from tests.harness.archives import (
    MiB,
    RawEntry,
    bomb_zip,
    encrypted_zip,
    nested_zip,
    raw_zip,
    symlink_zip,
    traversal_zip,
    zip_of,
    zip_with_infos,
)
from tests.harness.pdf import make_pdf

PDF = make_pdf(["Landlord Gas Safety Record", "Expiry date: 30/04/2027"])
TEXT = b"Electrical Installation Condition Report\nNext inspection due: 2031-04-30\n"
HTML = b"<!DOCTYPE html><html><body>Gas safety record</body></html>"


def refused(kind: type[InvalidInput], call, *args, **kwargs) -> InvalidInput:
    """Runs call, asserts it raised exactly `kind`, returns the error for its field and rule."""
    with pytest.raises(InvalidInput) as raised:
        call(*args, **kwargs)
    assert type(raised.value) is kind, f"raised {type(raised.value).__name__}: {raised.value}"
    return raised.value


def encrypted_pdf(user_password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(PDF)))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# --- single files -----------------------------------------------------------------------------


def test_a_pdf_is_accepted_with_its_hash_size_and_kind() -> None:
    inspected = inspect_file(IncomingFile("cert.pdf", PDF, "application/pdf"))

    assert inspected.kind is FileKind.PDF
    assert inspected.sha256 == hashlib.sha256(PDF).hexdigest()
    assert inspected.size_bytes == len(PDF)
    assert inspected.content == PDF


def test_utf8_text_is_accepted_as_plain_text_whatever_its_charset_parameter() -> None:
    inspected = inspect_file(IncomingFile("eicr.txt", TEXT, "text/plain; charset=utf-8"))

    assert inspected.kind is FileKind.TEXT
    assert str(inspected.kind) == "text/plain"


@pytest.mark.parametrize("declared", [None, "", "application/octet-stream", "application/x-pdf"])
def test_a_pdf_without_a_useful_declared_type_is_judged_by_its_bytes(declared: str | None) -> None:
    assert inspect_file(IncomingFile("scan", PDF, declared)).kind is FileKind.PDF


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("C:\\Users\\me\\cert.pdf", "cert.pdf"), ("/tmp/../cert.pdf", "cert.pdf"), ("  cert.pdf  ", "cert.pdf")],
)
def test_a_file_name_keeps_only_its_last_component(raw: str, clean: str) -> None:
    assert inspect_file(IncomingFile(raw, PDF)).file_name == clean


def test_html_renamed_to_pdf_is_refused_and_the_refusal_names_the_file() -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("cert.pdf", HTML, "application/pdf"))

    assert "cert.pdf" in str(error)
    assert error.field == "file"
    assert error.valid_values == ACCEPTED_TYPES


@pytest.mark.parametrize("name", ["cert", "cert.txt"])
def test_html_is_refused_as_text_whatever_it_is_called(name: str) -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile(name, HTML))

    assert error.rule == "content_type"


@pytest.mark.parametrize(
    "content",
    [
        b"%PDF-1.7\n" + bytes(range(256)) * 8,
        b"%PDF-1.4\nthis is not a pdf at all\n%%EOF\n",
        PDF[: len(PDF) // 2],
        b"%PDF-",
    ],
    ids=["binary-garbage", "text-garbage", "truncated", "header-only"],
)
def test_bytes_that_start_like_a_pdf_but_do_not_open_as_one_are_refused(content: bytes) -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("cert.pdf", content))

    assert "'cert.pdf'" in str(error)
    assert error.rule == "content_type"
    assert error.valid_values == ("application/pdf", "text/plain")


def test_a_pdf_that_needs_a_password_is_refused() -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("cert.pdf", encrypted_pdf("secret")))

    assert error.rule == "pdf_password"


def test_a_pdf_encrypted_with_an_empty_user_password_is_accepted() -> None:
    assert inspect_file(IncomingFile("cert.pdf", encrypted_pdf(""))).kind is FileKind.PDF


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"text with a NUL\x00 inside", b"caf\xe9 latin-1"],
    ids=["png", "nul", "not-utf8"],
)
def test_content_that_is_neither_pdf_nor_utf8_text_is_refused_with_the_accepted_types(content: bytes) -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("upload", content))

    assert error.rule == "content_type"
    assert error.valid_values == ("application/pdf", "text/plain")


def test_an_empty_file_is_refused_as_empty() -> None:
    error = refused(InvalidInput, inspect_file, IncomingFile("cert.pdf", b""))

    assert (error.field, error.rule) == ("file", "not_empty")


def test_a_file_over_the_size_limit_is_refused_as_too_large() -> None:
    error = refused(PayloadTooLarge, inspect_file, IncomingFile("eicr.txt", TEXT), UploadLimits(max_file_bytes=10))

    assert (error.field, error.rule) == ("file", "max_size")


def test_the_refusal_names_the_request_field_the_caller_gives() -> None:
    error = refused(InvalidInput, inspect_file, IncomingFile("cert.pdf", b""), field="files")

    assert error.field == "files"


def test_a_declared_pdf_whose_content_is_text_is_refused() -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("eicr", TEXT, "application/pdf"))

    assert error.rule == "declared_type_matches_content"


def test_a_declared_text_whose_content_is_a_pdf_is_refused() -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile("cert", PDF, "text/plain"))

    assert error.rule == "declared_type_matches_content"


@pytest.mark.parametrize(("name", "content"), [("eicr.pdf", TEXT), ("cert.txt", PDF), ("cert.jpg", PDF)])
def test_a_name_whose_extension_contradicts_the_content_is_refused(name: str, content: bytes) -> None:
    error = refused(UnsupportedContent, inspect_file, IncomingFile(name, content))

    assert error.rule == "name_matches_content"
    assert name in str(error)


@pytest.mark.parametrize(
    "name", ["cert\x00.pdf", "cert\n.pdf", "cert\x1b.pdf", "evil\u202efdp.exe", "a\ud800.pdf"],
    ids=["nul", "newline", "escape", "bidi-override", "lone-surrogate"],
)
def test_a_file_name_with_control_characters_is_refused(name: str) -> None:
    error = refused(InvalidInput, inspect_file, IncomingFile(name, PDF))

    assert (error.field, error.rule) == ("file_name", "no_control_characters")


@pytest.mark.parametrize("name", ["", "   ", "dir/", ".", "..", "x" * 252 + ".pdfx"])
def test_a_file_name_must_be_1_to_255_characters_of_a_file(name: str) -> None:
    error = refused(InvalidInput, inspect_file, IncomingFile(name, PDF))

    assert (error.field, error.rule) == ("file_name", "length_1_255")


def test_a_file_name_of_255_characters_is_accepted() -> None:
    name = "x" * 251 + ".pdf"

    assert inspect_file(IncomingFile(name, PDF)).file_name == name


# --- zip archives: what is accepted ------------------------------------------------------------


def test_an_archive_unpacks_to_inspected_files_with_requirements_from_their_paths() -> None:
    archive = zip_of([
        ("gas_safety/cert.pdf", PDF),
        ("eicr_2026.txt", TEXT),
        ("Fire Risk Assessment/report.txt", b"Fire risk assessment\n"),
        ("epc-cert.txt", b"Energy performance certificate\n"),
    ])

    entries = unpack_zip(archive)

    assert [(e.path, e.file_name, e.requirement_code, e.inspected.kind) for e in entries] == [
        ("gas_safety/cert.pdf", "cert.pdf", "gas_safety", FileKind.PDF),
        ("eicr_2026.txt", "eicr_2026.txt", "eicr", FileKind.TEXT),
        ("Fire Risk Assessment/report.txt", "report.txt", "fire_risk_assessment", FileKind.TEXT),
        ("epc-cert.txt", "epc-cert.txt", "epc", FileKind.TEXT),
    ]
    assert entries[0].content == PDF
    assert entries[0].inspected.sha256 == hashlib.sha256(PDF).hexdigest()


def test_directories_macos_metadata_and_dot_files_are_skipped() -> None:
    directory = zipfile.ZipInfo("gas_safety/")
    directory.external_attr = (stat.S_IFDIR | 0o755) << 16
    archive = zip_with_infos([
        (directory, b""),
        (zipfile.ZipInfo("gas_safety/cert.pdf"), PDF),
        (zipfile.ZipInfo("__MACOSX/gas_safety/._cert.pdf"), b"\x00\x05\x16\x07"),
        (zipfile.ZipInfo(".DS_Store"), b"\x00\x00\x00\x01Bud1"),
        (zipfile.ZipInfo("gas_safety/.hidden/eicr.txt"), TEXT),
    ])

    assert [e.path for e in unpack_zip(archive)] == ["gas_safety/cert.pdf"]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("gas_safety/2026/cert.pdf", "gas_safety"),
        ("Gas-Safety/cert.pdf", "gas_safety"),
        ("landlord/smoke_co_alarms/check.pdf", "smoke_co_alarms"),
        ("EICR.pdf", "eicr"),
        ("legionella 2026.pdf", "legionella"),
        ("smoke-co-alarms_check.pdf", "smoke_co_alarms"),
        ("eicr/gas_safety_cert.pdf", "eicr"),
    ],
)
def test_the_requirement_comes_from_the_first_directory_naming_one_else_the_file_name(path: str, code: str) -> None:
    assert requirement_from_path(path) == code


@pytest.mark.parametrize("path", ["misc/cert.pdf", "epcx.pdf", "certificates.pdf", "gas.pdf"])
def test_an_entry_whose_path_names_no_requirement_is_refused_naming_it_and_the_codes(path: str) -> None:
    error = refused(InvalidInput, unpack_zip, zip_of([(path, PDF)]))

    assert path in str(error)
    assert (error.field, error.rule) == ("file", "requirement_from_path")
    assert error.valid_values == REQUIREMENTS


def test_an_entry_that_fails_inspection_is_refused_naming_its_path() -> None:
    error = refused(UnsupportedContent, unpack_zip, zip_of([("gas_safety/photo.pdf", b"\x89PNG\r\n\x1a\n\x00")]))

    assert "gas_safety/photo.pdf" in str(error)
    assert error.rule == "content_type"


# --- zip archives: hostile ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../gas_safety/evil.txt",
        "gas_safety/../../evil.txt",
        "/etc/gas_safety.txt",
        "C:/gas_safety.txt",
        "c:gas_safety.txt",
        "gas_safety\\..\\evil.txt",
        "gas_safety/./cert.txt",
        "gas_safety//cert.txt",
        b"gas_safety/cert.txt\x00.exe",
        "gas_safety/cert\x07.txt",
        "gas_safety/evil\u202etxt.exe",
        "__MACOSX/../evil.txt",
    ],
    ids=lambda p: repr(p),
)
def test_an_entry_with_an_unsafe_path_refuses_the_archive_naming_the_entry(path: str | bytes) -> None:
    archive = raw_zip([RawEntry.stored("gas_safety/fine.txt", TEXT), RawEntry.stored(path, TEXT)])

    error = refused(InvalidInput, unpack_zip, archive)

    assert (error.field, error.rule) == ("file", "safe_path")
    shown = path.decode() if isinstance(path, bytes) else path
    assert repr(shown) in str(error)


def test_the_default_traversal_archive_is_refused() -> None:
    assert refused(InvalidInput, unpack_zip, traversal_zip()).rule == "safe_path"


def test_a_symlink_entry_is_refused() -> None:
    error = refused(InvalidInput, unpack_zip, symlink_zip())

    assert error.rule == "safe_path"
    assert "symbolic link" in str(error)


def test_a_device_or_fifo_entry_is_refused() -> None:
    archive = raw_zip([RawEntry.stored("gas_safety/pipe.txt", TEXT, external_attr=(stat.S_IFIFO | 0o644) << 16)])

    assert refused(InvalidInput, unpack_zip, archive).rule == "safe_path"


def test_an_encrypted_entry_is_refused() -> None:
    error = refused(UnsupportedContent, unpack_zip, encrypted_zip())

    assert error.rule == "not_encrypted"
    assert "gas_safety/cert.txt" in str(error)


def test_an_archive_inside_the_archive_is_refused() -> None:
    assert refused(UnsupportedContent, unpack_zip, nested_zip()).rule == "nested_archive"


def test_a_gzip_inside_the_archive_is_refused_whatever_its_name() -> None:
    archive = zip_of([("gas_safety/cert.txt", b"\x1f\x8b\x08\x00" + b"\x00" * 16)])

    assert refused(UnsupportedContent, unpack_zip, archive).rule == "nested_archive"


@pytest.mark.parametrize(
    "content", [PDF, b"just text", PDF + zip_of([("gas_safety/a.txt", TEXT)])], ids=["pdf", "text", "pdf-zip-polyglot"]
)
def test_bytes_that_are_not_a_zip_archive_are_refused_as_unsupported(content: bytes) -> None:
    error = refused(UnsupportedContent, unpack_zip, content)

    assert error.valid_values == ("application/zip",)


def test_a_truncated_archive_is_refused_as_corrupt() -> None:
    archive = zip_of([("gas_safety/cert.pdf", PDF)])

    assert refused(UnsupportedContent, unpack_zip, archive[:-30]).rule == "zip_corrupt"


def test_an_entry_whose_crc_does_not_match_is_refused_as_corrupt() -> None:
    archive = raw_zip([RawEntry.stored("gas_safety/cert.txt", TEXT, crc=0)])

    assert refused(UnsupportedContent, unpack_zip, archive).rule == "zip_corrupt"


def test_an_entry_name_flagged_utf8_that_is_not_utf8_is_refused_as_corrupt() -> None:
    archive = raw_zip([RawEntry.stored(b"gas_safety/caf\xe9.txt", TEXT, flag_bits=0x800)])

    assert refused(UnsupportedContent, unpack_zip, archive).rule == "zip_corrupt"


def test_an_entry_with_an_unknown_compression_method_is_refused() -> None:
    archive = raw_zip([RawEntry.stored("gas_safety/cert.txt", TEXT, method=99)])

    assert refused(UnsupportedContent, unpack_zip, archive).rule == "zip_method"


@pytest.mark.parametrize(
    "archive",
    [b"", zip_of([]), zip_of([("__MACOSX/._a", b"\x00"), (".DS_Store", b"\x00")])],
    ids=["no-bytes", "no-entries", "only-skipped-entries"],
)
def test_an_archive_without_files_is_refused_as_empty(archive: bytes) -> None:
    error = refused(InvalidInput, unpack_zip, archive)

    assert (error.field, error.rule) == ("file", "not_empty")


def test_an_archive_with_more_files_than_allowed_is_refused_before_reading_any() -> None:
    archive = zip_of([(f"gas_safety/{i}.txt", TEXT) for i in range(51)])

    error = refused(InvalidInput, unpack_zip, archive)

    assert error.rule == "max_items"
    assert "51" in str(error)


def test_an_archive_with_too_many_directory_records_is_refused_before_zipfile_parses_them() -> None:
    archive = zip_of([(f"__MACOSX/._{i}", b"\x00") for i in range(11)] + [("gas_safety/a.txt", TEXT)])

    assert refused(InvalidInput, unpack_zip, archive, UploadLimits(max_zip_records=10)).rule == "max_items"


def test_the_same_path_twice_is_refused() -> None:
    archive = raw_zip([RawEntry.stored("gas_safety/a.txt", TEXT), RawEntry.stored("gas_safety/a.txt", b"other")])

    assert refused(InvalidInput, unpack_zip, archive).rule == "unique_entries"


def test_an_archive_over_the_compressed_size_limit_is_refused() -> None:
    archive = zip_of([("gas_safety/a.txt", TEXT)])

    error = refused(PayloadTooLarge, unpack_zip, archive, UploadLimits(max_zip_bytes=len(archive) - 1))

    assert (error.field, error.rule) == ("file", "max_size")


def test_a_200_mib_zip_bomb_is_refused_without_inflating_it() -> None:
    # crc=0 is wrong: a reader that inflated all 200 MiB would fail on the CRC, not on the size.
    error = refused(PayloadTooLarge, unpack_zip, bomb_zip(200 * MiB, crc=0))

    assert error.rule in {"max_size", "zip_bomb"}
    assert "gas_safety/zeros.txt" in str(error)


def test_a_zip_bomb_whose_header_understates_its_size_is_refused() -> None:
    archive = bomb_zip(200 * MiB, crc=0, declared_size=MiB)

    # zipfile stops at the declared size; the bytes it read do not match the CRC.
    assert refused(UnsupportedContent, unpack_zip, archive).rule == "zip_corrupt"


def test_an_entry_inflating_more_than_the_ratio_is_refused_while_reading_before_its_end() -> None:
    # Sizes within the limits, so only the ratio (100x; this entry is ~1000x) can refuse it.
    limits = UploadLimits(max_file_bytes=64 * MiB, max_zip_total_uncompressed=64 * MiB)

    error = refused(PayloadTooLarge, unpack_zip, bomb_zip(50 * MiB, crc=0), limits)

    assert error.rule == "zip_bomb"


def test_many_small_entries_inflating_more_than_the_ratio_together_are_refused() -> None:
    archive = zip_of([(f"gas_safety/{i}.txt", b"a" * MiB) for i in range(5)])

    error = refused(PayloadTooLarge, unpack_zip, archive)

    assert error.rule == "zip_bomb"
    assert "archive" in str(error)


def test_entries_whose_declared_sizes_add_up_past_the_total_limit_are_refused() -> None:
    archive = zip_of([("gas_safety/a.txt", TEXT), ("gas_safety/b.txt", TEXT)])
    limits = UploadLimits(max_zip_total_uncompressed=len(TEXT) + 1)

    assert refused(PayloadTooLarge, unpack_zip, archive, limits).rule == "zip_bomb"


def test_reading_an_entry_stops_one_byte_past_the_limit_whatever_its_header_says() -> None:
    """The second line of defence (zipfile itself stops at the header's size): called directly
    so the header check in front of it cannot answer first."""
    archive = zipfile.ZipFile(io.BytesIO(zip_of([("gas_safety/a.txt", b"a" * 5000)], zipfile.ZIP_STORED)))
    requested: list[int] = []
    original_open = archive.open

    def counting_open(info: zipfile.ZipInfo):  # type: ignore[no-untyped-def]
        stream = original_open(info)
        read = stream.read

        def counted(n: int = -1) -> bytes:
            chunk = read(n)
            requested.append(len(chunk))
            return chunk

        stream.read = counted  # type: ignore[method-assign]
        return stream

    archive.open = counting_open  # type: ignore[method-assign]
    limits = UploadLimits(max_file_bytes=1000)

    with pytest.raises(PayloadTooLarge) as error:
        _read_entry(archive, archive.infolist()[0], "gas_safety/a.txt", limits, 0, 10**9, "file")

    assert error.value.rule == "max_size"
    assert sum(requested) == 1001
