"""The evaluation pages in a real browser against a real recalq stack: `recalq relay` and
`recalq api` processes, a Celery worker on the evaluations queue and the provider simulator
over HTTP, on real PostgreSQL and a real broker.

A client starts an evaluation from the page and watches its stages advance on the job's own
event stream (one per page load); the job's id is in the URL, so a reload follows the same job;
the snapshot shows when it is done. Screenshots land in tests/browser/screenshots/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest

from recalq.provider_simulator import answer
from services.evaluations import EVALUATE_TASK, EVALUATION_QUEUE, LOOKUPS, STAGES
from tests.browser.conftest import BrowserPage, assert_fits_a_phone, sign_in, streams_opened
from tests.harness.api import TenantClient, new_tenant
from tests.harness.simulator import Simulator, simulator_in_thread
from tests.harness.system import FAST_RESCUE, System, first_broker_url

JOB_PAGE = re.compile(r".*/evaluations/jobs/(\d+)(\?.*)?$")
STAGE_KEYS = [s.key for s in STAGES]


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with simulator_in_thread(latency_seconds=0.05) as running:
        yield running


@pytest.fixture
def stack(database_url: str, tmp_path: Path, simulator: Simulator) -> Iterator[tuple[System, str]]:
    """Relay and API processes that point evaluations at the simulator (each test starts its
    evaluation worker when it wants evaluations to run)."""
    system = System(database_url, first_broker_url(), tmp_path, extra_env={
        "RECALQ_STORAGE_DIR": str(tmp_path / "documents"), "RECALQ_EVALUATION_PROVIDER_URL": simulator.url,
        "RECALQ_EVALUATION_PROVIDER_TIMEOUT_SECONDS": "30", **FAST_RESCUE,
    })
    system.start_relay()
    _, url = system.start_api()
    yield system, url
    httpx.post(f"{simulator.url}/_control/reset", timeout=5)  # no worker left waiting in a hung stage
    system.stop()


@pytest.fixture
def tenant(stack: tuple[System, str]) -> TenantClient:
    system, _ = stack
    return new_tenant(system.database_url, n_properties=2)


def job_id_of(page: BrowserPage) -> int:
    found = JOB_PAGE.match(page.url)
    assert found, f"not a job's page: {page.url}"
    return int(found.group(1))


def stage_states(page: BrowserPage) -> dict[str, str]:
    return page.evaluate("Object.fromEntries([...document.querySelectorAll('[data-stage]')]"
                         ".map(li => [li.dataset.stage, li.dataset.state]))")


def wait_current(page: BrowserPage, stage: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_selector(f"#stage-{stage}[aria-current='step'][data-state='current']", timeout=timeout_ms)


def assert_running_at(page: BrowserPage, stage: str) -> None:
    """Every stage before `stage` done, `stage` the current one (in words too), the rest waiting."""
    at = STAGE_KEYS.index(stage)
    assert stage_states(page) == {key: "done" if i < at else "current" if i == at else "waiting"
                                  for i, key in enumerate(STAGE_KEYS)}
    assert page.locator("[aria-current='step']").count() == 1
    current = page.locator(f"#stage-{stage}")
    assert "In progress" in current.inner_text()
    assert "Done" in page.locator(f"#stage-{STAGE_KEYS[0]}").inner_text()
    assert f"step {at + 1} of {len(STAGES)}" in page.locator("#job-status").inner_text()
    assert page.locator("progress#job-progress").evaluate("bar => bar.value") == at
    assert page.get_by_label("Stages finished").count() == 1  # the bar has its label


def submit_property(page: BrowserPage, name: str) -> None:
    page.get_by_label("One of your properties").select_option(label=name)
    page.get_by_role("button", name="Evaluate this property").click()
    page.wait_for_url(JOB_PAGE)


def test_a_client_starts_an_evaluation_watches_its_stages_advance_live_reloads_mid_run_and_sees_what_it_found(
    stack: tuple[System, str], tenant: TenantClient, simulator: Simulator, watched_page: BrowserPage
) -> None:
    system, base = stack
    page = watched_page
    system.start_worker(queue=EVALUATION_QUEUE)
    simulator.script("locate_address", delay_seconds=1.5)  # the page is up before the first stage ends
    simulator.script("flood_risk", hang=True)

    sign_in(page, base, tenant.token, then="/evaluations")
    page.get_by_role("heading", name="Start an evaluation").wait_for()
    page.screenshot_as("start")
    submit_property(page, "Property 0")
    job_id = job_id_of(page)
    page.get_by_text("Evaluation started.").wait_for()
    page.evaluate("window.__sameDocument = true")
    assert stage_states(page)["flood_risk"] == "waiting"  # drawn before the stages ran
    page.screenshot_as("submitted")

    wait_current(page, "flood_risk")  # the stages advanced on the stream, without a reload
    assert page.evaluate("window.__sameDocument") is True
    assert_running_at(page, "flood_risk")
    assert "Assessing flood risk" in page.locator("#job-status").inner_text()
    page.screenshot_as("mid-run")
    assert len(streams_opened(page)) == 1, streams_opened(page)

    assert "notice" not in page.url  # said once: a reload does not say "started" again
    page.reload()  # the same job, drawn from its state now: the id is in the URL
    assert job_id_of(page) == job_id
    assert page.get_by_text("Evaluation started.").count() == 0
    wait_current(page, "flood_risk", timeout_ms=15_000)
    assert_running_at(page, "flood_risk")
    page.wait_for_function("window.recalqLiveSource && window.recalqLiveSource.readyState === 1")  # following
    page.evaluate("window.__sameDocument = true")
    assert len(streams_opened(page)) == 2, streams_opened(page)  # one per load
    page.screenshot_as("reloaded")

    simulator.release("flood_risk")
    snapshot = page.locator("#snapshot")
    page.wait_visible(snapshot)
    assert page.evaluate("window.__sameDocument") is True  # swapped in, not reloaded
    expected = answer("energy_register", "Property 0")["rating"]
    assert snapshot.locator("[data-energy-rating]").inner_text() == expected
    rows = snapshot.locator("#answers tbody tr")
    assert rows.count() == len(LOOKUPS)
    assert "Rating: " + expected in snapshot.get_by_role("row", name=re.compile("energy performance")).inner_text()
    assert set(stage_states(page).values()) == {"done"}
    assert page.locator("#job-status").inner_text().startswith("Done")
    assert page.locator("progress#job-progress").evaluate("bar => [bar.value, bar.max]") == [12, 12]
    assert page.get_by_role("button", name="Cancel").count() == 0
    page.wait_for_function("window.recalqLiveSource.readyState === 2")  # closed on the final event
    assert page.locator("#live-status").inner_text() == "Evaluation done: what it found is below."
    page.screenshot_as("done")

    assert len(streams_opened(page)) == 2, streams_opened(page)  # no stream reopened at the end
    assert simulator.calls() == dict.fromkeys(LOOKUPS, 1)
    assert not page.page_errors and not page.console_errors and not page.blocked_requests, page.report()

    page.goto(f"{base}/evaluations")  # the finished evaluation is listed, and links to what it found
    page.get_by_role("link", name="Property 0").click()
    page.wait_visible("#snapshot")
    assert job_id_of(page) == job_id
    assert "notice" not in page.url

    assert_fits_a_phone(page, base, ["/evaluations", f"/evaluations/jobs/{job_id}"])


def test_submitting_again_for_a_property_whose_evaluation_is_running_lands_on_the_running_jobs_page(
    stack: tuple[System, str], tenant: TenantClient, simulator: Simulator, page: BrowserPage
) -> None:
    system, base = stack
    system.start_worker(queue=EVALUATION_QUEUE)
    simulator.script("energy_register", hang=True)
    sign_in(page, base, tenant.token, then="/evaluations")
    submit_property(page, "Property 1")
    running = job_id_of(page)
    wait_current(page, "energy_register")

    page.goto(f"{base}/evaluations")
    submit_property(page, "Property 1")
    assert job_id_of(page) == running
    page.get_by_text("An evaluation of this is already running").wait_for()
    wait_current(page, "energy_register", timeout_ms=15_000)
    page.screenshot_as("already-running")
    with psycopg.connect(system.database_url) as db:
        assert db.execute("SELECT count(*) FROM outbox_job WHERE task = %s", [EVALUATE_TASK]).fetchone() == (1,)


def test_another_clients_evaluation_job_page_shows_not_found(
    stack: tuple[System, str], tenant: TenantClient, page: BrowserPage
) -> None:
    system, base = stack
    stranger = new_tenant(system.database_url, n_properties=1)
    submitted = httpx.post(f"{base}/api/evaluations", json={"address": "7 Secret Lane, Bath"}, timeout=10,
                           headers={**stranger.headers, "Idempotency-Key": os.urandom(8).hex()})
    assert submitted.status_code == 202, submitted.text
    theirs = submitted.json()["id"]

    sign_in(page, base, tenant.token)
    page.get_by_role("heading", name="Your properties").wait_for()
    for path in (f"/evaluations/jobs/{theirs}", f"/evaluations/jobs/{theirs}/part"):
        page.goto(base + path)
        page.get_by_role("heading", name="Not found").wait_for()
        assert "Secret Lane" not in page.locator("main").inner_text()
        assert page.locator("[data-stage]").count() == 0


def test_a_failed_evaluation_shows_where_it_stopped_and_resume_carries_on_without_asking_finished_stages_again(
    stack: tuple[System, str], tenant: TenantClient, simulator: Simulator, page: BrowserPage
) -> None:
    system, base = stack
    with psycopg.connect(system.database_url, autocommit=True) as db:
        db.execute("UPDATE outbox_task SET max_attempts = 1 WHERE name = %s", [EVALUATE_TASK])
    system.start_worker(queue=EVALUATION_QUEUE)
    simulator.script("licensing", fail_next=3, status=503)  # every try of one attempt

    sign_in(page, base, tenant.token, then="/evaluations")
    page.get_by_label("Or an address you have not added").fill("12 Mill Road, York")
    page.get_by_role("button", name="Evaluate this address").click()
    page.wait_for_url(JOB_PAGE)
    failed = job_id_of(page)
    error = page.locator("#job-error")
    page.wait_visible(error)  # the final event, then the server-drawn panel: no reload
    assert "Checking landlord licensing" in error.inner_text() and "503" in error.inner_text()
    assert page.locator("#job-status").inner_text().startswith("Failed")
    failed_stage = page.locator("#stage-licensing")
    assert failed_stage.get_attribute("aria-current") == "step" and "Failed" in failed_stage.inner_text()
    assert stage_states(page)["flood_risk"] == "done" and stage_states(page)["planning"] == "waiting"
    page.screenshot_as("failed")

    page.get_by_role("button", name="Resume").click()
    page.wait_for_url(JOB_PAGE)
    assert job_id_of(page) != failed
    page.get_by_text("Resumed").first.wait_for()
    page.wait_visible("#snapshot")
    assert set(stage_states(page).values()) == {"done"}
    calls = simulator.calls()
    assert calls["licensing"] == 4 and all(calls[s] == 1 for s in LOOKUPS if s != "licensing"), calls
    assert page.get_by_role("link", name=f"job #{failed}").count() == 1  # where it carried on from
    page.screenshot_as("resumed-done")


def test_a_running_evaluation_cancelled_from_its_page_stops_after_its_stage_and_says_so_live(
    stack: tuple[System, str], tenant: TenantClient, simulator: Simulator, page: BrowserPage
) -> None:
    system, base = stack
    system.start_worker(queue=EVALUATION_QUEUE)
    simulator.script("gas_register", hang=True)
    sign_in(page, base, tenant.token, then="/evaluations")
    submit_property(page, "Property 0")
    wait_current(page, "gas_register")

    page.get_by_role("button", name="Cancel").click()
    page.get_by_text("Cancel requested: it stops after the stage it is on.").wait_for()
    assert page.locator("#job-status").inner_text().startswith("Cancelling: step 3 of 12")
    assert page.get_by_role("button", name="Cancel").count() == 0
    page.evaluate("window.__sameDocument = true")
    simulator.release("gas_register")

    page.wait_visible(page.locator("#job-error").get_by_text("Cancelled."))
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("#job-status").inner_text().startswith("Cancelled")
    assert page.locator("#stage-gas_register").get_attribute("data-state") == "stopped"
    assert page.get_by_role("button", name="Resume").count() == 1
    page.wait_for_function("window.recalqLiveSource.readyState === 2")
    page.screenshot_as("cancelled")
    assert simulator.calls().get("electrical_register", 0) == 0


def test_the_job_page_tells_a_dropped_stream_from_a_refused_one_and_carries_on_after_a_reconnect(
    database_url: str, tmp_path: Path, simulator: Simulator, watched_page: BrowserPage
) -> None:
    page = watched_page
    with socket.socket() as probe:  # a port to bring the API back on, where the page expects it
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    system = System(database_url, first_broker_url(), tmp_path, extra_env={
        "RECALQ_STORAGE_DIR": str(tmp_path / "documents"), "RECALQ_EVALUATION_PROVIDER_URL": simulator.url,
        "RECALQ_EVALUATION_PROVIDER_TIMEOUT_SECONDS": "30", "RECALQ_API_PORT": port, **FAST_RESCUE,
    })
    try:
        system.start_relay()
        system.start_worker(queue=EVALUATION_QUEUE)
        api, base = system.start_api({"RECALQ_API_PORT": port})
        tenant = new_tenant(database_url, n_properties=1)
        simulator.script("flood_risk", hang=True)
        sign_in(page, base, tenant.token, then="/evaluations")
        submit_property(page, "Property 0")
        wait_current(page, "flood_risk")
        page.evaluate("window.__sameDocument = true")

        system.kill(api, signal.SIGTERM)
        page.get_by_text("Connection lost; reconnecting…").wait_for()
        page.screenshot_as("dropped")
        api, _ = system.start_api({"RECALQ_API_PORT": port})
        page.wait_for_function("document.getElementById('live-status').textContent === ''",
                               timeout=30_000)  # reconnected by itself
        simulator.release("flood_risk")
        page.wait_visible("#snapshot")  # the events after the last one it saw, then the end
        assert page.evaluate("window.__sameDocument") is True

        simulator.script("radon", hang=True)
        page.goto(f"{base}/evaluations")
        page.get_by_label("Or an address you have not added").fill("3 Quay Street, Hull")
        page.get_by_role("button", name="Evaluate this address").click()
        wait_current(page, "radon")
        system.kill(api, signal.SIGTERM)
        page.get_by_text("Connection lost; reconnecting…").wait_for()
        with psycopg.connect(database_url, autocommit=True) as db:  # signed out elsewhere, in effect
            db.execute("UPDATE client_tokens SET revoked_at = now() WHERE client_id = %s", [tenant.client_id])
        system.start_api({"RECALQ_API_PORT": port})
        page.get_by_text("Live updates stopped: the server refused them").wait_for(timeout=30_000)
        assert page.evaluate("window.recalqLiveSource.readyState") == 2  # closed: it does not retry for ever
        page.screenshot_as("refused")
    finally:
        httpx.post(f"{simulator.url}/_control/reset", timeout=5)
        system.stop()
