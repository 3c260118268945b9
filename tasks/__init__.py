"""Celery tasks: thin adapters from broker messages to recalq's runner and services.

Nothing here is built at import time and nothing here knows the composition root: the root
(recalq.bootstrap) builds the Celery app and registers each task on it with what the task
needs. `celery -A recalq.celery_app worker` finds that app.
"""
