"""The clinician's day in a real browser: log in, work through the worklist by keyboard,
watch the model version change after the refit, toggle Grad-CAM, add an anomaly type and
confirm a candidate, classify an uploaded scan, read the reports, adjudicate as reviewer."""

from __future__ import annotations

import pytest

from annotator import services as annotator_services
from annotator.models import Annotation, LabelClass, Scan
from tests.base import FIXTURES
from tests.browser.conftest import login
from tests.conftest import brain_truth

pytestmark = [pytest.mark.django_db(transaction=True)]


def keys_by_class(page) -> dict[str, str]:
    payload = page.evaluate("window.medlabel.payload")
    return {c["name"]: c["key"] for c in payload["classes"]}


def wait_ready(page) -> None:
    """The label page's script has rendered its first scan."""
    page.wait_for_function("window.medlabel && window.medlabel.payload && document.body.dataset.scan")


def current_scan(page) -> Scan:
    page.wait_for_function("document.body.dataset.scan !== undefined")
    return Scan.objects.get(pk=int(page.evaluate("document.body.dataset.scan")))


def test_clinician_labels_by_keyboard_and_sees_the_model_improve(
        browser_page, encoded_project, users):
    page, project = browser_page, encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    # two seed labels (one per class) so the third browser label completes refit_every=5
    pool = list(project.scans.filter(split="pool").order_by("-pk"))
    for name in ("no_tumor", "pituitary_tumor"):
        seed = next(s for s in pool if brain_truth(s) == name)
        annotator_services.annotation_create(scan=seed, reader=users["bob"],
                                             label_class=classes[name])
    project.refit_every = 5
    project.save()

    login(page, "alice")
    page.click(f"text={project.name}")
    page.click("#start-labeling")
    page.wait_for_selector("table.worklist")
    page.shot("1-worklist")
    page.keyboard.press("Enter")
    wait_ready(page)
    assert page.inner_text("#model-version") == "none yet"
    assert "A typical scan of a group of" in page.inner_text("#why-text")
    assert "typical of its cluster" in page.get_attribute("#why-text", "title")
    page.shot("2-label-page")

    seen = []
    for _ in range(3):
        scan = current_scan(page)
        seen.append(scan.pk)
        page.keyboard.press(keys_by_class(page)[brain_truth(scan)])
        page.wait_for_function(f"document.body.dataset.scan !== '{scan.pk}'")
    labels = Annotation.objects.filter(reader=users["alice"], outcome="label")
    assert sorted(labels.values_list("scan_id", flat=True)) == sorted(seen)
    assert all(a.label_class.name == brain_truth(a.scan) for a in labels)
    assert all(a.duration_ms is not None and a.source == "web" for a in labels)

    project.refresh_from_db()
    assert project.active_model is not None, "the third label should have triggered a refit"
    page.wait_for_function("document.getElementById('model-version').textContent !== 'none yet'")
    assert page.inner_text("#model-version") == project.active_model.version
    # the next scan comes with the new model's suggestion and its Grad-CAM
    page.wait_for_function("window.medlabel.payload.suggestion !== null")
    assert project.active_model.version in page.evaluate(
        "window.medlabel.payload.suggestion.model_version")
    page.keyboard.press("g")
    page.wait_for_function(
        "(() => { const c = document.getElementById('cam-image');"
        " return !c.hidden && c.complete && c.naturalWidth > 0; })()")
    page.keyboard.press("+")
    assert page.inner_text("#zoom-level") == "125% of fit"
    assert "px, shown at" in page.inner_text("#native-size")
    page.shot("3-suggestion-gradcam")
    swap_ms = page.evaluate("window.medlabel.timings")
    assert len(swap_ms) == 3 and all(ms > 0 for ms in swap_ms)
    # an answer carries what was shown
    scan = current_scan(page)
    suggestion = page.evaluate("window.medlabel.payload.suggestion")
    page.keyboard.press("u")
    page.wait_for_function(f"document.body.dataset.scan !== '{scan.pk}'")
    unsure = Annotation.objects.get(scan=scan, reader=users["alice"])
    assert unsure.outcome == "unsure" and unsure.shown_model_version == project.active_model
    assert unsure.shown_suggestion_id == suggestion["class_id"]
    assert not page.js_errors, page.js_errors


