"""The document extractor behind "AI suggestions": which requirement a file certifies and when
it expires, read from its text by keywords and labelled dates.

It is deterministic on purpose (the same bytes give the same Suggestion, byte for byte), so a
suggestion shown to a user is exactly the one applied later, and every answer carries the text
it came from and says what it could not find. `EXTRACTOR_VERSION` changes whenever a rule does.
"""

from __future__ import annotations

import bisect
import calendar
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pypdf import PdfReader

from services.errors import UnsupportedContent
from services.scoring import REQUIREMENTS
from services.uploads import ACCEPTED_TYPES, FileKind

EXTRACTOR_VERSION = "keywords-3"
#: Certificates are a few pages; a long file is read this far, and the notes say so.
MAX_PAGES = 50
#: And at most this much of their text (a certificate has a few thousand characters a page):
#: the work per document is bounded, so a crafted 10 MiB text cannot hold a request for seconds.
MAX_TEXT_CHARS = 100_000
#: A page's drawing instructions beyond this are not laid out for text (a certificate page has a
#: few tens of KB); pypdf's text layout is what costs seconds on a crafted page.
MAX_PAGE_CONTENT_BYTES = 2_000_000

#: Phrases per requirement and what each is worth. A document names its own type in full or
#: by its usual abbreviation (3); other phrases only lean towards a type. Each phrase counts
#: at most three times, so a form that repeats a heading cannot outvote the title.
KEYWORDS: dict[str, tuple[tuple[str, int], ...]] = {
    "gas_safety": (
        ("gas safety record", 3), ("landlord gas safety", 3), ("gas safety certificate", 3), ("CP12", 3),
        ("gas safe register", 1), ("gas appliance", 1),
    ),
    "eicr": (
        ("electrical installation condition report", 3), ("EICR", 3), ("periodic inspection report", 2),
        ("BS 7671", 1), ("consumer unit", 1),
    ),
    "epc": (
        ("energy performance certificate", 3), ("EPC", 3), ("energy efficiency rating", 2),
        ("energy rating", 1),
    ),
    "smoke_co_alarms": (
        ("smoke and carbon monoxide alarm", 3), ("smoke alarm", 2), ("carbon monoxide alarm", 2),
        ("CO alarm", 2), ("carbon monoxide", 1),
    ),
    "fire_risk_assessment": (
        ("fire risk assessment", 3), ("fire safety order", 2), ("fire safety", 1),
    ),
    "legionella": (
        ("legionella", 3), ("legionnaires", 2), ("water hygiene", 1),
    ),
}
_MAX_COUNT_PER_PHRASE = 3

#: How long each certificate usually lasts, for an expiry derived from an inspection date.
VALIDITY_MONTHS: dict[str, int] = {
    "gas_safety": 12,
    "eicr": 60,
    "epc": 120,
    "fire_risk_assessment": 12,
    "legionella": 24,
    "smoke_co_alarms": 12,
}

