"""The reviewer's and the project admin's screens at 1280×720 and 1920×1080, in a real
browser: the review page with a disagreement to adjudicate, the readers dashboard, the
project page and the reading policy in Django admin. Each page fits the width (no sideways
scrolling), its main controls are on screen, axe-core finds no serious violation, and a
screenshot of each is kept (var/screenshots/)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from annotator import services as annotator_services
from annotator.models import Annotation, LabelClass, Project
from tests.base import FIXTURES
from tests.browser.conftest import login
from tests.browser.test_accessibility import serious_violations
from tests.conftest import brain_truth, run_import

pytestmark = [pytest.mark.django_db(transaction=True)]

SIZES = [(1280, 720), (1920, 1080)]


def fits_the_width(page) -> bool:
    return page.evaluate(
        "document.documentElement.scrollWidth <= window.innerWidth + 1")


def on_screen(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    size = page.viewport_size
    return bool(box) and box["x"] >= 0 and box["y"] >= 0 and \
        box["x"] + box["width"] <= size["width"] and box["y"] + box["height"] <= size["height"]


@pytest.mark.parametrize("size", SIZES, ids=["1280x720", "1920x1080"])
def test_reviewer_and_admin_screens_fit_and_pass_axe(browser_page, project, users, size):
    page = browser_page
    page.set_viewport_size({"width": size[0], "height": size[1]})
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        annotator_services.label_class_get_or_create(project=project, name=name)
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    scans = list(project.scans.order_by("pk")[:4])
    disputed = scans[0]
    annotator_services.annotation_create(scan=disputed, reader=users["alice"],
                                         label_class=classes["no_tumor"])
    annotator_services.annotation_create(scan=disputed, reader=users["dora"],
                                         label_class=classes["pituitary_tumor"])
    for scan in scans[1:]:                         # readings that agree, for the dashboard
        for reader in ("alice", "dora"):
            annotator_services.annotation_create(scan=scan, reader=users[reader],
                                                 label_class=classes[brain_truth(scan)])
    problems = {}

    # the reviewer adjudicates
    login(page, "bob")
    page.goto(reverse("annotator:review", args=[project.pk]))
    row = page.locator(f"#disagreements [data-scan='{disputed.pk}']")
    assert "alice" in row.inner_text() and "dora" in row.inner_text()
    button = f"#disagreements [data-scan='{disputed.pk}'] button[data-class]"
    page.locator(button).first.scroll_into_view_if_needed()
    assert fits_the_width(page) and on_screen(page, button)
    page.shot("1-review")
    problems["review"] = serious_violations(page)
    row.locator(f"button[data-class='{brain_truth(disputed)}']").click()
    page.wait_for_load_state()
    assert Annotation.objects.filter(scan=disputed, source="adjudication").exists()
    page.context.clear_cookies()

    # the project admin: readers dashboard, project page, reading policy in Django admin
    login(page, "dora")
    page.goto(reverse("annotator:readers", args=[project.pk]))
    table = page.locator("table").first
    assert "alice" in table.inner_text() and "dora" in table.inner_text()
    assert fits_the_width(page) and on_screen(page, "table")
    page.shot("2-readers")
    problems["readers"] = serious_violations(page)

    page.goto(project.get_absolute_url())
    assert fits_the_width(page) and on_screen(page, "h1")
    page.shot("3-project")
    problems["project"] = serious_violations(page)

    page.goto(reverse("admin:annotator_project_change", args=[project.pk]))
    assert fits_the_width(page), "the project's admin page scrolls sideways"
    field = page.locator("#id_readers_per_scan")
    field.scroll_into_view_if_needed()
    assert on_screen(page, "#id_readers_per_scan")
    field.fill("2")
    page.select_option("#id_disagreement_rule", "hold_out")
    page.shot("4-admin-policy")
    page.click("input[name=_save]")
    page.wait_for_load_state()
    saved = Project.objects.get(pk=project.pk)
    assert (saved.readers_per_scan, saved.disagreement_rule) == (2, "hold_out")
    assert "was changed successfully" in page.inner_text("body")

    found = {k: v for k, v in problems.items() if v}
    assert not found, found
    assert not page.js_errors, page.js_errors
