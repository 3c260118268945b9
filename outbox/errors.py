"""Errors the outbox raises. One root, so callers can catch `OutboxError`.

    OutboxError
     +-- InvalidEnqueue      the database refused an enqueue (names the rule broken)
     +-- PublishFailed       the broker did not take (all of) a batch
"""

from __future__ import annotations

from collections.abc import Sequence


class OutboxError(Exception):
    """An outbox operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidEnqueue(OutboxError):
    """The enqueue request broke a rule of the outbox contract."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint


class PublishFailed(OutboxError):
    """The broker did not accept every message of a batch."""

    def __init__(self, message: str, published: Sequence[int] = ()) -> None:
        super().__init__(message)
        #: Job ids that did reach the broker before the failure.
        self.published = tuple(published)
