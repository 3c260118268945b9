"""The deterministic extractor: requirement by keywords, expiry by labelled dates."""

from __future__ import annotations

from datetime import date

import pytest

from services.extraction import EXTRACTOR_VERSION, MAX_PAGES, Evidence, Suggestion, extract_pages, suggest
from services.uploads import FileKind
from tests.harness.pdf import make_pdf, make_pdf_pages


def text(*lines: str) -> Suggestion:
    return suggest("\n".join(lines).encode(), FileKind.TEXT)


def test_a_gas_safety_record_pdf_gives_its_requirement_and_expiry_with_evidence() -> None:
    pdf = make_pdf(["Landlord Gas Safety Record (CP12)", "Engineer: A. Fitter", "Expiry date: 30/04/2027"])

    suggestion = suggest(pdf, FileKind.PDF)

    assert suggestion.requirement_code == "gas_safety"
    assert suggestion.expires_at == date(2027, 4, 30)
    assert Evidence("requirement_code", "Landlord Gas Safety Record (CP12)", 1) in suggestion.evidence
    assert Evidence("expires_at", "Expiry date: 30/04/2027", 1) in suggestion.evidence
    assert suggestion.notes == ()
    assert suggestion.extractor_version == EXTRACTOR_VERSION


def test_evidence_names_the_page_the_text_is_on() -> None:
    pdf = make_pdf_pages([["Energy Performance Certificate"], ["Valid until: 2035-05-01"]])

    suggestion = suggest(pdf, FileKind.PDF)

    assert suggestion.expires_at == date(2035, 5, 1)
    assert [(e.field, e.page) for e in suggestion.evidence] == [("requirement_code", 1), ("expires_at", 2)]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Expiry date: 2027-05-01", date(2027, 5, 1)),
        ("Expiry date: 01/05/2027", date(2027, 5, 1)),
        ("Expires 1.5.2027", date(2027, 5, 1)),
        ("Valid until 1 May 2027", date(2027, 5, 1)),
        ("Valid until: 1st May 2027", date(2027, 5, 1)),
        ("Renewal date - 22nd Sept 2027", date(2027, 9, 22)),
        ("Next inspection due: 3rd March, 2031", date(2031, 3, 3)),
        ("EXPIRES ON 12 dec 2027", date(2027, 12, 12)),
    ],
)
def test_labelled_expiry_dates_are_read_in_iso_uk_day_first_and_written_forms(line: str, expected: date) -> None:
    assert text("Gas safety record", line).expires_at == expected


def test_an_impossible_date_is_ignored_with_a_note() -> None:
    suggestion = text("Gas safety record", "Expiry date: 31/02/2027")

    assert suggestion.expires_at is None
    assert "ignored impossible date '31/02/2027' labelled 'expiry date' on page 1" in suggestion.notes


def test_an_impossible_date_does_not_hide_a_later_valid_one() -> None:
    suggestion = text("Gas safety record", "Expiry date: 30/02/2027", "Valid until: 28/02/2027")

    assert suggestion.expires_at == date(2027, 2, 28)


def test_an_implausible_year_is_ignored_with_a_note() -> None:
    suggestion = text("Gas safety record", "Expiry date: 01/01/0001")

    assert suggestion.expires_at is None
    assert any("implausible" in note for note in suggestion.notes)


def test_an_unlabelled_date_is_not_taken_for_an_expiry() -> None:
    suggestion = text("Gas safety record", "Printed 01/05/2027")

    assert suggestion.expires_at is None
    assert "no labelled expiry, inspection or issue date found" in suggestion.notes


def test_the_first_labelled_expiry_is_used_and_the_others_are_noted() -> None:
    suggestion = text("Gas safety record", "Expiry date: 01/05/2027", "Renewal date: 2027-06-01")

    assert suggestion.expires_at == date(2027, 5, 1)
    assert any("2027-06-01" in note for note in suggestion.notes)


