"""Who is looking at a page: the session's client or admin, re-checked on every request.

A session outlives nothing it was made from: the client's token must still be live (one small
query), the admin's key must still be configured. Either check failing sends the person to sign
in again, exactly as an expired cookie does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.security import AdminCaller, AdminKeys, ClientCaller
from api.web.rendering import NotForYou, SignInRequired
from api.web.session import WebSession, read_session
from services import client_tokens
from services.vocabulary import Actor, ActorType


def page_session(request: Request) -> WebSession:
    session = read_session(request)
    if session is None or not (session.is_client or session.is_admin):
        raise SignInRequired()
    return session


def client_of_session(request: Request, session: Annotated[WebSession, Depends(page_session)]) -> ClientCaller:
    if not session.is_client:
        raise NotForYou()
    assert session.client_id is not None and session.token_id is not None
    with request.app.state.runtime.connection() as conn:
        live = client_tokens.token_is_live(conn, client_id=session.client_id, token_id=session.token_id)
    if not live:
        raise SignInRequired()
    return ClientCaller(session.client_id, Actor(ActorType.CLIENT, str(session.client_id)))


def admin_of_session(request: Request, session: Annotated[WebSession, Depends(page_session)]) -> AdminCaller:
    if not session.is_admin:
        raise NotForYou()
    assert session.admin_key is not None
    keys: AdminKeys = request.app.state.admin_keys
    if not keys.has_fingerprint(session.admin_key):
        raise SignInRequired()
    return AdminCaller(Actor(ActorType.ADMIN, f"key:{session.admin_key}"))


def session_caller(request: Request) -> ClientCaller | AdminCaller | None:
    """Who a request's session cookie signs in, checked as every page checks it, or None: for
    the streams, which answer 401 instead of redirecting. Reads the database (revocation):
    call it off the event loop."""
    session = read_session(request)
    if session is None:
        return None
    try:
        return client_of_session(request, session) if session.is_client else admin_of_session(request, session)
    except (SignInRequired, NotForYou):
        return None


PageClient = Annotated[ClientCaller, Depends(client_of_session)]
PageAdmin = Annotated[AdminCaller, Depends(admin_of_session)]
Session = Annotated[WebSession, Depends(page_session)]
