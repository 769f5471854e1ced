"""The label page of a reader removed from the project while it is open: their next answer
is refused and the page says why in words (not "server answered 404", as with DEBUG on
before), and the scan they had open is free for the others at once."""

from __future__ import annotations

import pytest

from annotator.auth import NOT_A_MEMBER
from annotator.models import Annotation, Membership, ScanLease
from tests.browser.conftest import login
from tests.conftest import import_glioma_round

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("debug", [True, False], ids=["DEBUG", "production"])
def test_an_answer_after_removal_says_no_longer_a_member(browser_page, project, users,
                                                         settings, debug):
    settings.DEBUG = debug
    page = browser_page
    import_glioma_round(project, n=2)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    page.wait_for_function(
        "window.medlabel && window.medlabel.payload && document.body.dataset.scan")
    scan = int(page.evaluate("document.body.dataset.scan"))
    assert ScanLease.objects.filter(scan_id=scan, user=users["alice"]).exists()
    Membership.objects.filter(project=project, user=users["alice"]).delete()   # the admin
    assert not ScanLease.objects.filter(scan_id=scan).exists()
    page.keyboard.press("1")
    page.wait_for_function("document.getElementById('status').className === 'error'")
    status = page.inner_text("#status")
    assert status == NOT_A_MEMBER, status
    assert not Annotation.objects.filter(scan_id=scan).exists()
