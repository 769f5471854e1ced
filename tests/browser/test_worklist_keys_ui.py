"""The worklist by keyboard and on a narrow screen (tenth probe): Enter on a focused link also
asked for /projects/N/next/ (which hands the reader a scan and renews their hold on it) before
the link's own page; at 360 px the worklist table made the page scroll sideways with the
state column off screen."""

from __future__ import annotations

import pytest

from tests.browser.conftest import login
from tests.conftest import import_glioma_round

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_enter_on_a_link_follows_only_that_link(browser_page, project, users):
    import_glioma_round(project, n=6)
    page = browser_page
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/worklist/")
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url))
    link = page.locator("table.worklist tbody a").first
    target = link.get_attribute("href")
    link.focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"**{target}")
    assert not [u for u in asked if u.endswith("/next/")], asked

    # Enter on the page itself still starts labeling
    page.goto(f"/projects/{project.pk}/worklist/")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/projects/{project.pk}/label/**")
    assert not page.js_errors, page.js_errors


def test_the_worklist_and_review_fit_a_phone_width(browser_page, project, users):
    import_glioma_round(project, n=6)
    page = browser_page
    page.set_viewport_size({"width": 360, "height": 740})
    login(page, "bob")                     # a reviewer sees the worklist and the review page
    for url in (f"/projects/{project.pk}/worklist/", f"/projects/{project.pk}/review/",
                f"/projects/{project.pk}/"):
        page.goto(url)
        wide = page.evaluate("document.documentElement.scrollWidth")
        assert wide <= 361, (url, wide)
    page.goto(f"/projects/{project.pk}/worklist/")
    table = page.locator("table.worklist")
    assert page.evaluate("t => t.scrollWidth > t.clientWidth", table.element_handle())
    page.shot("worklist-360")