_EXPIRY_LABELS = (
    "expiry date", "date of expiry", "expiration date", "expires on", "expires", "expiry",
    "valid until", "valid to", "next inspection due", "next inspection date", "next inspection",
    "next test due", "renewal date", "renewal due",
)
_ISSUE_LABELS = (
    "date of inspection", "inspection date", "inspected on", "date of issue", "issue date", "issued on",
    "date of assessment", "assessment date", "date of check", "check date", "date of test", "test date",
    "date of survey", "survey date", "certificate date",
)
_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_name) if name}
_MONTHS |= {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_MONTHS["sept"] = 9
_PLAUSIBLE_YEARS = range(1900, 2200)


def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    """A label is on one line: "...Certificate\nDate of inspection" holds no "certificate date"."""
    ordered = sorted(labels, key=len, reverse=True)  # the longest label wins where two overlap
    alternatives = "|".join(r"[^\S\n]+".join(map(re.escape, label.split())) for label in ordered)
    return re.compile(r"\b(?:" + alternatives + r")\b", re.IGNORECASE)


_EXPIRY = _label_pattern(_EXPIRY_LABELS)
_ISSUE = _label_pattern(_ISSUE_LABELS)
#: A date within the label's line: up to 30 characters of punctuation or words between them.
_DATE_AFTER_LABEL = re.compile(
    r"[^\n\d]{0,30}?(?<!\d)(?P<date>"
    r"(?P<iso_y>\d{4})-(?P<iso_m>\d{1,2})-(?P<iso_d>\d{1,2})"
    r"|(?P<uk_d>\d{1,2})[/.\-](?P<uk_m>\d{1,2})[/.\-](?P<uk_y>\d{4})"
    r"|(?P<long_d>\d{1,2})(?:st|nd|rd|th)?\s+(?P<long_m>" + "|".join(sorted(_MONTHS, key=len, reverse=True))
    + r")\.?,?\s+(?P<long_y>\d{4})"
    r")(?!\d)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Evidence:
    """Where a suggested field came from: the document's own text, its page (1-based), and,
    for a value computed rather than read, how it was computed."""

    field: str
    text_snippet: str
    page: int
    derivation: str | None = None


@dataclass(frozen=True)
class Suggestion:
    requirement_code: str | None
    expires_at: date | None
    evidence: tuple[Evidence, ...]
    notes: tuple[str, ...]
    extractor_version: str


@dataclass(frozen=True)
class _LabelledDate:
    label: str
    value: date
    page: int
    snippet: str


def extract_pages(content: bytes, kind: FileKind) -> list[str]:
    """The text of each page (a text file is one page), at most MAX_PAGES pages."""
    return _read_pages(content, kind)[0]


def suggest(content: bytes, kind: FileKind) -> Suggestion:
    notes: list[str] = []
    try:
        pages, reading_notes = _read_pages(content, kind)
    except UnsupportedContent as error:
        return Suggestion(None, None, (), (str(error),), EXTRACTOR_VERSION)
    notes += reading_notes
    pages = _within_budget(pages, notes)
    if not any(page.strip() for page in pages):
        notes.append("no text could be extracted (a scanned image has none)")

    requirement, requirement_evidence = _requirement(pages, notes)
    expires_at, expiry_evidence = _expiry(pages, requirement, notes)
    return Suggestion(
        requirement_code=requirement,
        expires_at=expires_at,
        evidence=(*requirement_evidence, *expiry_evidence),
        notes=tuple(notes),
        extractor_version=EXTRACTOR_VERSION,
    )


def _within_budget(pages: list[str], notes: list[str]) -> list[str]:
    kept: list[str] = []
    left = MAX_TEXT_CHARS
    for page in pages:
        if len(page) > left:
            kept.append(page[:left])
            notes.append(f"only the first {MAX_TEXT_CHARS:,} characters of text were read")
            return kept
        kept.append(page)
        left -= len(page)
    return kept


def _read_pages(content: bytes, kind: FileKind) -> tuple[list[str], list[str]]:
    if kind is FileKind.TEXT:
        return [content.decode("utf-8-sig", errors="replace")], []
    if kind is not FileKind.PDF:
        raise UnsupportedContent(f"cannot read {kind!r}", field="file", rule="content_type",
                                 valid_values=ACCEPTED_TYPES)
    try:
        reader = PdfReader(io.BytesIO(content))
        if reader.is_encrypted:
            reader.decrypt("")  # inspect_file accepts only PDFs that open without a password
        total = len(reader.pages)
    except Exception as error:
        # pypdf raises many types for unreadable bytes; all mean the same here.
        raise UnsupportedContent(f"the PDF does not open ({type(error).__name__})", field="file",
                                 rule="content_type", valid_values=ACCEPTED_TYPES) from None
    pages: list[str] = []
    notes: list[str] = []
    read = 0
    for number in range(min(total, MAX_PAGES)):
        if read >= MAX_TEXT_CHARS:
            break  # the text budget is spent: later pages would be cut away unread anyway
        try:
            page = reader.pages[number]
            size = _content_bytes(page)
            if size > MAX_PAGE_CONTENT_BYTES:
                pages.append("")
                notes.append(f"page {number + 1}: not read, its content is {size:,} bytes "
                             f"(at most {MAX_PAGE_CONTENT_BYTES:,} are read)")
                continue
            pages.append(page.extract_text() or "")
            read += len(pages[-1])
        except Exception as error:
            pages.append("")
            notes.append(f"page {number + 1}: no text could be extracted ({type(error).__name__})")
    if total > MAX_PAGES:
        notes.append(f"only the first {MAX_PAGES} of {total} pages were read")
    return pages, notes


def _requirement(pages: list[str], notes: list[str]) -> tuple[str | None, tuple[Evidence, ...]]:
    scores = dict.fromkeys(REQUIREMENTS, 0)
    found: dict[str, list[tuple[int, Evidence]]] = {code: [] for code in REQUIREMENTS}
    for code, phrases in KEYWORDS.items():
        for phrase, weight in phrases:
            pattern = re.compile(r"\b" + r"\s+".join(map(re.escape, phrase.split())) + r"\b", re.IGNORECASE)
            matches = list(_matches(pattern, pages))
            if matches:
                scores[code] += weight * min(len(matches), _MAX_COUNT_PER_PHRASE)
                page, text, match = matches[0]
                found[code].append((weight, Evidence("requirement_code", _snippet(text, match), page)))
    best = max(scores.values())
    if best == 0:
        notes.append("no requirement keywords found")
        return None, ()
    leaders = [code for code in REQUIREMENTS if scores[code] == best]
    if len(leaders) > 1:
        notes.append(f"requirement is ambiguous: {', '.join(leaders)} score equally ({best} each)")
        return None, ()
    code = leaders[0]
    evidence: list[Evidence] = []
    for _weight, item in sorted(found[code], key=lambda item: -item[0]):  # stable: keyword order breaks ties
        if item not in evidence:  # several phrases on one line are one piece of evidence
            evidence.append(item)
    return code, tuple(evidence[:3])


def _expiry(
    pages: list[str], requirement: str | None, notes: list[str]
) -> tuple[date | None, tuple[Evidence, ...]]:
    expiries, issues = _labelled_dates(pages, notes)
    if expiries:
        chosen = expiries[0]
        others = sorted({d.value for d in expiries[1:]} - {chosen.value})
        if others:
            notes.append(
                f"used the first labelled expiry {chosen.value.isoformat()}; also found "
                + ", ".join(d.isoformat() for d in others)
            )
        return chosen.value, (Evidence("expires_at", chosen.snippet, chosen.page),)
    if not issues:
        notes.append("no labelled expiry, inspection or issue date found")
        return None, ()
    issued = issues[0]
    if requirement is None:
        notes.append(
            f"no labelled expiry date found; found {issued.label!r} {issued.value.isoformat()} but cannot "
            "derive an expiry without knowing the requirement"
        )
        return None, ()
    months = VALIDITY_MONTHS[requirement]
    expires_at = _add_months(issued.value, months) - timedelta(days=1)
    notes.append(f"no labelled expiry date found; derived it from {issued.label!r}")
    derivation = (
        f"{issued.label} {issued.value.isoformat()} + {months} months (the usual validity of {requirement}), "
        "less one day"
    )
    return expires_at, (Evidence("expires_at", issued.snippet, issued.page, derivation),)


def _labelled_dates(pages: list[str], notes: list[str]) -> tuple[list[_LabelledDate], list[_LabelledDate]]:
    """Expiry-labelled and issue-labelled dates in reading order. An issue label inside an
    expiry label ("next *inspection date*") is the expiry label's."""
    expiries: list[_LabelledDate] = []
    issues: list[_LabelledDate] = []
    for page_number, text in enumerate(pages, start=1):
        expiry_matches = list(_EXPIRY.finditer(text))
        # Label spans do not overlap and come in order: a bisect finds the one a match may be in
        # (a linear scan per match was quadratic in the labels of a page: seconds on crafted text).
        starts = [match.start() for match in expiry_matches]
        ends = [match.end() for match in expiry_matches]
        for match in expiry_matches:
            if found := _date_after(match, text, page_number, notes):
                expiries.append(found)
        for match in _ISSUE.finditer(text):
            at = bisect.bisect_right(starts, match.start()) - 1
            inside_expiry_label = at >= 0 and match.start() < ends[at]
            if not inside_expiry_label and (found := _date_after(match, text, page_number, notes)):
                issues.append(found)
    return expiries, issues


def _date_after(label: re.Match[str], text: str, page: int, notes: list[str]) -> _LabelledDate | None:
    match = _DATE_AFTER_LABEL.match(text, label.end())
    if match is None:
        return None
    label_text = " ".join(label.group(0).lower().split())
    written = match.group("date")
    try:
        value = _parse(match)
    except ValueError:
        notes.append(f"ignored impossible date {written!r} labelled {label_text!r} on page {page}")
        return None
    if value.year not in _PLAUSIBLE_YEARS:
        notes.append(f"ignored implausible date {written!r} labelled {label_text!r} on page {page}")
        return None
    return _LabelledDate(label_text, value, page, _snippet(text, label, match.end()))


def _parse(match: re.Match[str]) -> date:
    if match.group("iso_y"):
        return date(int(match.group("iso_y")), int(match.group("iso_m")), int(match.group("iso_d")))
    if match.group("uk_d"):
        return date(int(match.group("uk_y")), int(match.group("uk_m")), int(match.group("uk_d")))
    return date(int(match.group("long_y")), _MONTHS[match.group("long_m").lower()], int(match.group("long_d")))


def _add_months(day: date, months: int) -> date:
    """The same day `months` later, or that month's last day (29 February + 12 months is the
    28th)."""
    years, month_index = divmod(day.month - 1 + months, 12)
    year, month = day.year + years, month_index + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _matches(pattern: re.Pattern[str], pages: list[str]) -> Iterator[tuple[int, str, re.Match[str]]]:
    for page_number, text in enumerate(pages, start=1):
        for match in pattern.finditer(text):
            yield page_number, text, match


def _snippet(text: str, match: re.Match[str], end: int | None = None, width: int = 160) -> str:
    """The line the match is on, shortened around the match if it is long."""
    end = match.end() if end is None else end
    line_start = text.rfind("\n", 0, match.start()) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end == -1 else line_end
    start = max(line_start, min(match.start(), line_end - width))
    return " ".join(text[start : min(line_end, start + width)].split())


def _content_bytes(page: Any) -> int:
    contents = page.get_contents()
    return len(contents.get_data()) if contents is not None else 0
