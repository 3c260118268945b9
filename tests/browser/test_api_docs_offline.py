"""/docs (Swagger UI) and /redoc (ReDoc) render on a machine with no internet.

FastAPI's own pages load their JavaScript and CSS from a CDN and are blank offline;
api/docs_pages.py serves them from the installed fastapi-offline package. The browser here may
reach loopback only (tests/browser/conftest.py), so a page that needs anything from outside
shows it as a blocked request, and a page that does not render times out waiting for content.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import BrowserPage

OPERATION_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def operation_summaries(page: BrowserPage, base_url: str) -> list[str]:
    document = page.evaluate("url => fetch(url).then(r => r.json())", f"{base_url}/openapi.json")
    return [operation["summary"] for item in document["paths"].values()
            for method, operation in item.items() if method in OPERATION_METHODS]


#: ReDoc 2.x always shows Redocly's logo from its CDN; the pages' Content-Security-Policy
#: (api/docs_pages.py) stops the browser from asking for it, and the browser says so.
REDOCLY_LOGO_REFUSED = "'https://cdn.redoc.ly/redoc/logo-mini.svg' violates the following Content Security Policy"


def assert_nothing_from_outside_and_nothing_broken(page: BrowserPage, expected_console_errors: tuple[str, ...] = ()
                                                   ) -> None:
    assert page.blocked_requests == [], "the page asked for something beyond loopback"
    assert page.bad_responses == [], "a request of the page was answered with an error"
    assert page.failed_requests == [], "a request of the page got no answer"
    assert page.page_errors == [], "the page threw"
    unexpected = [e for e in page.console_errors if not any(known in e for known in expected_console_errors)]
    assert unexpected == [], "the page logged errors"


def test_the_swagger_ui_renders_with_no_network_beyond_loopback(page: BrowserPage, live_api: str) -> None:
    page.goto(f"{live_api}/docs")
    page.wait_visible(page.locator(".swagger-ui .info .title").filter(has_text="recalq"))
    page.wait_visible(".swagger-ui .opblock")
    page.wait_for_load_state("networkidle")

    assert page.locator(".swagger-ui .opblock").count() == len(operation_summaries(page, live_api))
    # Swagger UI's own stylesheet applied (an element alone would be there without it too).
    assert page.locator(".swagger-ui .opblock-get").first.evaluate("e => getComputedStyle(e).borderTopLeftRadius") \
        == "4px"
    assert page.title() == "recalq - Swagger UI"
    assert_nothing_from_outside_and_nothing_broken(page)


def test_the_swagger_ui_runs_an_operation_against_the_api(
        page: BrowserPage, live_api: str, take_screenshot) -> None:
    page.goto(f"{live_api}/docs")
    healthz = page.locator(".swagger-ui .opblock-get").filter(has_text="/healthz")
    page.wait_visible(healthz).locator(".opblock-summary").first.click()
    healthz.get_by_role("button", name="Try it out").click()
    healthz.get_by_role("button", name="Execute").click()
    answer = page.wait_visible(healthz.locator(".live-responses-table").filter(has_text="200"))
    assert '"status": "ok"' in answer.inner_text()
    take_screenshot("healthz-executed")
    assert_nothing_from_outside_and_nothing_broken(page)


def test_redoc_renders_with_no_network_beyond_loopback(page: BrowserPage, live_api: str, take_screenshot) -> None:
    page.goto(f"{live_api}/redoc")
    # ReDoc's rendered content, not just the <redoc> tag: the API's title and an operation's.
    page.wait_visible(page.locator("h1").filter(has_text="recalq"))
    page.wait_visible(page.locator("h2").filter(has_text="List Client Properties").first)
    page.wait_for_load_state("networkidle")
    take_screenshot("top", full_page=False)

    summaries = operation_summaries(page, live_api)
    rendered = page.locator("[data-section-id^='operation/'] h2").all_inner_texts()
    assert sorted(rendered) == sorted(summaries)
    assert page.title() == "recalq - ReDoc"
    assert_nothing_from_outside_and_nothing_broken(page, expected_console_errors=(REDOCLY_LOGO_REFUSED,))


@pytest.mark.parametrize("asset", ["swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"])
def test_the_docs_assets_are_served_without_credentials(page: BrowserPage, live_api: str, asset: str) -> None:
    response = page.request.get(f"{live_api}/static/api-docs/{asset}")
    assert response.status == 200, response.text()[:300]
    assert len(response.body()) > 1000


def test_the_swagger_ui_oauth2_redirect_page_is_served_and_loads_nothing(page: BrowserPage, live_api: str) -> None:
    """Swagger UI opens it in a pop-up during an OAuth2 login (it needs its opener, so it is not
    rendered on its own here): it is served, and all of it is inline."""
    response = page.request.get(f"{live_api}/docs/oauth2-redirect")
    assert response.status == 200
    assert "swaggerUIRedirectOauth2" in response.text()
    assert "src=" not in response.text() and "href=" not in response.text()
