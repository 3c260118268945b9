"""GET /api/jobs/{id}/events: a job's Server-Sent Events.

First the state now (`snapshot`), then every change as it happens (`started`, `progress`,
`retrying`, `cancel_requested`), then one final `complete`, `error` or `cancelled`, and the
stream closes. Each event's id is its sequence number: a reconnect sends it back as
Last-Event-ID and gets exactly the events after it; one whose events were pruned gets `resync`
(the snapshot again); one at or past the final event gets 204, so a browser's EventSource stops
instead of reconnecting for ever. A comment heartbeat keeps proxies from closing an idle stream.

Authentication, for a client that cannot send headers (EventSource): the `token` of the job's
`stream_url` (this job, this purpose; its owner and revocation checked now), or else a bearer
token or an admin key in the headers (`curl -N`), or a signed-in web page's session cookie.
The handler is async end to end: an open stream holds no thread and no pooled connection.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from api.job_stream import JobEventStream, JobStreamHub, is_final
from api.problems import problem_response
from api.routes.jobs import job_state
from api.security import ADMIN_KEY_HEADER, ClientCaller
from api.stream_tokens import StreamTokens, TokenRefused
from api.web.callers import session_caller
from outbox.job_views import snapshot_from_row
from services import client_tokens
from services.queries import QUERIES as SERVICE_QUERIES

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "text/event-stream: snapshot, changes, one final event", "content": {"text/event-stream": {}}},
    204: {"description": "Last-Event-ID is at or past the job's final event: nothing more will come"},
    401: {"description": "No valid stream token, bearer token or admin key"},
    404: {"description": "Not found, or not yours (expired/deleted for the owner)"},
    429: {"description": "This owner already has its share of open streams"},
}


@router.get("/{job_id}/events", responses=STREAM_RESPONSES, response_class=Response,
            # Checked in the handler (a stream token, or these), so documented here.
            openapi_extra={"security": [{"HTTPBearer": []}, {"APIKeyHeader": []}]})
async def job_events(
    request: Request,
    job_id: Annotated[int, Path(ge=1, le=2**63 - 1)],
    token: Annotated[str | None, Query(max_length=512, description="The token of the job's stream_url")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> Response:
    hub: JobStreamHub = request.app.state.job_streams
    settings = request.app.state.settings
    caller = await _caller(request, job_id, token)
    if isinstance(caller, Response):
        return caller
    owner, is_admin = caller
    row = await hub.fetch_one("watched_job_snapshots", {"job_ids": [job_id]})
    snap = snapshot_from_row(row) if row is not None else None
    if snap is None or not (is_admin or snap.owner == owner):
        return await _not_found(hub, job_id, owner)
    if token is not None and not await _owner_can_still_sign_in(hub, snap.owner):
        return _unauthorized("the stream token's owner can no longer sign in")

    streams: Counter[str] = request.app.state.streams_per_owner
    stream_owner = owner or "admin"
    if streams[stream_owner] >= settings.api_max_streams_per_owner:
        return problem_response(429, "Too many requests", f"at most {settings.api_max_streams_per_owner} open "
                                "streams per owner; close one", kind="too-many-streams", headers={"Retry-After": "5"})

    last_seq = snap.last_seq
    live = not snap.final
    seen = _parse_seq(last_event_id)
    first_event: ServerSentEvent
    if seen is not None and not live and seen >= last_seq:
        return Response(status_code=204)
    body = job_state(snap, owner_view=not is_admin).model_dump(mode="json")
    if seen is None:
        # A finished job's snapshot carries no id: its final event follows with the last one.
        first_event = _event("snapshot", body, last_seq if live else None)
        start_after = last_seq if live else last_seq - 1
    else:
        first_kept = (await hub.fetch_one("job_first_event", {"job_id": job_id}) or {}).get("first_seq")
        if seen > last_seq or (first_kept is not None and seen < first_kept - 1):
            first_event = _event("resync", body, last_seq if live else None)
            start_after = last_seq if live else last_seq - 1
        else:
            first_event = _event("snapshot", body, None)
            start_after = seen

    sub = hub.subscribe(job_id, start_after)
    streams[stream_owner] += 1
    hub.wake(job_id)  # what came after start_after, from the table: no gap between snapshot and live

    async def events() -> Any:
        try:
            yield first_event
            while True:
                row = await sub.queue.get()
                if row is None:
                    return  # dropped (not keeping up) or the process is stopping: the client reconnects
                yield _event(row["kind"], {"seq": row["seq"], "attempt": row["attempt"], **row["data"]}, row["seq"])
                if is_final(row):
                    return
        finally:
            hub.unsubscribe(sub)
            streams[stream_owner] -= 1

    return JobEventStream(
        events(), ping=settings.api_stream_heartbeat_seconds, send_timeout=settings.api_stream_send_timeout_seconds,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _caller(request: Request, job_id: int, token: str | None) -> tuple[str | None, bool] | Response:
    """(owner, is_admin) of whoever opens the stream, or the 401 it gets."""
    if token is not None:
        tokens: StreamTokens = request.app.state.stream_tokens
        try:
            claim = await asyncio.to_thread(tokens.verify, token, job_id)
        except TokenRefused:
            return _unauthorized("the stream token is not valid for this job (expired, tampered or another's)")
        return claim.owner, False
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
        client_id = await asyncio.to_thread(_authenticate, request, presented)
        if client_id is None:
            return _unauthorized("a valid client token is required")
        return f"client:{client_id}", False
    key = request.headers.get(ADMIN_KEY_HEADER)
    if key and request.app.state.admin_keys.match(key) is not None:
        return None, True
    session = await asyncio.to_thread(_page_session, request)
    if session is not None:
        return session
    return _unauthorized("a stream token, a client token (Authorization: Bearer), an admin key or a signed-in "
                         "session is required")


def _page_session(request: Request) -> tuple[str | None, bool] | None:
    """A signed-in web page's session (its cookie): (owner, is_admin), or None."""
    caller = session_caller(request)
    if isinstance(caller, ClientCaller):
        return f"client:{caller.client_id}", False
    return (None, True) if caller is not None else None


def _authenticate(request: Request, presented: str) -> int | None:
    with request.app.state.runtime.connection() as conn:
        return client_tokens.authenticate(conn, presented)


async def _owner_can_still_sign_in(hub: JobStreamHub, owner: str) -> bool:
    kind, _, ident = owner.partition(":")
    if kind != "client" or not ident.isdigit():
        return True  # an admin's or a system's job: no client token to revoke
    async with hub.connection() as conn:
        row = await (await conn.execute(SERVICE_QUERIES["client_has_live_token"], {"client_id": int(ident)})).fetchone()
    return bool(row and row[0])


async def _not_found(hub: JobStreamHub, job_id: int, owner: str | None) -> JSONResponse:
    gone = await hub.fetch_one("job_tombstone", {"job_id": job_id})
    if gone is not None and owner is not None and gone["owner"] == owner:
        return problem_response(404, "Expired" if gone["reason"] == "expired" else "Gone",
                                f"job {job_id} is no longer available ({gone['reason']})", kind=gone["reason"])
    return problem_response(404, "Not found", f"job {job_id} does not exist", kind="not-found")


def _unauthorized(detail: str) -> JSONResponse:
    return problem_response(401, "Unauthorized", detail, kind="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def _parse_seq(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def _event(kind: str, data: dict[str, Any], seq: int | None) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, default=str, separators=(",", ":")), event=kind,
                           id=str(seq) if seq is not None else None)