@pytest.mark.parametrize(
    ("title", "code", "inspected", "expected"),
    [
        ("Landlord Gas Safety Record", "gas_safety", "01/05/2026", date(2027, 4, 30)),
        ("Electrical Installation Condition Report", "eicr", "01/05/2026", date(2031, 4, 30)),
        ("Energy Performance Certificate", "epc", "01/05/2026", date(2036, 4, 30)),
        ("Fire Risk Assessment", "fire_risk_assessment", "01/05/2026", date(2027, 4, 30)),
        ("Legionella risk assessment", "legionella", "01/05/2026", date(2028, 4, 30)),
        ("Smoke and carbon monoxide alarm check", "smoke_co_alarms", "01/05/2026", date(2027, 4, 30)),
        ("Landlord Gas Safety Record", "gas_safety", "29/02/2024", date(2025, 2, 27)),
    ],
)
def test_without_an_expiry_it_is_derived_from_the_inspection_date_and_the_usual_validity(
    title: str, code: str, inspected: str, expected: date
) -> None:
    suggestion = text(title, f"Date of inspection: {inspected}")

    assert suggestion.requirement_code == code
    assert suggestion.expires_at == expected
    expiry_evidence = [e for e in suggestion.evidence if e.field == "expires_at"]
    assert len(expiry_evidence) == 1
    assert expiry_evidence[0].text_snippet == f"Date of inspection: {inspected}"
    assert expiry_evidence[0].derivation is not None
    assert code in expiry_evidence[0].derivation
    assert any("derived" in note for note in suggestion.notes)


def test_an_issue_date_without_a_requirement_gives_no_expiry_and_says_why() -> None:
    suggestion = text("Certificate", "Date of issue: 01/05/2026")

    assert suggestion.expires_at is None
    assert any("cannot derive an expiry without knowing the requirement" in n for n in suggestion.notes)


def test_next_inspection_date_is_an_expiry_not_an_inspection_date() -> None:
    suggestion = text("EICR", "Inspection date: 01/05/2026", "Next inspection date: 01/05/2029")

    assert suggestion.expires_at == date(2029, 5, 1)
    assert all(e.derivation is None for e in suggestion.evidence)


@pytest.mark.parametrize(
    ("title", "code"),
    [
        ("Landlord Gas Safety Record", "gas_safety"),
        ("CP12", "gas_safety"),
        ("Electrical Installation Condition Report", "eicr"),
        ("EICR", "eicr"),
        ("Energy Performance Certificate", "epc"),
        ("EPC", "epc"),
        ("Smoke alarm and carbon monoxide alarm test", "smoke_co_alarms"),
        ("Fire Risk Assessment", "fire_risk_assessment"),
        ("Legionella risk assessment", "legionella"),
    ],
)
def test_the_requirement_is_recognised_by_its_title_or_abbreviation(title: str, code: str) -> None:
    assert text(title).requirement_code == code


def test_a_gas_safety_record_that_mentions_carbon_monoxide_is_still_gas_safety() -> None:
    suggestion = text("Landlord Gas Safety Record", "Carbon monoxide alarm fitted: yes", "Smoke alarm: n/a")

    assert suggestion.requirement_code == "gas_safety"


def test_a_tie_gives_no_requirement_and_a_note_naming_the_candidates() -> None:
    suggestion = text("EICR and EPC bundle")

    assert suggestion.requirement_code is None
    assert "requirement is ambiguous: eicr, epc score equally (3 each)" in suggestion.notes
    assert not [e for e in suggestion.evidence if e.field == "requirement_code"]


def test_a_document_without_keywords_or_dates_says_what_it_could_not_find() -> None:
    suggestion = text("Invoice for plumbing work")

    assert (suggestion.requirement_code, suggestion.expires_at, suggestion.evidence) == (None, None, ())
    assert suggestion.notes == ("no requirement keywords found", "no labelled expiry, inspection or issue date found")


