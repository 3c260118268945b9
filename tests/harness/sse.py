"""Reading a Server-Sent Events stream the way a browser's EventSource does: events split on a
blank line, comments (heartbeats) skipped, `data` parsed as JSON. Shared by the in-process and the
real-process stream tests."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx2 as httpx


def read_stream(base: str, path: str, headers: dict[str, str], *, into: list[dict[str, Any]] | None = None,
                timeout: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """The stream's status and its events (event, id, data), read until the server closes it."""
    found: list[dict[str, Any]] = into if into is not None else []
    with httpx.Client(base_url=base, timeout=timeout) as http, http.stream("GET", path, headers=headers) as answer:
        if answer.status_code != 200:
            return answer.status_code, found
        current: dict[str, Any] = {}
        for line in answer.iter_lines():
            if line == "":
                if "event" in current:
                    found.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                current[name] = json.loads(value) if name == "data" else value
        return 200, found


def stream_in_background(base: str, path: str, headers: dict[str, str]) -> tuple[threading.Thread,
                                                                                  list[dict[str, Any]], list[int]]:
    """A watcher on a thread of its own: its thread, the events as they arrive, and its status once done."""
    events: list[dict[str, Any]] = []
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(read_stream(base, path, headers, into=events)[0]),
                              daemon=True)
    thread.start()
    return thread, events, status


def wait_for(predicate: Any, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
