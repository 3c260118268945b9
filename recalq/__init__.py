"""recalq's composition root: settings, wiring, the CLI and the embedded defaults.

This is the only package that knows every concrete class. `outbox` is generic, `services`
holds the domain, `tasks` adapts services to Celery; `recalq` builds them for one process.
"""
