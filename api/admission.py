"""Admission control: the API serves what its database pool can serve, sheds the rest fast,
and keeps any one caller from taking it away from the others.

Why it exists. Routes are synchronous and each holds a pooled connection for its whole run, so
an API process can do at most `pool size` requests' database work at once. Without a bound,
every further request took a thread from AnyIO's pool (40) and then waited up to the pool
timeout (10 s) for a connection; past ~40 concurrent requests every thread was waiting, and even
`/healthz` waited for a thread: throughput fell from ~400 req/s to ~5, answers took 10-30 s.

What it does, per request, before the route runs (a pure ASGI middleware, no thread held):

1. The caller's share. Callers are told apart by their credential (a digest of the bearer token
   or admin key; the peer address for anonymous calls). A caller may hold at most
   `tenant_slots` of the `slots`, and may start at most `rate` requests per second (a token
   bucket of `burst`). Past either: 429 with Retry-After, at once.
2. A slot. `slots` requests run at once (the pool size by default, so none ever waits for a
   connection). The next `max_waiting` wait, at most `max_wait_seconds`, for one to free up;
   past that, or with the queue full: 503 with Retry-After, at once. Never a 10-second hang.

The slot is held until the response has been sent. Paths that touch no database (health,
documentation) are admitted without a slot, so `/healthz` answers at once however loaded the
process is. Counting is per process: with N API processes, the limits are N times these.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem_response

#: Paths that need no database and are never queued or limited.
FREE_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Callers remembered for their rate; the least recently seen are forgotten beyond this.
MAX_TRACKED_CALLERS = 10_000


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    slots: int
    max_waiting: int
    max_wait_seconds: float
    tenant_slots: int
    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_waiting < 0 or self.max_wait_seconds < 0:
            raise ValueError("slots must be at least 1; max_waiting and max_wait_seconds at least 0")
        if not 1 <= self.tenant_slots <= self.slots:
            raise ValueError("tenant_slots must be between 1 and slots")
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")


class _Bucket:
    __slots__ = ("in_flight", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.in_flight = 0


class Admission:
    def __init__(self, app: ASGIApp, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.limits = limits
        self._clock = clock
        self._free = limits.slots
        self._waiters: list[asyncio.Future[None]] = []
        self._callers: OrderedDict[str, _Bucket] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in FREE_PATHS:
            await self.app(scope, receive, send)
            return
        bucket = self._bucket(_caller(scope))
        refusal = self._tenant_refusal(bucket)
        if refusal is not None:
            await _refuse(scope, receive, send, 429, "Too many requests", refusal[0], "rate-limited", refusal[1])
            return
        bucket.in_flight += 1
        try:
            if not await self._acquire():
                await _refuse(scope, receive, send, 503, "Service unavailable",
                              "the API is at capacity; retry after the time in Retry-After", "overloaded", 1)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self._release()
        finally:
            bucket.in_flight -= 1

    # -- the caller's share ---------------------------------------------------------------------
    def _bucket(self, caller: str) -> _Bucket:
        now = self._clock()
        bucket = self._callers.get(caller)
        if bucket is None:
            bucket = self._callers[caller] = _Bucket(self.limits.burst, now)
            while len(self._callers) > MAX_TRACKED_CALLERS:
                oldest, idle = next(iter(self._callers.items()))
                if idle.in_flight:
                    break
                del self._callers[oldest]
        else:
            self._callers.move_to_end(caller)
            bucket.tokens = min(self.limits.burst, bucket.tokens + (now - bucket.updated) * self.limits.rate)
            bucket.updated = now
        return bucket

    def _tenant_refusal(self, bucket: _Bucket) -> tuple[str, int] | None:
        if bucket.in_flight >= self.limits.tenant_slots:
            return (f"this caller already has {bucket.in_flight} requests in progress, its share of the API; "
                    "retry when one has finished", 1)
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self.limits.rate)
            return (f"this caller is over its rate of {self.limits.rate:g} requests per second", max(1, wait))
        bucket.tokens -= 1
        return None

    # -- slots --------------------------------------------------------------------------------
    async def _acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        if len(self._waiters) >= self.limits.max_waiting:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        acquired = False
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.limits.max_wait_seconds)
            acquired = True
        except TimeoutError:
            acquired = waiter.done() and not waiter.cancelled()  # handed a slot as the wait ran out
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not waiter.done():
                waiter.cancel()
            elif not acquired and not waiter.cancelled():
                self._release()  # handed a slot, then the caller went away: pass it on
        return acquired

    def _release(self) -> None:
        """Hands the slot to the oldest waiter still waiting, or frees it."""
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


def _caller(scope: Scope) -> str:
    headers = dict(scope.get("headers") or [])
    credential = headers.get(b"authorization") or headers.get(b"x-api-key")
    if credential:
        return "cred:" + hashlib.sha256(credential).hexdigest()[:32]
    client = scope.get("client")
    return f"peer:{client[0] if client else '?'}"


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str, kind: str,
                  retry_after: int) -> None:
    response = problem_response(status, title, detail, kind=kind, headers={"Retry-After": str(retry_after)})
    await response(scope, receive, send)
