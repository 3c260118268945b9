"""Signed, job- and purpose-bound tokens for URLs a browser opens without headers.

An EventSource cannot send Authorization, so a job's `stream_url` carries a token instead of
the caller's credential (which must never appear in a URL). The token says: this job, this
purpose ("stream"; a download token is another purpose and does not open a stream), this owner,
signed at this time. It is checked on connect, where the owner is re-checked against the job
and the owner's credential against revocation; it lives at least 15 minutes.

Keys live in `api_signing_key`, shared by every API process; a token names the key that signed
it (`<kid>.<signature>`), the newest active key signs, a retired key verifies until its
retired_at. itsdangerous does the signing and the timestamp.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import psycopg
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from api.queries import QUERIES

#: How long a token opens its stream (DESIGN: at least 15 minutes).
TOKEN_LIFETIME_S = 30 * 60
#: How often a process re-reads the keys (a rotation reaches every process within this).
KEY_REFRESH_S = 60.0
#: The least time between two re-reads forced by a token naming a key this process lacks.
FORCED_REFRESH_S = 5.0


class TokenRefused(Exception):
    """The token does not open this job's stream; `reason` says why (for the log, not the caller)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StreamClaim:
    job_id: int
    owner: str
    purpose: str


class StreamTokens:
    """`connect` opens a connection of its own (not a pooled one): a key refresh happens inside
    requests that already hold a pooled connection, and must never wait for a second one."""

    def __init__(self, connect: object, lifetime_s: float = TOKEN_LIFETIME_S,
                 rotation_grace_s: float = TOKEN_LIFETIME_S) -> None:
        """`rotation_grace_s`: how long a key replaced by a new one keeps verifying (the longest
        anything it signed lives: a stream token, a web session)."""
        self._grace = rotation_grace_s
        self._connect = connect
        self._lifetime = lifetime_s
        self._keys: dict[str, bytes] = {}
        self._signing_kid: str | None = None
        self._loaded_at = float("-inf")
        self._forced_at = float("-inf")
        self._lock = threading.Lock()

    # -- keys -----------------------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._loaded_at < KEY_REFRESH_S and self._signing_kid:
                return
            with self._connect() as conn:  # type: ignore[operator]
                conn.autocommit = True
                rows = _load_keys(conn)
                if not any(active for _, _, active in rows):
                    rotate(conn, grace_s=self._grace)
                    rows = _load_keys(conn)
            self._keys = {kid: secret for kid, secret, _ in rows}
            self._signing_kid = next(kid for kid, _, active in rows if active)
            self._loaded_at = time.monotonic()

    def _serializer(self, kid: str, purpose: str) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(self._keys[kid], salt=f"recalq.{purpose}")

    # -- tokens ---------------------------------------------------------------------------------
    def sign(self, job_id: int, owner: str, purpose: str = "stream") -> str:
        return self.seal(purpose, {"j": job_id, "o": owner})

    def verify(self, token: str, job_id: int, purpose: str = "stream") -> StreamClaim:
        data = self.unseal(purpose, token, max_age_s=self._lifetime)
        if data.get("j") != job_id:
            raise TokenRefused("another job's token")
        return StreamClaim(job_id=job_id, owner=str(data.get("o")), purpose=purpose)

    def seal(self, purpose: str, data: dict[str, object]) -> str:
        """Any small dict, signed for one purpose (a web session's cookie is another)."""
        self._refresh()
        assert self._signing_kid is not None
        return f"{self._signing_kid}.{self._serializer(self._signing_kid, purpose).dumps(data)}"

    def unseal(self, purpose: str, token: str, *, max_age_s: float) -> dict[str, object]:
        kid, sep, body = token.partition(".")
        if not sep:
            raise TokenRefused("malformed")
        self._refresh()
        if kid not in self._keys:
            # Signed by a key another process just made? Look, but at most every few seconds: a
            # made-up key id must not buy its sender a database round trip per request.
            if time.monotonic() - self._forced_at >= FORCED_REFRESH_S:
                self._forced_at = time.monotonic()
                self._refresh(force=True)
            if kid not in self._keys:
                raise TokenRefused("unknown or retired key")
        try:
            data = self._serializer(kid, purpose).loads(body, max_age=max_age_s)
        except SignatureExpired:
            raise TokenRefused("expired") from None
        except BadSignature:
            raise TokenRefused("bad signature or another purpose") from None
        if not isinstance(data, dict):
            raise TokenRefused("malformed")
        return data


def _load_keys(conn: psycopg.Connection) -> list[tuple[str, bytes, bool]]:
    """Every key that still verifies, newest first, with whether it is active (signs)."""
    rows = conn.execute(QUERIES["verifying_keys"]).fetchall()
    return [(r[0], bytes(r[1]), bool(r[2])) for r in rows]


def rotate(conn: psycopg.Connection, *, grace_s: float = TOKEN_LIFETIME_S) -> str:
    """Makes a new signing key; the previous active ones keep verifying for `grace_s` (a token
    they signed stays good until it would have expired anyway). Concurrent first starts of several
    processes make one key: the advisory lock serialises them and the second finds the first's."""
    with conn.transaction():
        conn.execute(QUERIES["lock_signing_keys"])
        active = conn.execute(QUERIES["fresh_signing_key"]).fetchone()
        if active is not None:
            return str(active[0])
        conn.execute(QUERIES["retire_signing_keys"], {"grace_s": grace_s})
        kid = secrets.token_urlsafe(9)
        conn.execute(QUERIES["insert_signing_key"], {"kid": kid, "secret": secrets.token_bytes(32)})
    return kid
