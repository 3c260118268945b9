"""Errors the compliance services raise. One root: `ServiceError`.

    ServiceError
     +-- NotFound                 ClientNotFound, PropertyNotFound, DocumentNotFound
     +-- InvalidInput             a value breaks a domain rule (names the field, rule, valid values)
     |    +-- PayloadTooLarge     a file, archive or request is over its size limit
     |    +-- UnsupportedContent  a file's bytes are not a type we accept, whatever it claims
     +-- InvalidTransition        the entity's state does not allow the change
     +-- DuplicateRequest         the correlation id was accepted before: nothing changed
     +-- RecalculationError       raised inside a recalculation attempt
          +-- PermanentRecalculationError   retrying cannot help: the job goes DEAD at once
                                            (also an outbox PermanentJobError, which is how
                                            the generic runner knows)

How every other failure of an attempt is treated (contention, an outage, a bug) is decided once,
by the runner: see outbox.errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from outbox.errors import PermanentJobError, RetryableJobError


class ServiceError(Exception):
    """A compliance service operation failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class NotFound(ServiceError):
    """The entity does not exist."""


class ClientNotFound(NotFound):
    """The client does not exist."""


class PropertyNotFound(NotFound):
    """The property does not exist."""


class DocumentNotFound(NotFound):
    """The document does not exist or was deleted."""


class InvalidInput(ServiceError):
    """A value breaks a domain rule.

    `field`, `rule` and `valid_values` let an HTTP adapter answer with a body that names them,
    so callers can fix their request without reading our code.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        field: str | None = None,
        rule: str | None = None,
        valid_values: Sequence[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.valid_values = tuple(valid_values) if valid_values is not None else None


class PayloadTooLarge(InvalidInput):
    """A file, archive or request is over its size limit."""


class UnsupportedContent(InvalidInput):
    """A file's content is not of a type we accept, whatever its name or declared type says."""


class InvalidTransition(ServiceError):
    """The entity's current state does not allow this change."""


class DuplicateRequest(ServiceError):
    """This correlation id was accepted before; the request changed nothing."""

    def __init__(self, correlation_id: str, job_id: int | None) -> None:
        job = f" (job {job_id})" if job_id is not None else ""
        super().__init__(f"correlation id {correlation_id!r} was already accepted{job}")
        self.correlation_id = correlation_id
        #: The job the first request joined; None for a provisioning that created no property.
        self.job_id = job_id


class RecalculationError(ServiceError):
    """A recalculation attempt failed."""


class PermanentRecalculationError(RecalculationError, PermanentJobError):
    """Retrying cannot help; the job goes DEAD with this reason."""


class EvaluationError(ServiceError):
    """An evaluation attempt failed."""


class ProviderUnavailable(EvaluationError, RetryableJobError):
    """A provider did not answer (timeout, 5xx, 429, refused) after the per-call retries: the
    attempt fails and is retried with backoff; finished stages are not called again."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"the {stage} provider did not answer: {detail}")
        self.stage = stage


class AddressNotFound(EvaluationError, PermanentJobError):
    """The address provider does not know the address: retrying cannot help."""


class EvaluationNotFound(NotFound):
    """No such evaluation (or another client's)."""
