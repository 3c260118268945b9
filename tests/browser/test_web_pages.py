"""The web pages in a real browser against a real recalq stack: `recalq api` and `recalq relay`
processes and a Celery worker subprocess on real PostgreSQL and a real broker.

Each test signs in through the page's own form, as a person would; screenshots of every page
land in tests/browser/screenshots/.
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from tests.browser.conftest import BrowserPage, assert_fits_a_phone, sign_in, streams_opened
from tests.harness.api import ADMIN_KEY, TenantClient, new_tenant
from tests.harness.system import FAST_RESCUE, System, first_broker_url, wait_until

GAS_CERTIFICATE = b"Gas Safety Record (CP12)\nThis landlord gas safety record expires on 2031-05-01.\n"


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[tuple[System, str]]:
    """Relay and API processes (no worker yet: each test starts one when it wants jobs to run)."""
    system = System(database_url, first_broker_url(), tmp_path, extra_env={
        "RECALQ_STORAGE_DIR": str(tmp_path / "documents"), "RECALQ_ADMIN_API_KEYS": ADMIN_KEY, **FAST_RESCUE,
    })
    system.start_relay()
    _, url = system.start_api()
    yield system, url
    system.stop()


@pytest.fixture
def tenant(stack: tuple[System, str]) -> TenantClient:
    system, _ = stack
    return new_tenant(system.database_url, n_properties=2)  # first scores wait for a test's worker


def test_a_client_uploads_a_document_sees_updating_and_then_the_new_score_without_a_reload(
    stack: tuple[System, str], tenant: TenantClient, watched_page: BrowserPage, tmp_path: Path
) -> None:
    system, base = stack
    page = watched_page
    system.start_worker()
    system.wait_idle(timeout=60)  # the properties' first scores
    sign_in(page, base, tenant.token)
    page.get_by_role("heading", name="Your properties").wait_for()
    page.screenshot_as("portfolio")
    property_id = tenant.property_ids[0]
    page.get_by_role("link", name="Property 0").click()
    before = page.locator(f"#property-{property_id} [data-score]").inner_text()
    system.kill(system.processes[-1])  # the worker: the recalculation waits, so "Updating…" stays up

    certificate = tmp_path / "gas-safety.txt"
    certificate.write_bytes(GAS_CERTIFICATE)
    page.get_by_label("File (PDF or text)").set_input_files(str(certificate))
    page.get_by_label("Requirement it certifies").select_option("gas_safety")
    page.get_by_label("Valid until").fill("2031-05-01")
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("Document uploaded").wait_for()
    page.locator(f"#property-{property_id}").get_by_text("Updating…").wait_for()
    page.evaluate("window.__sameDocument = true")
    page.screenshot_as("updating")

    system.start_worker()
    page.locator(f"#property-{property_id}").get_by_text("Up to date").wait_for(timeout=60_000)
    after = page.locator(f"#property-{property_id} [data-score]").inner_text()
    assert page.evaluate("window.__sameDocument") is True  # no reload: the live stream swapped it in
    assert int(after) > int(before)
    page.get_by_role("cell", name="gas-safety.txt", exact=True).wait_for()
    page.wait_for_function("window.recalqLiveSource && window.recalqLiveSource.readyState === 2")  # closed
    assert len(streams_opened(page)) <= 1, streams_opened(page)
    assert not page.page_errors and not page.blocked_requests


def test_the_portfolio_turns_updating_into_the_new_score_live_with_one_stream(
    stack: tuple[System, str], tenant: TenantClient, watched_page: BrowserPage
) -> None:
    system, base = stack
    page = watched_page
    sign_in(page, base, tenant.token)
    rows = page.locator("tbody tr")
    rows.first.wait_for()
    assert page.get_by_text("Updating…").count() == 2  # no worker yet: both first scores are pending
    page.evaluate("window.__sameDocument = true")

    system.start_worker()
    page.get_by_text("Up to date").nth(1).wait_for(timeout=60_000)
    assert page.get_by_text("Updating…").count() == 0
    assert page.evaluate("window.__sameDocument") is True
    assert all(re.fullmatch(r"\d+", rows.nth(i).locator("[data-score]").inner_text()) for i in range(2))
    assert streams_opened(page) == [f"{base}/portfolio/events"]


def test_a_dead_job_shows_on_the_admin_queue_with_its_error_and_requeue_sends_it_through(
    stack: tuple[System, str], page: BrowserPage
) -> None:
    system, base = stack
    with psycopg.connect(system.database_url, autocommit=True) as db:
        db.execute("UPDATE outbox_task SET max_attempts = 1 WHERE name = 'compliance.recalculate_property'")
    new_tenant(system.database_url, n_properties=1)  # its first recalculation is the job under test
    dying = system.start_worker(env={"RECALQ_FAULT": "recalculation.after_read_state=kill"})
    with psycopg.connect(system.database_url, autocommit=True) as db:
        wait_until(lambda: db.execute("SELECT count(*) FROM outbox_job WHERE status = 'dead'").fetchone()[0] == 1,
                   90, "the recalculation to die with its worker")
        [job_id] = db.execute("SELECT id FROM outbox_job WHERE status = 'dead'").fetchone()
    system.kill(dying)

    sign_in(page, base, ADMIN_KEY)
    page.get_by_role("heading", name="Queue").wait_for()
    page.get_by_role("link", name=re.compile("^Dead")).click()
    dead_row = page.locator(f"#job-{job_id}")
    dead_row.wait_for()
    assert "lost" in dead_row.inner_text()
    page.screenshot_as("dead-jobs")
    dead_row.get_by_role("link", name=f"#{job_id}").click()
    page.locator("#attempts").get_by_text("Lost").wait_for()
    assert "worker died or lease expired" in page.locator("#attempts").inner_text()
    page.screenshot_as("dead-job")

    system.start_worker()
    page.get_by_role("button", name="Requeue").click()
    page.get_by_role("status").get_by_text("Requeued").wait_for()
    with psycopg.connect(system.database_url, autocommit=True) as db:
        wait_until(lambda: db.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone()[0]
                   == "done", 60, "the requeued job to finish")
    page.reload()
    page.get_by_text("Done").first.wait_for()
    assert page.get_by_role("button", name="Requeue").count() == 0


def test_signing_out_ends_the_session_and_its_pages_ask_to_sign_in_again(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    _, base = stack
    sign_in(page, base, tenant.token)
    page.get_by_role("heading", name="Your properties").wait_for()
    old_cookie = _session_cookie(page)
    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("You are signed out").wait_for()

    page.goto(f"{base}/portfolio")
    assert "/sign-in" in page.url
    # The signed-in cookie itself, replayed, no longer opens anything once its token is revoked
    # (a session is bound to the token it signed in with).
    with psycopg.connect(stack[0].database_url, autocommit=True) as db:
        db.execute("UPDATE client_tokens SET revoked_at = now() WHERE client_id = %s", [tenant.client_id])
    page.context.add_cookies([{**old_cookie}])
    page.goto(f"{base}/portfolio")
    assert "/sign-in" in page.url


def test_a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    system, base = stack
    sign_in(page, base, tenant.token)
    page.get_by_role("heading", name="Your properties").wait_for()
    page.goto(f"{base}/properties/{tenant.property_ids[0]}")
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(e => e.value = 'forged')")
    page.get_by_label("File (PDF or text)").set_input_files(
        files=[{"name": "x.txt", "mimeType": "text/plain", "buffer": GAS_CERTIFICATE}])
    page.get_by_role("button", name="Upload").click()
    page.get_by_role("heading", name="Form refused").wait_for()
    assert "403" in page.locator("main").inner_text()
    with psycopg.connect(system.database_url) as db:
        assert db.execute("SELECT count(*) FROM documents").fetchone() == (0,)


def test_another_clients_property_url_shows_not_found(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    system, base = stack
    stranger = new_tenant(system.database_url, n_properties=1)
    sign_in(page, base, tenant.token)
    page.get_by_role("heading", name="Your properties").wait_for()
    page.goto(f"{base}/properties/{stranger.property_ids[0]}")
    page.get_by_role("heading", name="Not found").wait_for()
    assert "Property 0" not in page.locator("main").inner_text()


def test_a_client_sees_a_problem_from_the_api_beside_the_upload_form(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    _, base = stack
    sign_in(page, base, tenant.token, then=f"/properties/{tenant.property_ids[0]}")
    page.get_by_label("File (PDF or text)").set_input_files(
        files=[{"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}])
    page.get_by_role("button", name="Upload").click()
    problem = page.locator("#form-problem")
    problem.wait_for()
    assert "Unsupported content" in problem.inner_text()


def test_an_admin_verifies_a_document_awaiting_verification(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    system, base = stack
    answer = httpx.post(f"{base}/api/properties/{tenant.property_ids[0]}/documents", headers=tenant.headers,
                        files={"file": ("gas.txt", GAS_CERTIFICATE, "text/plain")},
                        data={"requirement_code": "gas_safety"})
    assert answer.status_code == 201, answer.text
    document_id = answer.json()["documents"][0]["id"]
    sign_in(page, base, ADMIN_KEY, then="/admin/documents")
    row = page.locator(f"#document-{document_id}")
    row.wait_for()
    page.screenshot_as("awaiting")
    row.get_by_role("button", name=f"Verify document {document_id}").click()
    page.get_by_text("Document verified").wait_for()
    with psycopg.connect(system.database_url) as db:
        assert db.execute("SELECT status::text FROM documents WHERE id = %s", [document_id]).fetchone() == \
            ("verified",)


def _session_cookie(page: BrowserPage) -> dict[str, Any]:
    [cookie] = [c for c in page.context.cookies() if c["name"] == "recalq_session"]
    return cookie



def test_the_live_part_tells_a_dropped_connection_from_a_server_that_refuses_it(
    database_url: str, tmp_path: Path, page: BrowserPage
) -> None:
    with socket.socket() as probe:  # a port to bring the API back on, where the page expects it
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    system = System(database_url, first_broker_url(), tmp_path, extra_env={
        "RECALQ_STORAGE_DIR": str(tmp_path / "documents"), "RECALQ_API_PORT": port})
    try:
        api, base = system.start_api({"RECALQ_API_PORT": port})
        tenant = new_tenant(database_url, n_properties=1)  # no worker: it stays "Updating…"
        sign_in(page, base, tenant.token)
        page.get_by_text("Updating…").wait_for()
        page.wait_for_function("window.recalqLiveSource && window.recalqLiveSource.readyState === 1")  # open

        system.kill(api, signal.SIGTERM)
        page.get_by_text("Connection lost; reconnecting…").wait_for()
        page.screenshot_as("dropped")

        with psycopg.connect(database_url, autocommit=True) as db:  # signed out elsewhere, in effect
            db.execute("UPDATE client_tokens SET revoked_at = now() WHERE client_id = %s", [tenant.client_id])
        system.start_api({"RECALQ_API_PORT": port})
        page.get_by_text("Live updates stopped: the server refused them").wait_for(timeout=30_000)
        assert page.evaluate("window.recalqLiveSource.readyState") == 2  # closed: it does not retry for ever
        page.screenshot_as("refused")
    finally:
        system.stop()


def test_the_pages_fit_a_phone_screen_without_sideways_scrolling(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    _, base = stack
    sign_in(page, base, tenant.token)
    assert_fits_a_phone(page, base, ["/portfolio", f"/properties/{tenant.property_ids[0]}"])


def test_signing_in_and_out_works_from_the_keyboard_alone(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    _, base = stack
    page.goto(f"{base}/sign-in")
    page.keyboard.type(tenant.token)  # the field has the focus on arrival
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Your properties").wait_for()
    sign_out = page.get_by_role("button", name="Sign out")
    for _ in range(10):  # Tab along the header until the sign-out button has the focus
        page.keyboard.press("Tab")
        if sign_out.evaluate("button => document.activeElement === button"):
            break
    page.keyboard.press("Enter")
    page.get_by_text("You are signed out").wait_for()


def test_an_admin_cancels_a_job_whose_kind_allows_it_and_a_recalculation_offers_no_cancel(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    from tests.harness.toy_kind import register_watched_toy, submit_watched_toy

    system, base = stack
    with psycopg.connect(system.database_url, autocommit=True) as db:
        register_watched_toy(db, queue="nobody-consumes-this")  # it waits: cancelled before it starts
        [recalculation] = db.execute("SELECT id FROM outbox_job WHERE task = 'compliance.recalculate_property' "
                                     "ORDER BY id LIMIT 1").fetchone()
    job_id = submit_watched_toy(system.database_url, tenant.client_id, units=3)

    sign_in(page, base, ADMIN_KEY, then=f"/admin/jobs/{recalculation}")
    page.get_by_role("heading", name=f"Job #{recalculation}").wait_for()
    assert page.get_by_role("button", name="Cancel").count() == 0

    page.goto(f"{base}/admin/jobs/{job_id}")
    page.get_by_role("button", name="Cancel").click()
    page.get_by_role("status").get_by_text("Cancelled").wait_for()
    assert page.locator("h1 .chip").inner_text() == "Cancelled"
    with psycopg.connect(system.database_url) as db:
        assert db.execute("SELECT status::text FROM outbox_job WHERE id = %s", [job_id]).fetchone() == ("cancelled",)
