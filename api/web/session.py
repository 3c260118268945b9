"""A person's session on the web pages: one signed cookie, and the CSRF token its forms carry.

The cookie holds no credential. A client's session names the id of the token it signed in with,
so revoking that token ends the session at the next request; an admin's names the fingerprint of
its key, so removing the key from RECALQ_ADMIN_API_KEYS ends it. The cookie is signed with the
rotating keys of `api_signing_key` (the same ones as stream tokens, another purpose), so every
API process reads every other's cookie, and it expires twice over: the signature's timestamp is
checked against the session's lifetime, and the browser drops it after Max-Age. HttpOnly keeps
it from scripts, SameSite=Lax from other sites' form posts, Secure from plain HTTP when the page
is served over HTTPS.

CSRF: every session, even before sign-in, carries a random token; every form sends it back in
a hidden field and a POST without the session's token is refused. Signing in makes a new one,
so a token seen before sign-in is worthless after it.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import asdict, dataclass

from fastapi import Request, Response

from api.stream_tokens import StreamTokens, TokenRefused

COOKIE = "recalq_session"
PURPOSE = "web-session"
#: The hidden form field every page's form carries.
CSRF_FIELD = "csrf_token"


class CsrfRefused(Exception):
    """A form came back without this session's CSRF token."""


@dataclass(frozen=True, slots=True)
class WebSession:
    csrf: str
    client_id: int | None = None
    token_id: int | None = None
    admin_key: str | None = None  # the key's fingerprint, never the key

    @property
    def is_client(self) -> bool:
        return self.client_id is not None and self.token_id is not None

    @property
    def is_admin(self) -> bool:
        return self.admin_key is not None

    @classmethod
    def anonymous(cls) -> WebSession:
        return cls(csrf=secrets.token_urlsafe(32))

    def signed_in_as_client(self, client_id: int, token_id: int) -> WebSession:
        return WebSession(csrf=secrets.token_urlsafe(32), client_id=client_id, token_id=token_id)

    def signed_in_as_admin(self, fingerprint: str) -> WebSession:
        return WebSession(csrf=secrets.token_urlsafe(32), admin_key=fingerprint)



def read_session(request: Request) -> WebSession | None:
    """The session the request's cookie carries, or None (no cookie, tampered, expired)."""
    cached = getattr(request.state, "web_session", None)
    if cached is not None:
        return cached
    value = request.cookies.get(COOKIE)
    if not value:
        return None
    tokens: StreamTokens = request.app.state.stream_tokens
    try:
        data = tokens.unseal(PURPOSE, value, max_age_s=request.app.state.settings.web_session_seconds)
        session = WebSession(**{k: data.get(k) for k in ("csrf", "client_id", "token_id", "admin_key")})
    except (TokenRefused, TypeError):
        return None
    if not isinstance(session.csrf, str) or len(session.csrf) < 32:
        return None
    request.state.web_session = session
    return session


def write_session(request: Request, response: Response, session: WebSession) -> None:
    tokens: StreamTokens = request.app.state.stream_tokens
    lifetime = int(request.app.state.settings.web_session_seconds)
    response.set_cookie(COOKIE, tokens.seal(PURPOSE, asdict(session)), max_age=lifetime, httponly=True,
                        samesite="lax", secure=request.url.scheme == "https", path="/")
    request.state.web_session = session


def clear_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax")


def check_csrf(session: WebSession | None, presented: str | None) -> None:
    if session is None or not presented or not hmac.compare_digest(session.csrf.encode(), presented.encode()):
        raise CsrfRefused("this form was not sent by this site's page, or the page is too old: reload it and "
                          "try again")
