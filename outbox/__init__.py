"""recalq's transactional outbox: generic jobs that commit with the caller's mutation.

Producers call `enqueue(conn, ...)` (or the SQL function `outbox_enqueue`) inside their own
transaction; a `Relay` publishes committed jobs; workers move jobs through `lifecycle`.
This package knows nothing about properties, services or Celery.
"""

from outbox.enqueue import Enqueued, enqueue, find_request
from outbox.errors import InvalidEnqueue, OutboxError, PublishFailed
from outbox.status import JobStatus

__all__ = ["Enqueued", "InvalidEnqueue", "JobStatus", "OutboxError", "PublishFailed", "enqueue", "find_request"]
