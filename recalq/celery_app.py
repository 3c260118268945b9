"""The entry module of `celery -A recalq.celery_app worker | beat | flower | inspect ...`.

Celery looks for an `app` (or `celery`) attribute; this module builds it on first access from
the process's one Runtime, so importing it builds nothing.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from recalq.bootstrap import runtime

        return runtime().celery_app
    raise AttributeError(f"module 'recalq.celery_app' has no attribute {name!r}")
