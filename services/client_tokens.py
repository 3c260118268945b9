"""Client API tokens: issue, authenticate, revoke.

A token is shown once, when issued, and stored only as its SHA-256: a leaked database or
backup does not hand out working credentials. Tokens carry 256 bits of randomness, so a plain
hash (not a slow password hash) is the right tool: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from services.errors import ClientNotFound, InvalidInput, NotFound
from services.queries import QUERIES

#: Every client token starts with this, so a leaked one is easy to recognise (secret scanners).
TOKEN_PREFIX = "rqc_"


class TokenNotFound(NotFound):
    """The token does not exist, belongs to another client, or was already revoked."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token_id: int
    client_id: int
    #: The secret. It exists only in this object and in the response that shows it once.
    token: str
    label: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: int
    label: str
    created_at: datetime
    revoked_at: datetime | None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def issue_token(conn: psycopg.Connection, *, client_id: int, label: str = "") -> IssuedToken:
    if not isinstance(label, str) or len(label) > 100:
        raise InvalidInput("label must be at most 100 characters", field="label", rule="max_length_100")
    with conn.transaction():
        if conn.execute(QUERIES["client_exists"], {"client_id": client_id}).fetchone() is None:
            raise ClientNotFound(f"client {client_id} does not exist")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = conn.execute(
            QUERIES["insert_token"], {"client_id": client_id, "token_sha256": token_digest(token), "label": label}
        ).fetchone()
        assert row is not None
        return IssuedToken(token_id=row[0], client_id=client_id, token=token, label=label, created_at=row[1])


def authenticate(conn: psycopg.Connection, presented: str) -> int | None:
    """The client a presented token belongs to, or None. Never raises for a bad token."""
    found = authenticate_token(conn, presented)
    return found[1] if found is not None else None


def authenticate_token(conn: psycopg.Connection, presented: str) -> tuple[int, int] | None:
    """(token id, client id) of a live presented token, or None: a web session remembers which
    token signed it in, so revoking that token ends the session."""
    if not presented.startswith(TOKEN_PREFIX) or len(presented) > 200:
        return None
    digest = token_digest(presented)
    row = conn.execute(QUERIES["client_of_token"], {"token_sha256": digest}).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[2]), digest):
        return None
    return row[0], row[1]


def token_is_live(conn: psycopg.Connection, *, client_id: int, token_id: int) -> bool:
    return conn.execute(QUERIES["token_is_live"], {"client_id": client_id, "token_id": token_id}).fetchone() is not None


def revoke_token(conn: psycopg.Connection, *, client_id: int, token_id: int) -> None:
    with conn.transaction():
        if conn.execute(QUERIES["revoke_token"], {"token_id": token_id, "client_id": client_id}).fetchone() is None:
            raise TokenNotFound(f"client {client_id} has no live token {token_id}")


def tokens_of_client(conn: psycopg.Connection, *, client_id: int) -> list[TokenInfo]:
    if conn.execute(QUERIES["client_exists"], {"client_id": client_id}).fetchone() is None:
        raise ClientNotFound(f"client {client_id} does not exist")
    return [TokenInfo(*row) for row in conn.execute(QUERIES["tokens_of_client"], {"client_id": client_id})]
