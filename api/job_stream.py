"""One LISTEN connection per API process, fanned out to every job stream the process serves.

A stream holds no thread and no pooled connection: it is an asyncio task waiting on its queue.
The hub listens for `outbox_event` notifications (they carry a job id only), reads the job's
new events once, in one short query on a small async pool, and hands them to every stream of
that job. Notifications can be lost (the LISTEN connection dies, a NOTIFY is sent while it
reconnects), so whenever the connection is (re)made, and every `poll_seconds` while it is down,
the hub reads every streamed job again: a stream catches up within that time whatever happened
to the connection. While the connection lives it is checked every `poll_seconds`, and nothing
is polled (a live LISTEN connection gets every NOTIFY committed after its LISTEN). The table is
the truth; NOTIFY only wakes.

A stream that does not keep up (its queue is full: the client stopped reading) is dropped;
its client reconnects with Last-Event-ID and misses nothing.

The same connection serves other streams that only need waking: `channels` names further
channels to LISTEN on, and `watch(channel, key)` gives an event set whenever a notification of
that channel carries that key (and whenever the connection is remade, or polled while down),
after which its stream re-reads what it shows. The web page's live scores are one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from outbox.job_views import FINAL_KINDS
from outbox.queries import QUERIES

log = logging.getLogger(__name__)

#: Events a stream may have waiting before it counts as not keeping up.
QUEUE_DEPTH = 1000
CHANNEL = "outbox_event"
#: How the LISTEN connection names itself in pg_stat_activity (operators and tests find it so).
LISTEN_APPLICATION = "recalq api listen"


@dataclass(eq=False)
class Subscription:
    job_id: int
    last_seq: int
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_DEPTH))
    dropped: bool = False


@dataclass(eq=False)
class Watch:
    channel: str
    key: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the process is stopping: the stream ends instead of waiting again.
    closing: bool = False
    #: Set by whoever gave it back (its stream's clean-up runs once).
    released: bool = False


class JobStreamHub:
    def __init__(self, conninfo: str, *, poll_seconds: float = 2.0, pool_size: int = 4,
                 channels: tuple[str, ...] = ()) -> None:
        self._conninfo = conninfo
        self._channels = channels
        self._watches: dict[tuple[str, str], set[Watch]] = defaultdict(set)
        self.poll_seconds = poll_seconds
        # No check at checkout (it doubles the round trips of every read): a read on a dead
        # connection fails, the pool replaces it, and the job is read again shortly.
        self._pool = AsyncConnectionPool(conninfo, min_size=1, max_size=pool_size, open=False,
                                         kwargs={"autocommit": True}, name="recalq-streams")
        self._subs: dict[int, set[Subscription]] = defaultdict(set)
        self._reading: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    # -- life ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._pool.open(wait=False)
        self._task = asyncio.create_task(self._listen_forever(), name="job-stream-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._reading.values()):
            task.cancel()
        for subs in self._subs.values():
            for sub in subs:
                sub.queue.put_nowait(None)
        for watches in self._watches.values():
            for watch in watches:
                watch.closing = True
                watch.changed.set()
        await self._pool.close()

    # -- reads for a stream ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._pool.connection() as conn:
            yield conn

    async def fetch_one(self, query: str, params: dict[str, Any]) -> dict[str, Any] | None:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES[query], params)
            return await cur.fetchone()

    async def events_after(self, job_id: int, after_seq: int, limit: int = 500) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES["job_events_after"], {"job_id": job_id, "after_seq": after_seq, "limit": limit})
            return await cur.fetchall()

    # -- subscriptions ---------------------------------------------------------------------------
    def subscribe(self, job_id: int, last_seq: int) -> Subscription:
        sub = Subscription(job_id, last_seq)
        self._subs[job_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    def watch(self, channel: str, key: str) -> Watch:
        if channel not in self._channels:
            raise ValueError(f"this hub does not listen on {channel!r}")
        watch = Watch(channel, key)
        self._watches[(channel, key)].add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get((watch.channel, watch.key))
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[(watch.channel, watch.key)]

    def _nudge(self, channel: str, key: str) -> None:
        for watch in self._watches.get((channel, key), ()):
            watch.changed.set()

    @property
    def open_streams(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def wake(self, job_id: int) -> None:
        """New events may exist for the job: read them once for all its streams."""
        if job_id not in self._subs:
            return
        if job_id in self._reading:
            self._again.add(job_id)  # a read is under way; read once more when it is done
            return
        self._reading[job_id] = asyncio.create_task(self._deliver(job_id), name=f"job-stream-read-{job_id}")

    async def _deliver(self, job_id: int) -> None:
        try:
            while True:
                subs = self._subs.get(job_id)
                if not subs:
                    return
                after = min(s.last_seq for s in subs)
                try:
                    rows = await self.events_after(job_id, after)
                except (psycopg.Error, OSError) as exc:
                    log.warning("could not read events of job %s: %s; reading again shortly", job_id, exc)
                    asyncio.get_running_loop().call_later(0.5, self.wake, job_id)
                    return
                for sub in list(self._subs.get(job_id, ())):
                    for row in rows:
                        if row["seq"] > sub.last_seq and not sub.dropped:
                            self._hand(sub, row)
                if len(rows) < 500 and job_id not in self._again:
                    return
                self._again.discard(job_id)
        finally:
            self._reading.pop(job_id, None)

    def _hand(self, sub: Subscription, row: dict[str, Any]) -> None:
        try:
            sub.queue.put_nowait(row)
            sub.last_seq = row["seq"]
        except asyncio.QueueFull:
            # The client stopped reading: drop it rather than buffer without end or slow the
            # others; it reconnects with Last-Event-ID and misses nothing.
            sub.dropped = True
            log.info("dropped a watcher of job %s: it stopped reading (%s events waiting)", sub.job_id, QUEUE_DEPTH)
            self.unsubscribe(sub)
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    # -- the LISTEN connection -------------------------------------------------------------------
    async def _listen_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True,
                                                                 application_name=LISTEN_APPLICATION) as conn:
                    for channel in (CHANNEL, *self._channels):
                        await conn.execute(f"LISTEN {channel}")
                    self.listening.set()
                    backoff = 0.5
                    self._poll_all()  # anything sent while this connection was not listening
                    while True:
                        async for note in conn.notifies(timeout=self.poll_seconds):
                            if note.channel != CHANNEL:
                                self._nudge(note.channel, note.payload)
                                continue
                            with contextlib.suppress(ValueError):
                                self.wake(int(note.payload))
                        # While the connection lives, every committed event's NOTIFY reaches it:
                        # no poll, only a check that it does live (a half-open socket raises no
                        # error by itself). A dead one is found here within poll_seconds + 5 s.
                        await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self.listening.clear()
                log.warning("job stream LISTEN connection lost (%s); polling every %.1f s until it is back",
                            exc, self.poll_seconds)
                self._poll_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.poll_seconds)

    def _poll_all(self) -> None:
        for job_id in list(self._subs):
            self.wake(job_id)
        for watches in self._watches.values():
            for watch in watches:
                watch.changed.set()


class JobEventStream(EventSourceResponse):
    """A stream whose client stopped reading is dropped by the send timeout: that is the stream
    doing its job, not a server error, so it is one line at INFO instead of uvicorn's "Exception
    in ASGI application" traceback."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except* SendTimeoutError:
            client = scope.get("client") or ("?", 0)
            log.info("dropped the stream %s of %s:%s: it stopped reading for %ss", scope.get("path"), client[0],
                     client[1], self.send_timeout)


def is_final(row: dict[str, Any]) -> bool:
    return row["kind"] in FINAL_KINDS
