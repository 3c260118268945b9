"""A new document's own rules, checked before any database work."""

import pytest

from services.documents import NewDocument
from services.errors import InvalidInput
from services.scoring import DocumentStatus


def test_a_new_document_cannot_arrive_already_rejected_because_a_rejection_needs_a_reason() -> None:
    document = NewDocument("gas_safety", "cp12.pdf", 10, "a" * 64, None, DocumentStatus.REJECTED)
    with pytest.raises(InvalidInput, match="pending_verification or verified"):
        document.validate()


@pytest.mark.parametrize("status", [DocumentStatus.PENDING_VERIFICATION, DocumentStatus.VERIFIED])
def test_a_new_document_may_arrive_pending_or_verified(status: DocumentStatus) -> None:
    NewDocument("gas_safety", "cp12.pdf", 10, "a" * 64, None, status).validate()
