"""Who is calling: a client (bearer token) or an admin (X-API-Key).

Secrets are compared as SHA-256 digests with `hmac.compare_digest`, against every configured
admin key without stopping at the first match, so timing says nothing about which bytes
matched. Wrong and missing credentials get the same answer.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from services import client_tokens
from services.vocabulary import Actor, ActorType

_bearer = HTTPBearer(auto_error=False, description="A client's API token (`rqc_...`), issued at provisioning")
ADMIN_KEY_HEADER = "X-API-Key"
_api_key = APIKeyHeader(name=ADMIN_KEY_HEADER, auto_error=False, description="An admin API key (RECALQ_ADMIN_API_KEYS)")


class AdminKeys:
    """The configured admin keys, held only as digests."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    @property
    def configured(self) -> bool:
        return bool(self._digests)

    def match(self, presented: str) -> str | None:
        """The matching key's fingerprint (its digest's first 12 hex digits), or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for candidate in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = candidate
        return found.hex()[:12] if found is not None else None

    def has_fingerprint(self, fingerprint: str) -> bool:
        """A web session signed in with that key: is the key still configured?"""
        return any(hmac.compare_digest(d.hex()[:12], fingerprint) for d in self._digests)


@dataclass(frozen=True, slots=True)
class ClientCaller:
    client_id: int
    actor: Actor


@dataclass(frozen=True, slots=True)
class AdminCaller:
    actor: Actor


def _unauthorized(scheme: str, detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": scheme})


def require_admin(request: Request, key: Annotated[str | None, Depends(_api_key)]) -> AdminCaller:
    keys: AdminKeys = request.app.state.admin_keys
    if not keys.configured:
        raise HTTPException(503, "the admin API is disabled: no admin API key is configured (RECALQ_ADMIN_API_KEYS)")
    fingerprint = keys.match(key) if key else None
    if fingerprint is None:
        raise _unauthorized("ApiKey", "a valid admin key is required in the X-API-Key header")
    return AdminCaller(Actor(ActorType.ADMIN, f"key:{fingerprint}"))


def require_client(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ClientCaller:
    """Checks the token on a connection of its own, given back at once: a route that holds no
    connection while it works (a first extraction, a stream) holds none for authentication."""
    client_id = None
    if credentials:
        with request.app.state.runtime.connection() as conn:
            client_id = client_tokens.authenticate(conn, credentials.credentials)
    if client_id is None:
        raise _unauthorized("Bearer", "a valid client token is required: Authorization: Bearer <token>")
    return ClientCaller(client_id, Actor(ActorType.CLIENT, str(client_id)))


Admin = Annotated[AdminCaller, Depends(require_admin)]
Client = Annotated[ClientCaller, Depends(require_client)]


@dataclass(frozen=True, slots=True)
class WatcherCaller:
    """Who asks about a job: its owner-to-be (a client), or an admin (who owns nothing)."""

    actor: Actor
    is_admin: bool

    @property
    def owner(self) -> str | None:
        """The owner string the engine keeps on a job this caller submits."""
        return None if self.is_admin else f"{self.actor.type}:{self.actor.id}"


def require_watcher(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    key: Annotated[str | None, Depends(_api_key)],
) -> WatcherCaller:
    """A client's bearer token or an admin key; a client is preferred when both are sent."""
    if credentials:
        client = require_client(request, credentials)
        return WatcherCaller(client.actor, is_admin=False)
    if key:
        return WatcherCaller(require_admin(request, key).actor, is_admin=True)
    raise _unauthorized("Bearer", "a client token (Authorization: Bearer <token>) or an admin key (X-API-Key) "
                        "is required")


Watcher = Annotated[WatcherCaller, Depends(require_watcher)]