def test_a_pdf_without_text_says_so() -> None:
    suggestion = suggest(make_pdf([]), FileKind.PDF)

    assert suggestion.requirement_code is None
    assert any("no text could be extracted" in note for note in suggestion.notes)


def test_the_same_bytes_give_the_same_suggestion() -> None:
    pdf = make_pdf(["Landlord Gas Safety Record", "Date of inspection: 01/05/2026", "Expiry: 31/02/2027"], pages=2)

    first, second = suggest(pdf, FileKind.PDF), suggest(bytes(pdf), FileKind.PDF)

    assert first == second
    assert repr(first) == repr(second)


def test_unreadable_pdf_bytes_give_an_empty_suggestion_with_a_note() -> None:
    suggestion = suggest(b"%PDF-1.4\nnot really\n", FileKind.PDF)

    assert (suggestion.requirement_code, suggestion.expires_at) == (None, None)
    assert any("does not open" in note for note in suggestion.notes)


def test_extract_pages_gives_one_text_per_pdf_page_and_one_for_a_text_file() -> None:
    pdf = make_pdf(["first line", "second line", "third line"], pages=3)

    assert [page.strip() for page in extract_pages(pdf, FileKind.PDF)] == ["first line", "second line", "third line"]
    assert extract_pages("\ufeffcafé\n".encode(), FileKind.TEXT) == ["café\n"]


def test_only_the_first_max_pages_are_read_and_the_notes_say_so() -> None:
    pages = [[f"page {n}"] for n in range(MAX_PAGES + 2)]
    pages[-1] = ["Gas safety record"]

    suggestion = suggest(make_pdf_pages(pages), FileKind.PDF)

    assert suggestion.requirement_code is None
    assert f"only the first {MAX_PAGES} of {MAX_PAGES + 2} pages were read" in suggestion.notes


def test_the_text_read_is_bounded_so_a_huge_crafted_file_costs_a_bounded_amount_of_work_and_says_so() -> None:
    from services.extraction import MAX_TEXT_CHARS

    head = b"Landlord gas safety record. Expiry date: 01/02/2027. "
    crafted = head + b"inspection date 01/01/2026 " * (4 * MAX_TEXT_CHARS // 27)
    suggestion = suggest(crafted, FileKind.TEXT)

    assert (suggestion.requirement_code, suggestion.expires_at) == ("gas_safety", date(2027, 2, 1))
    assert f"only the first {MAX_TEXT_CHARS:,} characters of text were read" in suggestion.notes


def test_a_pdf_is_read_only_until_the_text_budget_is_spent_so_later_pages_cost_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services import extraction

    filler = "Gas safety record landlord appliance flue inspection " * 40
    pages = [["Landlord gas safety record", "Expiry date: 01/02/2027"]] + [[filler] * 30] * 40
    read: list[int] = []
    original = extraction._content_bytes

    def counting(page: object) -> int:
        read.append(1)
        return original(page)

    monkeypatch.setattr(extraction, "_content_bytes", counting)
    suggestion = suggest(make_pdf_pages(pages), FileKind.PDF)

    assert (suggestion.requirement_code, suggestion.expires_at) == ("gas_safety", date(2027, 2, 1))
    assert f"only the first {extraction.MAX_TEXT_CHARS:,} characters of text were read" in suggestion.notes
    assert len(read) < len(pages) // 2


def test_a_pdf_page_with_oversized_content_is_not_laid_out_and_the_notes_say_so() -> None:
    from services.extraction import MAX_PAGE_CONTENT_BYTES

    huge = ["x" * 100] * (MAX_PAGE_CONTENT_BYTES // 100 + 10)
    suggestion = suggest(make_pdf_pages([["Electrical installation condition report"], huge]), FileKind.PDF)

    assert suggestion.requirement_code == "eicr"
    assert any(note.startswith("page 2: not read, its content is") for note in suggestion.notes), suggestion.notes
