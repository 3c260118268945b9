"""Retry delays (G5): capped exponential backoff with bounded jitter that is never zero."""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import outbox.backoff
from outbox.backoff import RetryPolicy

DEFAULTS = RetryPolicy(base_seconds=10, max_seconds=600, jitter=0.2)


def test_the_documented_schedule_in_the_module_docstring_holds():
    outcome = doctest.testmod(outbox.backoff, raise_on_error=False, verbose=False)
    assert outcome.attempted >= 4, "the schedule examples disappeared from the docstring"
    assert outcome.failed == 0


def test_the_default_nominal_delays_double_from_ten_seconds_until_the_cap():
    assert [DEFAULTS.nominal_delay(n) for n in range(1, 9)] == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0]


def test_the_default_policy_makes_a_job_dead_about_150_seconds_after_its_first_attempt():
    # Four delays separate five attempts: t = 0, 10, 30, 70, 150 s without jitter.
    times = [0.0]
    for failed in range(1, 5):
        times.append(times[-1] + DEFAULTS.delay(failed, rand=lambda: 0.5))
    assert times == [0.0, 10.0, 30.0, 70.0, 150.0]


def test_jitter_spreads_a_delay_evenly_around_its_nominal_value():
    assert DEFAULTS.delay(2, rand=lambda: 0.0) == pytest.approx(16.0)
    assert DEFAULTS.delay(2, rand=lambda: 0.5) == pytest.approx(20.0)
    assert DEFAULTS.delay(2, rand=lambda: 0.75) == pytest.approx(22.0)
    assert DEFAULTS.bounds(2) == pytest.approx((16.0, 24.0))


def test_jitter_never_pushes_a_delay_above_the_cap():
    assert DEFAULTS.delay(7, rand=lambda: 0.0) == pytest.approx(480.0)
    assert DEFAULTS.delay(7, rand=lambda: 0.999) == 600.0
    assert DEFAULTS.bounds(7) == (pytest.approx(480.0), 600.0)


def test_a_huge_attempt_number_gives_the_cap_without_overflow():
    assert DEFAULTS.nominal_delay(10**6) == 600.0
    assert DEFAULTS.bounds(10**6)[1] == 600.0


def test_without_jitter_the_delay_is_exactly_the_nominal_delay():
    policy = RetryPolicy(base_seconds=0.2, max_seconds=1, jitter=0)
    assert [policy.delay(n, rand=lambda: 0.9) for n in range(1, 5)] == [0.2, 0.4, 0.8, 1.0]
    assert policy.bounds(2) == (0.4, 0.4)


def test_the_default_random_source_stays_within_the_bounds():
    for failed in range(1, 10):
        low, high = DEFAULTS.bounds(failed)
        assert all(low <= DEFAULTS.delay(failed) <= high for _ in range(50))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"base_seconds": 0, "max_seconds": 600}, id="zero-base"),
        pytest.param({"base_seconds": -1, "max_seconds": 600}, id="negative-base"),
        pytest.param({"base_seconds": 10, "max_seconds": 0}, id="zero-cap"),
        pytest.param({"base_seconds": 10, "max_seconds": -5}, id="negative-cap"),
        pytest.param({"base_seconds": 10, "max_seconds": 600, "jitter": 1}, id="jitter-one"),
        pytest.param({"base_seconds": 10, "max_seconds": 600, "jitter": 1.5}, id="jitter-above-one"),
        pytest.param({"base_seconds": 10, "max_seconds": 600, "jitter": -0.1}, id="negative-jitter"),
        pytest.param({"base_seconds": math.nan, "max_seconds": 600}, id="nan-base"),
        pytest.param({"base_seconds": 10, "max_seconds": math.nan}, id="nan-cap"),
        pytest.param({"base_seconds": 10, "max_seconds": math.inf}, id="infinite-cap"),
        pytest.param({"base_seconds": math.inf, "max_seconds": 600}, id="infinite-base"),
        pytest.param({"base_seconds": 10, "max_seconds": 600, "jitter": math.nan}, id="nan-jitter"),
    ],
)
def test_a_policy_that_could_give_a_zero_negative_or_unbounded_delay_is_refused(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("failed_attempt", [0, -1])
def test_attempts_count_from_one(failed_attempt):
    with pytest.raises(ValueError, match="counts from 1"):
        DEFAULTS.nominal_delay(failed_attempt)
    with pytest.raises(ValueError):
        DEFAULTS.delay(failed_attempt, rand=lambda: 0.5)


policies = st.builds(
    RetryPolicy,
    base_seconds=st.floats(min_value=0.001, max_value=1000),
    max_seconds=st.floats(min_value=0.001, max_value=10_000),
    jitter=st.floats(min_value=0, max_value=0.99),
)


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(min_value=1, max_value=200), st.floats(min_value=0, max_value=1))
def test_a_delay_is_always_within_its_bounds_above_zero_and_at_most_the_cap(policy, failed, rand):
    value = policy.delay(failed, rand=lambda: rand)
    low, high = policy.bounds(failed)
    assert 0 < low <= value <= high <= policy.max_seconds


@settings(max_examples=100, deadline=None)
@given(policies, st.integers(min_value=1, max_value=200))
def test_nominal_delays_never_shrink_from_one_attempt_to_the_next(policy, failed):
    assert policy.nominal_delay(failed) <= policy.nominal_delay(failed + 1) <= policy.max_seconds
