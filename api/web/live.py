"""The pages' live scores: one Server-Sent Events stream per page, while something is updating.

`/portfolio/events` follows every property of the signed-in client, `/properties/{id}/events`
one of them. A stream first sends the state of each property it follows (`property`: id,
status, score), so a score that landed between the page's render and the stream's connect is
not missed; then one `property` event per change, and `settled` once nothing it follows is
updating, after which the server closes it and the page's script does not reconnect.

A stream holds no thread and no pooled connection while it waits: the API process's one LISTEN
connection hears `compliance_property` notifications (the client's id, sent by a trigger when a
score or its pending flag changes, or the property's recalculation dies) and wakes the client's
streams, which re-read their properties in one short query. If that connection is down, the
streams are woken every poll interval instead, and every stream re-reads at least every 30 s
whatever it hears.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from psycopg.rows import dict_row
from sse_starlette import ServerSentEvent
from starlette.background import BackgroundTask

from api.job_stream import JobEventStream, JobStreamHub, Watch
from api.problems import problem_response
from api.security import ClientCaller
from api.web.callers import session_caller
from services import property_views
from services.queries import QUERIES

CHANNEL = "compliance_property"
#: A stream re-reads at least this often, whatever it hears.
BACKSTOP_SECONDS = 30.0
router = APIRouter(include_in_schema=False)


@router.get("/portfolio/events")
async def portfolio_events(request: Request) -> Response:
    return await _stream(request, None)


@router.get("/properties/{property_id}/events")
async def property_events(request: Request, property_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Response:
    return await _stream(request, property_id)


async def _stream(request: Request, property_id: int | None) -> Response:
    # Off the event loop: reading a cookie may refresh the signing keys, and a client's session
    # is checked against its token's revocation (database reads).
    caller = await asyncio.to_thread(session_caller, request)
    if not isinstance(caller, ClientCaller):
        return problem_response(401, "Unauthorized", "sign in as a client to follow its scores", kind="unauthorized")
    hub: JobStreamHub = request.app.state.job_streams
    settings = request.app.state.settings
    owner = f"client:{caller.client_id}"
    streams: Counter[str] = request.app.state.streams_per_owner
    if streams[owner] >= settings.api_max_streams_per_owner:
        return problem_response(429, "Too many requests", f"at most {settings.api_max_streams_per_owner} open "
                                "streams per owner; close one", kind="too-many-streams", headers={"Retry-After": "5"})
    # Counted and watching before the first read: a change that lands while the first state is
    # read wakes the stream instead of being missed.
    streams[owner] += 1
    watch = hub.watch(CHANNEL, str(caller.client_id))
    handed_over = False
    try:
        first = await _states(hub, caller.client_id, property_id)
        if property_id is not None and not first:
            return problem_response(404, "Not found", f"property {property_id} does not exist", kind="not-found")
        release = functools.partial(_release, hub, watch, streams, owner)
        response = JobEventStream(_events(hub, watch, caller.client_id, property_id, first, release),
                                  ping=settings.api_stream_heartbeat_seconds,
                                  send_timeout=settings.api_stream_send_timeout_seconds,
                                  headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
                                  background=BackgroundTask(release))
        handed_over = True
        return response
    finally:
        if not handed_over:
            _release(hub, watch, streams, owner)


def _release(hub: JobStreamHub, watch: Watch, streams: Counter[str], owner: str) -> None:
    """Once per stream, however it ends (the response's background task, or a refusal)."""
    if watch.released:
        return
    watch.released = True
    hub.unwatch(watch)
    streams[owner] -= 1


async def _events(hub: JobStreamHub, watch: Watch, client_id: int, property_id: int | None,
                  first: dict[int, dict[str, Any]], release: Callable[[], None]) -> AsyncIterator[ServerSentEvent]:
    try:
        async for event in _changes(hub, watch, client_id, property_id, first):
            yield event
    finally:
        release()  # also the response's background task: whichever runs first


async def _changes(hub: JobStreamHub, watch: Watch, client_id: int, property_id: int | None,
                   first: dict[int, dict[str, Any]]) -> AsyncIterator[ServerSentEvent]:
    shown: dict[int, dict[str, Any]] = {}
    states = first
    while True:
        for pid, state in states.items():
            if shown.get(pid) != state:
                yield ServerSentEvent(json.dumps(state), event="property")
        shown = states
        if not any(s["status"] == property_views.UPDATING for s in states.values()):
            yield ServerSentEvent("{}", event="settled")
            return
        # A backstop beside the notifications: a change no trigger announces is still seen.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.changed.wait(), timeout=BACKSTOP_SECONDS)
        watch.changed.clear()
        if watch.closing:
            return
        states = await _states(hub, client_id, property_id)


async def _states(hub: JobStreamHub, client_id: int, property_id: int | None) -> dict[int, dict[str, Any]]:
    """id -> {property_id, status, score} of the properties the stream follows (the first page
    of the portfolio: what the page shows)."""
    async with hub.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        if property_id is None:
            await cur.execute(QUERIES["pv_properties_of_client"],
                              {"client_id": client_id, "after_id": 0, "limit": property_views.MAX_PAGE_SIZE})
        else:
            await cur.execute(QUERIES["pv_property_of_client"], {"client_id": client_id, "property_id": property_id})
        rows = await cur.fetchall()
    views = [property_views.property_from_row(row) for row in rows]
    return {v.id: {"property_id": v.id, "status": v.status, "score": v.compliance_score} for v in views}
