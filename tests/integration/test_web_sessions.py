"""The web pages' sessions and forms, over the real app and PostgreSQL (no browser needed for
what the HTTP exchange shows): the cookie's attributes, what ends a session, CSRF on every form,
where `next` may lead, and that a token never lands in a URL or the access log."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import SecretStr

import api.web
from api.app import create_app
from api.web.rendering import PageRoute
from tests.harness.api import ADMIN_KEY, TenantClient, api_settings, new_tenant
from tests.harness.toy_kind import TOY_UNIT_TABLE, register_watched_toy, run_watched_toy, submit_watched_toy


@pytest.fixture
def web(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(database_url, tmp_path / "documents")),
                    raise_server_exceptions=False) as client:
        yield client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(web: TestClient, secret: str, next: str = "") -> object:
    form = web.get("/sign-in")
    return web.post("/sign-in", data={"secret": secret, "csrf_token": csrf_of(form.text), "next": next},
                    follow_redirects=False)


def test_signing_in_sets_an_httponly_samesite_cookie_with_an_expiry_and_no_token_in_it(
    web: TestClient, tenant: TenantClient
) -> None:
    answer = sign_in(web, tenant.token)

    assert (answer.status_code, answer.headers["location"]) == (303, "/portfolio")
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=28800" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the HTTPS test
    assert tenant.token not in cookie and tenant.token.removeprefix("rqc_") not in cookie


def test_over_https_the_session_cookie_is_secure(database_url: str, tmp_path: Path, tenant: TenantClient) -> None:
    app = create_app(api_settings(database_url, tmp_path / "documents"))
    with TestClient(app, base_url="https://testserver") as web:
        assert "Secure" in sign_in(web, tenant.token).headers["set-cookie"]


def test_a_wrong_secret_is_refused_with_the_form_again_and_no_signed_in_session(
    web: TestClient, tenant: TenantClient
) -> None:
    answer = sign_in(web, tenant.token + "x")

    assert answer.status_code == 401
    assert "not valid" in answer.text
    assert web.get("/portfolio", follow_redirects=False).headers["location"].startswith("/sign-in")


def test_a_page_without_a_session_sends_the_visitor_to_sign_in_and_back_afterwards(
    web: TestClient, tenant: TenantClient
) -> None:
    path = f"/properties/{tenant.property_ids[0]}"
    first = web.get(path, follow_redirects=False)
    assert (first.status_code, first.headers["location"]) == (303, "/sign-in?next=%2Fproperties%2F" +
                                                              str(tenant.property_ids[0]))
    assert sign_in(web, tenant.token, next=path).headers["location"] == path


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "portfolio"])
def test_next_never_leads_off_the_site(web: TestClient, tenant: TenantClient, target: str) -> None:
    assert sign_in(web, tenant.token, next=target).headers["location"] == "/portfolio"


def test_every_form_posted_without_the_sessions_csrf_token_is_refused(web: TestClient, tenant: TenantClient) -> None:
    sign_in(web, tenant.token)
    prop = tenant.property_ids[0]
    refused = [
        web.post("/sign-out", data={"csrf_token": "forged"}),
        web.post(f"/properties/{prop}/documents", data={"csrf_token": "forged", "key": "k" * 16,
                                                        "requirement_code": "epc"},
                 files={"file": ("a.txt", b"EPC certificate", "text/plain")}),
        web.post(f"/properties/{prop}/documents/1/delete", data={"key": "k" * 16}),
    ]
    assert [r.status_code for r in refused] == [403, 403, 403]
    assert all("Form refused" in r.text for r in refused)
    assert web.get("/portfolio").status_code == 200  # still signed in: the forged sign-out did nothing


def test_revoking_the_token_a_session_signed_in_with_ends_the_session(
    web: TestClient, tenant: TenantClient, database_url: str
) -> None:
    sign_in(web, tenant.token)
    assert web.get("/portfolio").status_code == 200
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE client_tokens SET revoked_at = now() WHERE client_id = %s", [tenant.client_id])

    assert web.get("/portfolio", follow_redirects=False).headers["location"].startswith("/sign-in")


def test_an_admin_session_ends_when_its_key_is_no_longer_configured(database_url: str, tmp_path: Path) -> None:
    settings = api_settings(database_url, tmp_path / "documents")
    with TestClient(create_app(settings)) as before:
        sign_in(before, ADMIN_KEY)
        assert before.get("/admin/queue").status_code == 200
        cookie = before.cookies.get("recalq_session")
    rotated = settings.model_copy(update={"admin_api_keys": (SecretStr("another-admin-key-" + "y" * 20),)})
    with TestClient(create_app(rotated)) as after:
        after.cookies.set("recalq_session", cookie)
        assert after.get("/admin/queue", follow_redirects=False).headers["location"].startswith("/sign-in")


def test_a_tampered_cookie_is_no_session(web: TestClient, tenant: TenantClient) -> None:
    sign_in(web, tenant.token)
    kid, _, signed = web.cookies.get("recalq_session").partition(".")
    body, _, rest = signed.partition(".")  # itsdangerous: payload.timestamp.signature
    forged = body[:-4] + ("AAAA" if not body.endswith("AAAA") else "BBBB")
    web.cookies.clear()
    web.cookies.set("recalq_session", f"{kid}.{forged}.{rest}")
    assert web.get("/portfolio", follow_redirects=False).status_code == 303


def test_a_client_on_an_admin_page_is_told_it_is_not_for_this_account(web: TestClient, tenant: TenantClient) -> None:
    sign_in(web, tenant.token)
    answer = web.get("/admin/queue")
    assert answer.status_code == 403
    assert "Not for this account" in answer.text


def test_the_token_never_appears_in_a_url_or_the_access_log(
    web: TestClient, tenant: TenantClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        answer = sign_in(web, tenant.token)
        web.get(answer.headers["location"])
    assert tenant.token not in caplog.text
    assert all(tenant.token not in str(r.url) for r in [answer, *answer.history])


def test_signing_out_turns_the_session_anonymous(web: TestClient, tenant: TenantClient) -> None:
    page = web.get("/portfolio") if sign_in(web, tenant.token) else None
    assert page is not None and page.status_code == 200
    out = web.post("/sign-out", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/sign-in?signed_out=true")
    assert web.get("/portfolio", follow_redirects=False).status_code == 303


def test_a_signed_in_page_streams_its_own_jobs_events_with_the_session_cookie_and_no_one_elses(
    web: TestClient, tenant: TenantClient, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_watched_toy(conn)
        conn.execute(TOY_UNIT_TABLE)
    mine = submit_watched_toy(database_url, tenant.client_id, units=1)
    theirs = submit_watched_toy(database_url, new_tenant(database_url).client_id, units=1)
    run_watched_toy(database_url, mine)
    assert web.get(f"/api/jobs/{mine}/events").status_code == 401  # no session yet

    sign_in(web, tenant.token)
    with web.stream("GET", f"/api/jobs/{mine}/events") as stream:
        body = "".join(stream.iter_text())
    assert stream.status_code == 200
    assert "event: snapshot" in body and "event: complete" in body
    assert web.get(f"/api/jobs/{theirs}/events").status_code == 404


def test_every_form_on_a_page_carries_its_own_idempotency_key(web: TestClient, tenant: TenantClient) -> None:
    sign_in(web, tenant.token)
    prop = tenant.property_ids[0]
    for name in ("a.txt", "b.txt"):
        web.post(f"/properties/{prop}/documents", data={"csrf_token": csrf_of(web.get("/portfolio").text),
                                                        "key": uuid.uuid4().hex, "requirement_code": "epc"},
                 files={"file": (name, f"EPC certificate {name}".encode(), "text/plain")})
    page = web.get(f"/properties/{prop}").text
    keys = re.findall(r'name="key" value="([^"]+)"', page)
    assert len(keys) == 3 and len(set(keys)) == 3  # two deletes and the upload
    first, second = re.findall(r'action="(/properties/\d+/documents/\d+/delete)"', page)
    csrf = csrf_of(page)
    answers = [web.post(action, data={"csrf_token": csrf, "key": key}, follow_redirects=False)
               for action, key in ((first, keys[0]), (second, keys[1]))]
    assert [a.status_code for a in answers] == [303, 303]  # both deletes from one rendered page


def test_a_reject_reason_of_only_spaces_is_refused_with_a_readable_page(
    web: TestClient, tenant: TenantClient, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        [document_id] = conn.execute(
            "INSERT INTO documents (property_id, requirement_code, status, file_name, size_bytes, sha256, source) "
            "VALUES (%s, 'epc', 'pending_verification', 'e.pdf', 1, repeat('a', 64), 'client') RETURNING id",
            [tenant.property_ids[0]]).fetchone()
    sign_in(web, ADMIN_KEY)
    page = web.get("/admin/documents").text
    answer = web.post(f"/admin/documents/{document_id}/reject",
                      data={"csrf_token": csrf_of(page), "key": uuid.uuid4().hex, "reason": "   "})
    assert answer.status_code == 422 and "Invalid input" in answer.text


def test_a_form_sent_after_the_session_ended_comes_back_to_its_page_after_sign_in(
    web: TestClient, tenant: TenantClient
) -> None:
    path = f"/properties/{tenant.property_ids[0]}"
    answer = web.post(f"{path}/documents/1/delete", data={"key": uuid.uuid4().hex},
                      headers={"Referer": f"http://testserver{path}"}, follow_redirects=False)
    assert answer.headers["location"] == "/sign-in?next=" + path.replace("/", "%2F")
    fragment = web.get(f"/portfolio/rows/{tenant.property_ids[0]}", headers={"HX-Request": "true"},
                       follow_redirects=False)
    assert fragment.status_code == 204 and fragment.headers["HX-Redirect"].startswith("/sign-in?next=")


@pytest.mark.parametrize("referer", ["javascript:alert(1)", "https://evil.example/page"])
def test_go_back_never_leads_off_the_site(web: TestClient, tenant: TenantClient, referer: str) -> None:
    sign_in(web, tenant.token)
    answer = web.get("/properties/999999", headers={"Referer": referer})
    assert answer.status_code == 404
    assert "Go back" not in answer.text and referer not in answer.text


def test_every_page_form_route_refuses_a_post_without_the_csrf_token(web: TestClient, tenant: TenantClient) -> None:
    """Read from every page module's routes, so a form added later is held to it too."""
    posts = sorted(route.path for module in pkgutil.iter_modules(api.web.__path__)
                   for route in getattr(importlib.import_module(f"api.web.{module.name}"), "router", APIRouter()).routes
                   if isinstance(route, PageRoute) and "POST" in route.methods)
    assert len(posts) >= 9, posts
    refused = {}
    for path in posts:
        concrete = re.sub(r"\{[a-z_]+\}", "1", path)
        as_admin = path.startswith("/admin/")
        web.cookies.clear()
        if path != "/sign-in":
            sign_in(web, ADMIN_KEY if as_admin else tenant.token)
        answer = web.post(concrete, data={"csrf_token": "forged", "key": uuid.uuid4().hex, "secret": tenant.token,
                                          "reason": "r", "requirement_code": "epc", "address": "1 High St"},
                          files={"file": ("a.txt", b"EPC certificate", "text/plain")}, follow_redirects=False)
        refused[path] = answer.status_code
    assert set(refused.values()) == {403}, refused
