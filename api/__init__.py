"""recalq's HTTP face: a FastAPI app over the compliance services.

It is an adapter: every mutation calls one service function (data change, outbox row and
pending flag in one transaction) and no endpoint computes a score. Build it with
`api.app.create_app()`; nothing here is built at import time.
"""
