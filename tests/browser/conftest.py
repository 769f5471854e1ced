"""A real headless Chromium (Debian's package, never a downloaded browser) driven by
Playwright against Django's live test server. Screenshots go to var/screenshots/ (ignored).

`make test` installs the chromium package when it is missing (root) or says how to.
CHROMIUM_PATH overrides /usr/bin/chromium.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.base import PASSWORD, REPO

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
SCREENSHOTS = REPO / "var" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage"]


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: browser tests need Debian's chromium package "
                    "(`apt-get install -y chromium`; `make test` does this as root) or "
                    "CHROMIUM_PATH pointing at a Chromium binary.")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread while it runs; the test's own
    # ORM calls are synchronous and safe, so Django must not refuse them. Only while the
    # browser runs: later subprocesses (e.g. `check --deploy`) must not inherit the switch.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def browser_page(chromium, live_server, request):
    context = chromium.new_context(viewport={"width": 1400, "height": 900},
                                   base_url=live_server.url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.js_errors = errors
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.shot = lambda name: page.screenshot(
        path=str(SCREENSHOTS / f"{request.node.name}-{name}.png"), full_page=True)
    yield page
    context.close()


def login(page, username: str) -> None:
    page.goto("/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(lambda url: "/accounts/login/" not in url)
