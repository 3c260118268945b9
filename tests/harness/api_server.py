"""The real app served by uvicorn on a loopback port, in a thread of the test process: for tests
that need concurrent requests over real sockets (TestClient sends one at a time)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from api.app import create_app
from recalq.settings import Settings
from tests.harness.system import wait_until


@contextmanager
def serving(settings: Settings | Any) -> Iterator[str]:
    """Serves the app (made from `settings`, or given ready) until the block ends; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings) if isinstance(settings, Settings) else settings
    # A bounded graceful shutdown, as `recalq api` has: a stream whose client stopped reading
    # would otherwise keep the server (and its LISTEN task) alive past the test.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 20, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
