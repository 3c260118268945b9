"""Stream tokens: bound to one job and one purpose, signed by keys every API process shares,
refused when expired, tampered, another job's or another purpose's, or signed by a retired key."""

from __future__ import annotations

import psycopg
import pytest

from api.stream_tokens import StreamTokens, TokenRefused, rotate


def tokens(database_url: str, **kwargs: float) -> StreamTokens:
    return StreamTokens(lambda: psycopg.connect(database_url), **kwargs)


def test_a_token_signed_by_one_process_opens_the_stream_on_another(database_url: str) -> None:
    token = tokens(database_url).sign(7, "client:3")

    claim = tokens(database_url).verify(token, 7)

    assert (claim.job_id, claim.owner, claim.purpose) == (7, "client:3", "stream")


@pytest.mark.parametrize("why", ["another job", "another purpose", "tampered", "expired", "no key id"])
def test_a_token_is_refused_when(why: str, database_url: str) -> None:
    signer = tokens(database_url)
    token = signer.sign(7, "client:3", purpose="download" if why == "another purpose" else "stream")
    checker = tokens(database_url, lifetime_s=-1) if why == "expired" else tokens(database_url)
    if why == "tampered":
        token = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    if why == "no key id":
        token = token.split(".", 1)[1]

    with pytest.raises(TokenRefused):
        checker.verify(token, 8 if why == "another job" else 7)


def test_after_a_rotation_old_tokens_verify_until_the_old_key_retires_and_then_are_refused(
    database_url: str
) -> None:
    old = tokens(database_url).sign(7, "client:3")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_signing_key SET created_at = created_at - interval '1 minute'")
        rotate(conn)  # the old key keeps verifying for a token's lifetime
    new = tokens(database_url).sign(7, "client:3")
    assert new.split(".")[0] != old.split(".")[0], "the newest key signs"
    assert tokens(database_url).verify(old, 7).owner == "client:3"

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_signing_key SET retired_at = now() - interval '1 second' "
                     "WHERE retired_at IS NOT NULL")

    with pytest.raises(TokenRefused):
        tokens(database_url).verify(old, 7)
    assert tokens(database_url).verify(new, 7).job_id == 7
