"""Admission control: the API serves what its database pool can serve, sheds the rest fast,
and keeps any one caller from taking it away from the others.

Why it exists. Routes are synchronous and each holds a pooled connection for its whole run, so
an API process can do at most `pool size` requests' database work at once. Without a bound,
every further request took a thread from AnyIO's pool (40) and then waited up to the pool
timeout (10 s) for a connection; past ~40 concurrent requests every thread was waiting, and even
`/healthz` waited for a thread: throughput fell from ~400 req/s to ~5, answers took 10-30 s.

What it does, per request, before the route runs (a pure ASGI middleware, no thread held):

1. The caller's share. Callers are told apart by their credential (a digest of the bearer token
   or admin key; the peer address for anonymous calls). A caller runs at most `tenant_slots` of
   the `slots` at once; more of its requests wait (at most `tenant_queue` of them), and it may
   start at most `rate` requests per second (a token bucket of `burst`). Past the queue or the
   rate: 429 with Retry-After, at once.
2. A slot. `slots` requests run at once (the pool size by default, so none ever waits for a
   connection). The next `max_waiting` wait, at most `max_wait_seconds`, for one to free up;
   past that, or with the queue full: 503 with Retry-After, at once (429 if slots were free
   all along and only the caller's own share kept it waiting). Never a 10-second hang.
3. Fair hand-over. A freed slot goes to the waiting request whose caller runs the fewest
   requests (the oldest of those), so a caller with a deep queue never crowds out another
   caller's single request: waiting, not refusing, is how a busy caller is slowed.

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
#: Static files (the docs' and the pages' assets) never touch the database: no slot, no rate.
FREE_PREFIXES = ("/static/",)
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
    #: How many of one caller's requests may wait beyond those it runs (0: none wait).
    tenant_queue: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_waiting < 0 or self.max_wait_seconds < 0:
            raise ValueError("slots must be at least 1; max_waiting and max_wait_seconds at least 0")
        if not 1 <= self.tenant_slots <= self.slots:
            raise ValueError("tenant_slots must be between 1 and slots")
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")


class _Bucket:
    """One caller: its requests in the process (running or waiting), running, and its rate."""

    __slots__ = ("in_flight", "running", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.in_flight = 0
        self.running = 0


class _Waiter:
    __slots__ = ("bucket", "future")

    def __init__(self, bucket: _Bucket, future: asyncio.Future[None]) -> None:
        self.bucket = bucket
        self.future = future


class Admission:
    def __init__(self, app: ASGIApp, limits: AdmissionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.limits = limits
        self._clock = clock
        self._free = limits.slots
        self._waiters: list[_Waiter] = []
        self._callers: OrderedDict[str, _Bucket] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in FREE_PATHS or path.startswith(FREE_PREFIXES):
            await self.app(scope, receive, send)
            return
        bucket = self._bucket(_caller(scope))
        refusal = self._tenant_refusal(bucket)
        if refusal is not None:
            await _refuse(scope, receive, send, 429, "Too many requests", refusal[0], "rate-limited", refusal[1])
            return
        if is_stream(scope.get("path", "")):
            # A stream holds no thread and no connection for the minutes it stays open, so it
            # takes no slot (it would starve every other request); it has a cap of its own.
            await self.app(scope, receive, send)
            return
        bucket.in_flight += 1
        try:
            outcome = await self._acquire(bucket)
            if outcome == "own-share":
                await _refuse(scope, receive, send, 429, "Too many requests",
                              f"this caller kept its share of the API ({self.limits.tenant_slots} requests at once) "
                              "busy for the whole wait; retry when one has finished", "rate-limited", 1)
                return
            if outcome == "full":
                await _refuse(scope, receive, send, 503, "Service unavailable",
                              "the API is at capacity; retry after the time in Retry-After", "overloaded", 2)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self._release(bucket)
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
        most = self.limits.tenant_slots + self.limits.tenant_queue
        if bucket.in_flight >= most:
            return (f"this caller already has {bucket.in_flight} requests in progress or waiting, its share of the "
                    "API; retry when one has finished", 1)
        if bucket.tokens < 1:
            wait = math.ceil((1 - bucket.tokens) / self.limits.rate)
            return (f"this caller is over its rate of {self.limits.rate:g} requests per second", max(1, wait))
        bucket.tokens -= 1
        return None

    # -- slots --------------------------------------------------------------------------------
    def _may_run(self, bucket: _Bucket) -> bool:
        return self._free > 0 and bucket.running < self.limits.tenant_slots

    async def _acquire(self, bucket: _Bucket) -> str:
        """'admitted', 'full' (no slot within the wait, or the queue is full) or 'own-share'
        (slots were free but this caller already ran its share for the whole wait)."""
        # Waiters only exist while no slot is free or their callers are at their share, so a
        # request that may run now takes nothing from them.
        if self._may_run(bucket):
            self._take(bucket)
            return "admitted"
        if len(self._waiters) >= self.limits.max_waiting:
            return "full"
        waiter = _Waiter(bucket, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        acquired = False
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.limits.max_wait_seconds)
            acquired = True
        except TimeoutError:
            acquired = waiter.future.done() and not waiter.future.cancelled()  # handed a slot as the wait ran out
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()
            elif not acquired and not waiter.future.cancelled():
                self._release(bucket)  # handed a slot, then the caller went away: pass it on
        if acquired:
            return "admitted"
        return "own-share" if bucket.running >= self.limits.tenant_slots else "full"

    def _take(self, bucket: _Bucket) -> None:
        self._free -= 1
        bucket.running += 1

    def _release(self, bucket: _Bucket) -> None:
        """Frees the slot and hands it on: to the waiter whose caller runs the fewest requests
        (the oldest of those), so a caller with many queued requests cannot crowd out one that
        has a single request waiting."""
        bucket.running -= 1
        self._free += 1
        while self._free > 0:
            eligible = [w for w in self._waiters if not w.future.done()
                        and w.bucket.running < self.limits.tenant_slots]
            if not eligible:
                return
            chosen = min(eligible, key=lambda w: w.bucket.running)  # min() keeps the oldest of a tie
            self._waiters.remove(chosen)
            self._take(chosen.bucket)
            chosen.future.set_result(None)


def is_stream(path: str) -> bool:
    """A job's event stream (/api/jobs/{id}/events) or a page's live scores (/portfolio/events,
    /properties/{id}/events): they hold no slot while they wait."""
    return path.endswith("/events") and path.startswith(("/api/jobs/", "/portfolio/", "/properties/"))


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
