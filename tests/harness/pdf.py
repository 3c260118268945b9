"""Real, minimal PDFs for tests, written object by object.

No PDF library writes them, so the reader under test (pypdf) is not also the writer: the
objects, the cross-reference table with its byte offsets and the trailer are spelled out here.
Text is Helvetica (a standard font every reader knows), one `Tj` per line.
"""

from __future__ import annotations

import math

_LEADING = 14
_TOP = 760


def make_pdf(lines: list[str], pages: int = 1) -> bytes:
    """A PDF whose `pages` pages carry `lines` in order, spread as evenly as possible."""
    if pages < 1:
        raise ValueError("a PDF has at least one page")
    per_page = max(1, math.ceil(len(lines) / pages))
    chunks = [lines[i * per_page : (i + 1) * per_page] for i in range(pages)]
    return make_pdf_pages(chunks)


def make_pdf_pages(pages: list[list[str]]) -> bytes:
    """A PDF with one page per list of lines (an empty list gives a blank page)."""
    if not pages:
        raise ValueError("a PDF has at least one page")
    font_id = 3
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % p for p in page_ids) + b"] /Count %d >>" % len(pages),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for page_id, lines in zip(page_ids, pages, strict=True):
        content_id = page_id + 1
        objects[page_id] = (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (font_id, content_id)
        )
        stream = _text_stream(lines)
        objects[content_id] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n" % size
    out += b"0000000000 65535 f \n"
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def _text_stream(lines: list[str]) -> bytes:
    parts = [b"BT", b"/F1 11 Tf", b"%d TL" % _LEADING, b"72 %d Td" % _TOP]
    for index, line in enumerate(lines):
        if index:
            parts.append(b"T*")
        parts.append(b"(" + _pdf_string(line) + b") Tj")
    parts.append(b"ET")
    return b"\n".join(parts)


def _pdf_string(text: str) -> bytes:
    """A literal string in WinAnsi: backslash, parentheses and non-ASCII bytes escaped."""
    out = bytearray()
    for byte in text.encode("cp1252"):
        if byte in b"\\()":
            out += b"\\" + bytes([byte])
        elif byte < 32 or byte > 126:
            out += b"\\%03o" % byte
        else:
            out.append(byte)
    return bytes(out)
