"""Every engine status has exactly one word for the person watching the job."""

from __future__ import annotations

import pytest

from outbox.status import JobStatus
from outbox.user_status import DIALECTS, UserStatus, in_dialect, user_status


@pytest.mark.parametrize(("status", "shown"), [
    ("pending", "queued"), ("published", "queued"), ("running", "running"), ("retrying", "running"),
    ("done", "done"), ("dead", "failed"), ("cancelled", "cancelled"),
])
def test_each_engine_status_is_shown_in_the_plain_words(status: str, shown: str) -> None:
    assert user_status(status) == shown


def test_every_engine_status_and_every_dialect_word_is_mapped() -> None:
    assert {user_status(s) for s in JobStatus} <= set(UserStatus)
    for dialect, words in DIALECTS.items():
        assert set(words) == set(UserStatus), dialect


def test_exports_and_analyses_speak_their_own_dialects() -> None:
    assert [in_dialect(s, "export") for s in ("pending", "running", "done", "dead")] == [
        "processing", "processing", "completed", "failed"]
    assert [in_dialect(s, "analysis") for s in ("published", "retrying", "done", "dead")] == [
        "queued", "running", "succeeded", "failed"]
