"""Browser tests: the real app served over a loopback socket, driven by a headless Chromium.

The browser is Debian's Chromium (/usr/bin/chromium) driven by Playwright's sync API;
`playwright install` is never run (its download host is not reachable from CI). Every page is
opened in a fresh context that lets requests reach loopback only: anything else is aborted and
recorded in `page.blocked_requests`, so a test proves what a machine with no internet would see.

Fixtures:

* `browser`: one Chromium per test module (Playwright's loop must be gone before other tests run).
* `page`: a `BrowserPage` (a Playwright `Page` with the recorded `blocked_requests`,
  `console_errors`, `page_errors`, `bad_responses` and `failed_requests`, `wait_visible(...)`
  that fails with all of those, and `screenshot_as(label)`); after the
  test a full-page screenshot goes to tests/browser/screenshots/<test name>.png.
* `take_screenshot`: `take_screenshot("label")` writes <test name>--label.png mid-test
  (`full_page=False`: the viewport only).
* `live_api`: the real app (fresh database, admin key tests.harness.api.ADMIN_KEY) served by
  uvicorn; its base URL.

Every test here is marked `browser` (`pytest -m 'not browser'` leaves them out).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

HERE = Path(__file__).resolve().parent
SCREENSHOTS = HERE / "screenshots"
CHROMIUM = Path(os.environ.get("RECALQ_TEST_CHROMIUM", "/usr/bin/chromium"))
IN_CI = os.environ.get("CI", "").lower() == "true"

#: Hosts a page may reach; every other request is aborted and recorded.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    # Belt and braces behind the route below: no other name resolves, so nothing the route does
    # not see (a WebSocket, a browser-internal fetch) reaches the network either.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 15_000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, for one test module (a missing one skips; in CI, fails).
    Not for the whole session: Playwright's sync API keeps an event loop running in the main
    thread while it lives, and every later test that calls asyncio.run() would fail."""
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} is missing: the browser tests drive Debian's chromium (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class BrowserPage:
    """A Playwright page (any Page attribute works on it) and what it did, for the test to assert on."""

    page: Any
    name: str
    #: URLs the page asked for beyond loopback, aborted before they left the browser.
    blocked_requests: list[str] = field(default_factory=list)
    #: console.error messages ("text (url:line)").
    console_errors: list[str] = field(default_factory=list)
    #: Uncaught exceptions in the page.
    page_errors: list[str] = field(default_factory=list)
    #: Responses of status 400 or more ("404 http://...").
    bad_responses: list[str] = field(default_factory=list)
    #: Loopback requests that failed without an answer ("url: reason").
    failed_requests: list[str] = field(default_factory=list)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.page, attribute)

    def report(self) -> str:
        """What the page did wrong so far, for a failure message."""
        records = {"blocked requests": self.blocked_requests, "error responses": self.bad_responses,
                   "failed requests": self.failed_requests, "page errors": self.page_errors,
                   "console errors": self.console_errors}
        return "; ".join(f"{what}: {found}" for what, found in records.items() if found) or "nothing went wrong"

    def wait_visible(self, target: str | Any) -> Any:
        """Waits for a selector (or a Locator) to be visible; if it never is, fails with `report()`."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        locator = self.page.locator(target).first if isinstance(target, str) else target
        try:
            locator.wait_for(state="visible")
        except PlaywrightTimeout:
            raise AssertionError(f"{locator} never showed on {self.page.url} ({self.report()})") from None
        return locator

    def screenshot_as(self, label: str = "", full_page: bool = True) -> Path:
        """A screenshot (of the whole page, or of the viewport) at screenshots/<test name>[--<label>].png."""
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / (_file_name(self.name) + (f"--{_file_name(label)}" if label else "") + ".png")
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[BrowserPage]:
    context = browser.new_context(viewport=VIEWPORT, service_workers="block")
    context.set_default_timeout(TIMEOUT_MS)
    recorded = BrowserPage(page=None, name=request.node.name)

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname in LOOPBACK_HOSTS:
            route.continue_()
        else:
            recorded.blocked_requests.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", only_loopback)
    tab = context.new_page()
    recorded.page = tab
    tab.on("console", lambda message: message.type == "error" and recorded.console_errors.append(
        f"{message.text} ({message.location.get('url')}:{message.location.get('lineNumber')})"))
    tab.on("pageerror", lambda error: recorded.page_errors.append(str(error)))
    tab.on("response", lambda response: response.status >= 400 and recorded.bad_responses.append(
        f"{response.status} {response.url}"))
    tab.on("requestfailed", lambda failed: urlsplit(failed.url).hostname in LOOPBACK_HOSTS
           and recorded.failed_requests.append(f"{failed.url}: {failed.failure}"))
    try:
        yield recorded
    finally:
        try:
            if tab.url != "about:blank":  # a test that only used page.request has nothing to show
                recorded.screenshot_as()
        except Exception as error:  # a crashed or closed page: the test has its own failure to show
            print(f"browser conftest: no screenshot of {request.node.name}: {error}", file=sys.stderr)
        context.close()


@pytest.fixture
def take_screenshot(page: BrowserPage) -> Callable[..., Path]:
    """`take_screenshot("label", full_page=True)`: the page now, at screenshots/<test name>--label.png."""
    return page.screenshot_as


@pytest.fixture
def live_api(database_url: str, tmp_path: Path) -> Iterator[str]:
    """The real app on a fresh database, served by uvicorn on a loopback port: its base URL."""
    from tests.harness.api import api_settings
    from tests.harness.api_server import serving

    with serving(api_settings(database_url, tmp_path / "documents")) as base_url:
        yield base_url


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:150]


@pytest.fixture
def watched_page(page: BrowserPage) -> BrowserPage:
    """The page, recording every request it makes (to count its streams)."""
    page.requests_made = []  # type: ignore[attr-defined]
    page.page.on("request", lambda request: page.requests_made.append(request.url))
    return page


def streams_opened(page: BrowserPage) -> list[str]:
    """The event streams a `watched_page` opened."""
    return [url for url in page.requests_made if url.split("?")[0].endswith("/events")]


def sign_in(page: BrowserPage, base: str, secret: str, then: str = "") -> None:
    """Through the sign-in form, as a person does."""
    page.goto(f"{base}/sign-in" + (f"?next={then}" if then else ""))
    page.get_by_label(re.compile("client token")).fill(secret)
    page.get_by_role("button", name="Sign in").click()


def assert_fits_a_phone(page: BrowserPage, base: str, paths: list[str]) -> None:
    """Each page at a phone's width scrolls only down, never sideways (screenshots of each)."""
    page.set_viewport_size({"width": 390, "height": 844})
    for path in paths:
        page.goto(base + path)
        page.locator("h1").first.wait_for()
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow}px on a phone"
        page.screenshot_as("phone" + path.replace("/", "-"))
