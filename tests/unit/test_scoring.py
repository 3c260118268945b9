"""The compliance score, formula version 1, checked against docs/scoring.md.

The stored score is the product every client sees and drift detection (G6) recomputes it
byte for byte, so the formula is pinned three ways: hand-computed examples for every state and
edge, properties over random inputs, and an independent re-implementation of docs/scoring.md's
words (`spec_score`) that the real code must agree with on every input hypothesis can think of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring import (
    VERSION,
    Document,
    DocumentStatus,
    RequirementState,
    ScoringInputs,
    score,
)

D = date(2026, 3, 15)
VERIFIED = DocumentStatus.VERIFIED
PENDING = DocumentStatus.PENDING_VERIFICATION
REJECTED = DocumentStatus.REJECTED
ALL_SIX = ("gas_safety", "eicr", "epc", "smoke_co_alarms", "fire_risk_assessment", "legionella")


def days(n: int) -> date:
    return D + timedelta(days=n)


def doc(id: int, requirement: str, status: DocumentStatus = VERIFIED, expires_at: date | None = None) -> Document:
    return Document(id, requirement, status, expires_at)


def scored(documents: list[Document], gas: bool = True, as_of: date = D):
    return score(ScoringInputs.of(gas, documents), as_of)


def row(result, requirement: str) -> dict:
    rows = [r for r in result.breakdown()["requirements"] if r["requirement"] == requirement]
    assert len(rows) == 1, f"{requirement} listed {len(rows)} times"
    return rows[0]


def all_valid_except(requirement: str, replacement: Document | None, first_id: int = 100) -> list[Document]:
    """Every requirement verified without expiry, except `requirement` (replaced or missing)."""
    docs = [doc(first_id + i, r) for i, r in enumerate(ALL_SIX) if r != requirement]
    return [*docs, replacement] if replacement is not None else docs


# -- one requirement, every state ----------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "expires_at", "state", "credit"),
    [
        pytest.param(VERIFIED, None, "valid", 1.0, id="verified-no-expiry"),
        pytest.param(VERIFIED, days(31), "valid", 1.0, id="verified-expiring-after-D+30"),
        pytest.param(VERIFIED, days(30), "expiring_soon", 0.7, id="verified-expiring-on-D+30"),
        pytest.param(VERIFIED, days(1), "expiring_soon", 0.7, id="verified-expiring-tomorrow"),
        pytest.param(VERIFIED, days(0), "expiring_soon", 0.7, id="verified-expiring-on-D"),
        pytest.param(VERIFIED, days(-1), "expired", 0.0, id="verified-expired-yesterday"),
        pytest.param(PENDING, None, "pending_verification", 0.5, id="pending-no-expiry"),
        pytest.param(PENDING, days(0), "pending_verification", 0.5, id="pending-expiring-on-D"),
        pytest.param(PENDING, days(10), "pending_verification", 0.5, id="pending-expiring-soon"),
        pytest.param(PENDING, days(-1), "expired", 0.0, id="pending-expired"),
        pytest.param(REJECTED, None, "rejected", 0.0, id="rejected-no-expiry"),
        pytest.param(REJECTED, days(400), "rejected", 0.0, id="rejected-far-expiry"),
    ],
)
def test_a_single_document_gets_the_state_and_credit_the_design_gives_it(status, expires_at, state, credit):
    result = scored([doc(7, "eicr", status, expires_at)])
    eicr = row(result, "eicr")
    assert eicr["state"] == state
    assert eicr["credit"] == credit
    assert eicr["document_id"] == 7
    assert eicr["weight"] == 20
    assert eicr["expires_at"] == (expires_at.isoformat() if expires_at else None)
    # Only eicr has a document: the score is its weighted credit out of 100.
    assert result.score == round_half_up(Fraction(20) * Fraction(str(credit)))


def test_a_requirement_without_a_document_is_missing_with_no_credit_and_no_document():
    result = scored([doc(1, "epc")])
    eicr = row(result, "eicr")
    assert eicr == {
        "requirement": "eicr", "state": "missing", "credit": 0.0, "weight": 20,
        "document_id": None, "expires_at": None,
    }


def test_a_document_is_valid_through_its_expiry_date_and_expired_the_day_after():
    document = doc(1, "legionella", VERIFIED, D)
    assert row(scored([document], as_of=D), "legionella")["state"] == "expiring_soon"
    assert row(scored([document], as_of=days(1)), "legionella")["state"] == "expired"


def test_the_expiring_soon_window_ends_thirty_days_after_the_as_of_date():
    document = doc(1, "legionella", VERIFIED, days(30))
    assert row(scored([document], as_of=D), "legionella")["state"] == "expiring_soon"
    assert row(scored([document], as_of=days(-1)), "legionella")["state"] == "valid"


def test_a_property_with_no_documents_scores_zero_with_every_requirement_missing():
    result = scored([])
    assert result.score == 0
    assert [r["state"] for r in result.breakdown()["requirements"]] == ["missing"] * 6


def test_a_property_with_every_requirement_valid_scores_one_hundred():
    assert scored(all_valid_except("none", None)).score == 100


# -- weights and the gas supply ------------------------------------------------------------

@pytest.mark.parametrize(
    ("requirement", "weight"),
    [("gas_safety", 25), ("eicr", 20), ("epc", 15), ("smoke_co_alarms", 15),
     ("fire_risk_assessment", 15), ("legionella", 10)],
)
def test_each_requirement_carries_its_design_weight(requirement, weight):
    result = scored([doc(1, requirement)])
    assert row(result, requirement)["weight"] == weight
    assert result.score == weight  # the weights add up to 100 with gas


def test_without_a_gas_supply_gas_safety_is_not_a_requirement_and_the_rest_are_renormalised():
    result = scored(all_valid_except("gas_safety", None), gas=False)
    assert [r["requirement"] for r in result.breakdown()["requirements"]] == list(ALL_SIX[1:])
    assert result.score == 100  # 75 of 75, not 75 of 100


def test_without_a_gas_supply_a_single_requirement_is_weighted_against_seventy_five():
    # eicr alone: 100 * 20 / 75 = 26.67 -> 27 (with gas it would be 20).
    assert scored([doc(1, "eicr")], gas=False).score == 27
    assert scored([doc(1, "eicr")], gas=True).score == 20


def test_without_a_gas_supply_a_gas_safety_document_is_ignored():
    others = [doc(1, "eicr"), doc(2, "epc", PENDING)]
    with_gas_doc = scored([*others, doc(3, "gas_safety")], gas=False)
    without = scored(others, gas=False)
    assert with_gas_doc.breakdown_json() == without.breakdown_json()
    assert with_gas_doc.score == without.score == 37  # 100 * (20 + 7.5) / 75 = 36.67


def test_without_a_gas_supply_the_score_rounds_the_renormalised_fraction():
    # legionella pending alone: 100 * 5 / 75 = 6.67 -> 7 (truncation would give 6).
    assert scored([doc(1, "legionella", PENDING)], gas=False).score == 7


def test_a_gas_supply_with_no_gas_safety_document_counts_it_as_missing():
    result = scored(all_valid_except("gas_safety", None), gas=True)
    assert row(result, "gas_safety")["state"] == "missing"
    assert result.score == 75


# -- rounding ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("documents", "exact", "half_up", "bankers"),
    [
        # gas expiring (0.7 * 25 = 17.5) + 75 valid = 92.5
        pytest.param(all_valid_except("gas_safety", doc(1, "gas_safety", VERIFIED, days(5))),
                     Fraction(185, 2), 93, 92, id="92.5"),
        # gas pending alone: 0.5 * 25 = 12.5
        pytest.param([doc(1, "gas_safety", PENDING)], Fraction(25, 2), 13, 12, id="12.5"),
        # gas pending + eicr valid: 12.5 + 20 = 32.5
        pytest.param([doc(1, "gas_safety", PENDING), doc(2, "eicr")], Fraction(65, 2), 33, 32, id="32.5"),
        # gas expiring alone: 17.5 (banker's agrees here: 18 is even)
        pytest.param([doc(1, "gas_safety", VERIFIED, days(0))], Fraction(35, 2), 18, 18, id="17.5"),
    ],
)
def test_an_exact_half_rounds_up(documents, exact, half_up, bankers):
    result = scored(documents)
    # The fixture is what it claims: the unrounded score is exactly n + 1/2 ...
    assert exact.denominator == 2
    assert round(exact) == bankers
    # ... and the score rounds it half up, not to even.
    assert result.score == half_up


@pytest.mark.parametrize(
    ("documents", "expected"),
    [
        pytest.param([doc(1, "epc", PENDING), doc(2, "legionella", PENDING)], 17, id="16.67-up"),
        pytest.param([doc(1, "eicr", VERIFIED, days(3))], 19, id="18.67-up"),
        pytest.param([doc(1, "legionella", VERIFIED, days(3))], 9, id="9.33-down"),
        pytest.param([doc(1, "eicr", PENDING)], 13, id="13.33-down"),
        pytest.param([doc(1, "smoke_co_alarms", PENDING)], 10, id="10-exact"),
        pytest.param([doc(1, "epc", VERIFIED, days(3))], 14, id="14-exact"),
    ],
)
def test_a_score_that_is_not_an_exact_half_rounds_to_the_nearest_integer(documents, expected):
    # Without gas the total weight is 75, so 100 * earned / 75 has thirds.
    assert scored(documents, gas=False).score == expected


# -- choosing the best document --------------------------------------------------------------

@pytest.mark.parametrize(
    ("documents", "best_id", "state"),
    [
        pytest.param([doc(1, "epc", REJECTED), doc(2, "epc")], 2, "valid", id="valid-beats-rejected"),
        pytest.param([doc(1, "epc", VERIFIED, days(5)), doc(2, "epc", PENDING)], 1, "expiring_soon",
                     id="expiring-beats-pending"),
        pytest.param([doc(1, "epc", VERIFIED, days(-1)), doc(2, "epc", PENDING)], 2, "pending_verification",
                     id="pending-beats-expired"),
        pytest.param([doc(1, "epc", VERIFIED, days(5)), doc(2, "epc", VERIFIED, days(90))], 2, "valid",
                     id="valid-beats-expiring"),
        pytest.param([doc(1, "epc", PENDING, days(90)), doc(2, "epc", REJECTED)], 1, "pending_verification",
                     id="pending-beats-rejected"),
        pytest.param([doc(3, "epc", VERIFIED, days(-10)), doc(1, "epc", REJECTED), doc(2, "epc", PENDING, days(-1)),
                      doc(4, "epc", VERIFIED, days(30))], 4, "expiring_soon", id="four-documents"),
    ],
)
def test_each_requirement_is_scored_by_its_best_document(documents, best_id, state):
    epc = row(scored(documents), "epc")
    assert (epc["document_id"], epc["state"]) == (best_id, state)
    chosen = next(d for d in documents if d.id == best_id)
    assert epc["expires_at"] == (chosen.expires_at.isoformat() if chosen.expires_at else None)


def test_among_equally_good_documents_the_latest_expiry_then_the_newest_is_reported():
    # docs/scoring.md: any of them gives the same score; pinned so the breakdown is stable.
    assert row(scored([doc(1, "epc", VERIFIED, days(60)), doc(2, "epc", VERIFIED, days(90))]), "epc")[
        "document_id"] == 2
    assert row(scored([doc(1, "epc", VERIFIED, None), doc(2, "epc", VERIFIED, days(900))]), "epc")[
        "document_id"] == 1
    assert row(scored([doc(5, "epc", PENDING), doc(9, "epc", PENDING)]), "epc")["document_id"] == 9


def test_documents_of_unknown_requirements_change_nothing():
    base = [doc(1, "eicr", PENDING), doc(2, "gas_safety", VERIFIED, days(3))]
    extra = [doc(3, "asbestos"), doc(4, "EICR"), doc(5, "")]
    assert scored([*base, *extra]).breakdown_json() == scored(base).breakdown_json()
    assert ScoringInputs.of(True, [*base, *extra]).fingerprint() == ScoringInputs.of(True, base).fingerprint()


# -- the breakdown -----------------------------------------------------------------------

def test_the_breakdown_lists_every_applicable_requirement_with_its_fields_in_a_fixed_order():
    result = scored([doc(11, "gas_safety", VERIFIED, date(2026, 4, 1)), doc(12, "epc", REJECTED)])
    assert result.score == 18
    assert result.version == VERSION == 1
    assert result.as_of == D
    assert result.breakdown() == {
        "version": 1,
        "as_of": "2026-03-15",
        "requirements": [
            {"requirement": "gas_safety", "state": "expiring_soon", "credit": 0.7, "weight": 25,
             "document_id": 11, "expires_at": "2026-04-01"},
            {"requirement": "eicr", "state": "missing", "credit": 0.0, "weight": 20,
             "document_id": None, "expires_at": None},
            {"requirement": "epc", "state": "rejected", "credit": 0.0, "weight": 15,
             "document_id": 12, "expires_at": None},
            {"requirement": "smoke_co_alarms", "state": "missing", "credit": 0.0, "weight": 15,
             "document_id": None, "expires_at": None},
            {"requirement": "fire_risk_assessment", "state": "missing", "credit": 0.0, "weight": 15,
             "document_id": None, "expires_at": None},
            {"requirement": "legionella", "state": "missing", "credit": 0.0, "weight": 10,
             "document_id": None, "expires_at": None},
        ],
    }


def test_the_breakdown_json_is_canonical_and_round_trips_to_the_breakdown():
    result = scored([doc(11, "gas_safety", VERIFIED, date(2026, 4, 1))])
    text = result.breakdown_json()
    assert json.loads(text) == result.breakdown()
    assert text == json.dumps(result.breakdown(), sort_keys=True, separators=(",", ":"))
    assert text.startswith('{"as_of":"2026-03-15","requirements":[{"credit":0.7,"document_id":11,')


def test_the_same_inputs_and_date_give_a_byte_identical_breakdown():
    def build():
        return score(ScoringInputs.of(True, [doc(3, "epc", PENDING, days(4)), doc(1, "eicr", VERIFIED, days(40)),
                                             doc(2, "eicr", REJECTED)]), date(2026, 3, 15))

    first, second = build(), build()
    assert first is not second
    assert first.breakdown_json() == second.breakdown_json()
    assert first.score == second.score


def test_a_different_as_of_date_can_change_the_breakdown():
    documents = [doc(1, "eicr", VERIFIED, days(30))]
    assert scored(documents, as_of=D).breakdown_json() != scored(documents, as_of=days(1)).breakdown_json()


def test_document_order_does_not_change_score_or_breakdown():
    documents = [doc(1, "epc", VERIFIED, days(60)), doc(2, "epc", VERIFIED, days(90)), doc(3, "eicr", PENDING),
                 doc(4, "eicr", REJECTED), doc(5, "gas_safety", VERIFIED, days(-2))]
    forward = score(ScoringInputs(True, tuple(documents)), D)
    backward = score(ScoringInputs(True, tuple(reversed(documents))), D)
    assert forward.breakdown_json() == backward.breakdown_json()


# -- fingerprint --------------------------------------------------------------------------

def _base_documents() -> list[Document]:
    return [doc(1, "epc", VERIFIED, days(60)), doc(2, "eicr", PENDING, None), doc(3, "gas_safety", REJECTED)]


@pytest.mark.parametrize(
    ("gas", "documents"),
    [
        pytest.param(False, _base_documents(), id="gas-supply"),
        pytest.param(True, _base_documents()[:2], id="document-removed"),
        pytest.param(True, [*_base_documents(), doc(4, "legionella")], id="document-added"),
        pytest.param(True, [doc(9, "epc", VERIFIED, days(60)), *_base_documents()[1:]], id="document-id"),
        pytest.param(True, [doc(1, "fire_risk_assessment", VERIFIED, days(60)), *_base_documents()[1:]],
                     id="requirement"),
        pytest.param(True, [doc(1, "epc", PENDING, days(60)), *_base_documents()[1:]], id="status"),
        pytest.param(True, [doc(1, "epc", VERIFIED, days(61)), *_base_documents()[1:]], id="expiry-date"),
        pytest.param(True, [doc(1, "epc", VERIFIED, None), *_base_documents()[1:]], id="expiry-removed"),
    ],
)
def test_the_fingerprint_changes_when_any_input_changes(gas, documents):
    assert ScoringInputs.of(gas, documents).fingerprint() != ScoringInputs.of(True, _base_documents()).fingerprint()


def test_the_fingerprint_ignores_document_order_however_the_inputs_are_built():
    documents = _base_documents()
    expected = ScoringInputs.of(True, documents).fingerprint()
    assert ScoringInputs.of(True, reversed(documents)).fingerprint() == expected
    assert ScoringInputs(True, tuple(reversed(documents))).fingerprint() == expected


def test_the_fingerprint_is_a_stable_sha256_hex_digest():
    fingerprint = ScoringInputs.of(True, _base_documents()).fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert ScoringInputs.of(True, _base_documents()).fingerprint() == fingerprint


# -- an independent reading of docs/scoring.md ---------------------------------------------------

SPEC_WEIGHTS = {"gas_safety": 25, "eicr": 20, "epc": 15, "smoke_co_alarms": 15,
                "fire_risk_assessment": 15, "legionella": 10}


@dataclass(frozen=True)
class SpecDocument:
    """What docs/scoring.md says a single document is worth, and the names it may be reported as."""

    credit: Fraction
    states: frozenset[str]


def spec_document(document: Document, as_of: date) -> SpecDocument:
    expired = document.expires_at is not None and document.expires_at < as_of
    if document.status == "rejected":
        # "rejected: 0.0 (rejected); expired: 0.0 (expired)": a rejected document past its date
        # is worth 0.0 under either name.
        return SpecDocument(Fraction(0), frozenset({"rejected", "expired"} if expired else {"rejected"}))
    if expired:
        return SpecDocument(Fraction(0), frozenset({"expired"}))
    if document.status == "verified":
        if document.expires_at is None or document.expires_at > as_of + timedelta(days=30):
            return SpecDocument(Fraction(1), frozenset({"valid"}))
        assert as_of <= document.expires_at <= as_of + timedelta(days=30)
        return SpecDocument(Fraction(7, 10), frozenset({"expiring_soon"}))
    assert document.status == "pending_verification"
    return SpecDocument(Fraction(1, 2), frozenset({"pending_verification"}))


def round_half_up(value: Fraction) -> int:
    whole = value.numerator // value.denominator
    return whole + 1 if value - whole >= Fraction(1, 2) else whole


def spec_score(has_gas_supply: bool, documents: list[Document], as_of: date) -> tuple[int, dict[str, Fraction]]:
    applicable = {r: w for r, w in SPEC_WEIGHTS.items() if has_gas_supply or r != "gas_safety"}
    credits = {}
    for requirement in applicable:
        worth = [spec_document(d, as_of).credit for d in documents if d.requirement_code == requirement]
        credits[requirement] = max(worth, default=Fraction(0))
    earned = sum((applicable[r] * credits[r] for r in applicable), Fraction(0))
    return round_half_up(100 * earned / sum(applicable.values())), credits


@st.composite
def scenarios(draw, max_documents: int = 12):
    as_of = draw(st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 12, 31)))
    expiry = st.one_of(
        st.none(),
        st.sampled_from([-1, 0, 1, 29, 30, 31]).map(lambda n: as_of + timedelta(days=n)),  # the edges
        st.integers(min_value=-3, max_value=33).map(lambda n: as_of + timedelta(days=n)),
        st.integers(min_value=-2000, max_value=2000).map(lambda n: as_of + timedelta(days=n)),
    )
    ids = draw(st.lists(st.integers(min_value=1, max_value=10**9), unique=True, max_size=max_documents))
    documents = [
        Document(
            i,
            draw(st.sampled_from([*ALL_SIX, "asbestos"])),
            draw(st.sampled_from(list(DocumentStatus))),
            draw(expiry),
        )
        for i in ids
    ]
    return draw(st.booleans()), documents, as_of


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_the_score_and_breakdown_agree_with_an_independent_reading_of_the_design(scenario):
    gas, documents, as_of = scenario
    want, credits = spec_score(gas, documents, as_of)
    result = score(ScoringInputs.of(gas, documents), as_of)

    assert result.score == want
    assert result.as_of == as_of
    listed = result.breakdown()["requirements"]
    assert {r["requirement"] for r in listed} == set(credits)
    assert len(listed) == len(credits)
    by_id = {d.id: d for d in documents}
    for entry in listed:
        requirement = entry["requirement"]
        assert entry["weight"] == SPEC_WEIGHTS[requirement]
        assert Fraction(str(entry["credit"])) == credits[requirement]
        if entry["document_id"] is None:
            assert not any(d.requirement_code == requirement for d in documents)
            assert (entry["state"], entry["expires_at"]) == ("missing", None)
            continue
        chosen = by_id[entry["document_id"]]
        assert chosen.requirement_code == requirement
        judged = spec_document(chosen, as_of)
        assert judged.credit == credits[requirement], "the reported document is not a best one"
        assert entry["state"] in judged.states
        assert entry["expires_at"] == (chosen.expires_at.isoformat() if chosen.expires_at else None)


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_the_score_is_always_an_integer_from_0_to_100(scenario):
    gas, documents, as_of = scenario
    value = score(ScoringInputs.of(gas, documents), as_of).score
    assert type(value) is int
    assert 0 <= value <= 100


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_permutation_of_the_documents_gives_the_same_score_breakdown_and_fingerprint(data):
    gas, documents, as_of = data.draw(scenarios())
    shuffled = data.draw(st.permutations(documents))
    original = ScoringInputs(gas, tuple(documents))
    permuted = ScoringInputs(gas, tuple(shuffled))
    assert score(permuted, as_of).breakdown_json() == score(original, as_of).breakdown_json()
    assert score(permuted, as_of).score == score(original, as_of).score
    assert permuted.fingerprint() == original.fingerprint()


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.sampled_from(ALL_SIX))
def test_adding_a_verified_document_that_never_expires_never_lowers_the_score(scenario, requirement):
    gas, documents, as_of = scenario
    before = score(ScoringInputs.of(gas, documents), as_of)
    new_id = max((d.id for d in documents), default=0) + 1
    after = score(ScoringInputs.of(gas, [*documents, Document(new_id, requirement, VERIFIED, None)]), as_of)
    assert after.score >= before.score
    if gas or requirement != "gas_safety":
        assert row(after, requirement)["state"] == RequirementState.VALID
