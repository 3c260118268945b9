"""Celery tasks: thin adapters from broker messages to recalq's services.

`celery -A tasks worker` finds the app through this module's lazily built `app` attribute;
nothing is built at import time.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from recalq.bootstrap import runtime

        return runtime().celery_app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
