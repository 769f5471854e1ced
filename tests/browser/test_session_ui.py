"""The label page when the session ends mid-reading: the answer is refused with 401 and the
page says so, with a link to sign in again that comes back to the scan (not "network error:
nothing was lost, try again", which no retry can fix)."""

from __future__ import annotations

import pytest

from annotator.models import Annotation
from tests.browser.conftest import login
from tests.conftest import import_glioma_round

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_an_answer_after_the_session_ended_says_sign_in_again(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=2)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    page.wait_for_function("window.medlabel && window.medlabel.payload && document.body.dataset.scan")
    scan = page.evaluate("document.body.dataset.scan")
    # the session ends (signed out elsewhere, or it expired); the CSRF cookie stays
    kept = [c for c in page.context.cookies() if c["name"] != "sessionid"]
    page.context.clear_cookies()
    page.context.add_cookies(kept)
    page.keyboard.press("1")
    link = page.wait_for_selector("#status a#sign-in-again")
    status = page.inner_text("#status")
    assert "session has ended" in status and "network error" not in status, status
    href = link.get_attribute("href")
    assert href.startswith("/accounts/login/?next=") and f"%2Flabel%2F{scan}%2F" in href, href
    assert not Annotation.objects.filter(scan_id=int(scan)).exists()
    # signing in again there brings the reader back to the scan
    page.click("#sign-in-again")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "correct-horse-battery-staple")
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(f"**/label/{scan}/")
