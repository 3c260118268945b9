"""Bounds on a request body: its size, and how long it may take to arrive.

Size: Content-Length is checked first; chunked bodies are counted as they stream, so a client
cannot get past the limit by not declaring a length. Time: a body whose next chunk does not
arrive within the idle timeout, or that is not complete within the total timeout, is cut off
with 408, so a client that stops sending (or trickles a byte at a time) gives its slot back
instead of holding it forever.

A body refused part-way is answered here, with the real status (413 or 408), and the app is
told the client went away: whatever it would answer to a body it never got is dropped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import FieldProblem, problem_response

_GONE: Message = {"type": "http.disconnect"}


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int
    idle_timeout_seconds: float
    total_timeout_seconds: float


class RequestBodyLimits:
    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_bytes:
            await self._too_large(scope, send)
            return
        guard = _Guard(self.limits, scope, receive, send)
        await self.app(scope, guard.receive, guard.send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        await _answer(scope, send, _too_large_problem(self.limits.max_bytes))


class _Guard:
    """One request's body, watched as the app reads it."""

    def __init__(self, limits: BodyLimits, scope: Scope, receive: Receive, send: Send) -> None:
        self.limits, self.scope, self._receive, self._send = limits, scope, receive, send
        self.deadline = time.monotonic() + limits.total_timeout_seconds
        self.seen = 0
        self.complete = False
        self.started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return _GONE
        if self.complete:
            return await self._receive()  # past the body: only a disconnect can come
        wait = min(self.limits.idle_timeout_seconds, self.deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(wait, 0.0))
        except TimeoutError:
            await self._refuse(_timeout_problem(self.limits))
            return _GONE
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limits.max_bytes:
                await self._refuse(_too_large_problem(self.limits.max_bytes))
                return _GONE
            if not message.get("more_body", False):
                self.complete = True
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the app's answer to a body it never got
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _refuse(self, response: object) -> None:
        self.refused = True
        if not self.started:
            await _answer(self.scope, self._send, response)


async def _answer(scope: Scope, send: Send, response: object) -> None:
    async def nothing() -> Message:
        return _GONE

    await response(scope, nothing, send)  # type: ignore[operator]


def _too_large_problem(max_bytes: int) -> object:
    return problem_response(
        413, "Payload too large", f"the request body is over the limit of {max_bytes} bytes",
        kind="payload-too-large", headers={"Connection": "close"},
        errors=[FieldProblem(field="body", rule="max_size", message=f"at most {max_bytes} bytes")],
    )


def _timeout_problem(limits: BodyLimits) -> object:
    return problem_response(
        408, "Request timeout",
        f"the request body stopped arriving: each part must come within {limits.idle_timeout_seconds:g} s "
        f"and the whole body within {limits.total_timeout_seconds:g} s",
        kind="request-timeout", headers={"Connection": "close"},
        errors=[FieldProblem(field="body", rule="arrival_time",
                             message=f"idle at most {limits.idle_timeout_seconds:g} s, "
                                     f"all of it within {limits.total_timeout_seconds:g} s")],
    )