def test_new_class_classify_and_reports(browser_page, encoded_project, users, tmp_path):
    page, project = browser_page, encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for scan in [s for s in pool if brain_truth(s) == "no_tumor"][:3] + \
            [s for s in pool if brain_truth(s) == "pituitary_tumor"][:3]:
        annotator_services.annotation_create(scan=scan, reader=users["bob"],
                                             label_class=classes[brain_truth(scan)])
    project.refresh_from_db()
    assert project.active_model is not None
    first_model = project.active_model
    project.gate_tolerance = 1.0     # promote the refit that learns the new class
    project.save()

    login(page, "alice")
    page.goto(project.get_absolute_url())
    page.click("#add-class")
    page.fill("input[name=name]", "cyst")
    page.fill("textarea[name=description]", "round, fluid-filled")
    page.fill("input[name=hotkey]", "y")
    page.click("#class-form button[type=submit]")
    page.wait_for_selector("text=Unlike anything labeled")
    page.shot("1-new-class")
    confirmed = []
    for index in range(3):     # refit_every is 3: the third confirmation refits
        card = page.locator(".candidate:not(.confirmed)").first
        confirmed.append(int(card.get_attribute("data-scan")))
        card.locator("button.confirm").click()
        page.wait_for_function(f"document.querySelectorAll('.candidate.confirmed').length === {index + 1}")
    cyst = LabelClass.objects.get(project=project, name="cyst")
    assert set(Annotation.objects.filter(label_class=cyst, reader=users["alice"])
               .values_list("scan_id", flat=True)) == set(confirmed)
    project.refresh_from_db()
    assert project.active_model != first_model
    assert "cyst" in [c["name"] for c in project.active_model.config["classes"]]

    # the new class is a button with its hotkey on the label page
    page.goto(f"/projects/{project.pk}/next/")
    wait_ready(page)
    assert keys_by_class(page)["cyst"] == "y"

    # classify an uploaded scan
    page.goto(f"/projects/{project.pk}/classify/")
    upload = sorted((FIXTURES / "brain_mri" / "eval" / "pituitary_tumor").iterdir())[0]
    page.set_input_files("input[name=file]", str(upload))
    page.click("#classify-form button[type=submit]")
    page.wait_for_selector("#predicted")
    assert page.evaluate("document.getElementById('classified-cam').naturalWidth") > 0
    rows = page.locator("#probabilities tbody tr")
    assert rows.count() == 3            # no_tumor, pituitary_tumor and the new cyst class
    page.shot("2-classify")

    # reports: every chart rendered
    page.goto(f"/projects/{project.pk}/reports/")
    charts = page.locator("img[data-chart]")
    assert charts.count() >= 4
    page.wait_for_function(
        "[...document.querySelectorAll('img[data-chart]')].every(i => i.complete)")
    broken = page.evaluate(
        "[...document.querySelectorAll('img[data-chart]')]"
        ".filter(i => !(i.naturalWidth > 0)).map(i => i.dataset.chart)")
    assert broken == []
    page.shot("3-reports")
    assert not page.js_errors, page.js_errors


def test_reviewer_adjudicates_a_disagreement(browser_page, project, users):
    from annotator.selectors import training_labels
    from tests.conftest import run_import

    page = browser_page
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   dataset_name="brain")
        annotator_services.label_class_get_or_create(project=project, name=name)
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    scan = project.scans.order_by("pk").first()
    annotator_services.annotation_create(scan=scan, reader=users["alice"],
                                         label_class=classes["no_tumor"])
    annotator_services.annotation_create(scan=scan, reader=users["dora"],
                                         label_class=classes["pituitary_tumor"])

    login(page, "bob")
    page.goto(project.get_absolute_url())
    page.click("text=Review")
    row = page.locator(f"#disagreements [data-scan='{scan.pk}']")
    assert "alice" in row.inner_text() and "dora" in row.inner_text()
    page.shot("1-review")
    row.locator(f"button[data-class='{brain_truth(scan)}']").click()
    page.wait_for_load_state()
    assert page.locator(f"#disagreements [data-scan='{scan.pk}']").count() == 0
    adjudication = Annotation.objects.get(scan=scan, source="adjudication")
    assert adjudication.reader == users["bob"]
    scans, class_ids = training_labels(project, split="pool")
    assert dict(zip([s.pk for s in scans], class_ids))[scan.pk] == classes[brain_truth(scan)].pk
    page.shot("2-adjudicated")
    assert not page.js_errors, page.js_errors
