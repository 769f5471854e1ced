"""A findings project labelled by keyboard in a real headless Chromium: present, uncertain
and "no finding", each stored with who, how long and the per-finding scores shown; the
answer → next scan swap timed by the page itself."""

from __future__ import annotations

from django.core.management import call_command

from annotator.findings import findings_targets
from annotator.models import Annotation, FindingAnswer, LabelSet
from tests.browser.conftest import login
from tests.ml_backend.test_findings_refit import _findings_csv
from tests.conftest import run_import


def test_findings_by_keyboard(browser_page, project, users, tmp_path):
    run_import(project, _findings_csv(tmp_path, "pool", per_class=6), label_set="brain findings")
    run_import(project, _findings_csv(tmp_path, "eval"), split="eval", label_set="brain findings")
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    call_command("refit", project=project.name)        # a findings model, and its worklist
    project.refresh_from_db()
    assert project.active_model is not None
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    page = browser_page
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    page.wait_for_selector("#findings-panel:not([hidden]) li.finding")
    assert page.locator("#class-buttons").is_hidden()
    names = page.locator("li.finding .finding-name").all_inner_texts()
    assert names == ["glioma_tumor", "meningioma_tumor", "pituitary_tumor"]
    assert page.locator("li.finding .muted").first.inner_text().endswith("%)")  # p + threshold
    page.shot("findings")
    # Grad-CAM per finding: the overlay of the most probable finding, then of the one pressed
    page.keyboard.press("g")
    page.wait_for_function("document.getElementById('cam-image').naturalWidth > 0")
    assert "class=" in page.locator("#cam-image").get_attribute("src")
    page.keyboard.press("g")

    # scan 1: clear the preselection, glioma present, pituitary uncertain, save with Enter
    first = int(page.evaluate("document.body.dataset.scan"))
    for finding in page.locator("li.finding").all():        # clear what the model preselected
        while finding.get_attribute("data-state") != "absent":
            finding.click()
    page.keyboard.press("1")
    page.keyboard.press("3")
    page.keyboard.press("3")
    assert page.locator("li.finding[data-state=uncertain] .finding-name").inner_text() == \
        "pituitary_tumor"
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    answer = Annotation.objects.get(scan_id=first, reader=users["alice"])
    assert answer.outcome == "findings" and answer.duration_ms is not None
    assert answer.shown_model_version == project.active_model
    assert len(answer.shown_scores) == 3
    states = dict(answer.findings.values_list("finding__name", "state"))
    assert states == {"glioma_tumor": "present", "meningioma_tumor": "absent",
                      "pituitary_tumor": "uncertain"}

    # scan 2: "no finding" with 0 — explicit; Enter with nothing marked is refused
    second = int(page.evaluate("document.body.dataset.scan"))
    for finding in page.locator("li.finding").all():
        while finding.get_attribute("data-state") != "absent":
            finding.click()
    page.keyboard.press("Enter")
    assert "no finding" in page.locator("#status").inner_text()
    assert not Annotation.objects.filter(scan_id=second).exists()
    page.keyboard.press("0")
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    assert set(FindingAnswer.objects.filter(annotation__scan_id=second)
               .values_list("state", flat=True)) == {"absent"}
    scans, _, targets = findings_targets(label_set, split="pool")
    row = [s.pk for s in scans].index(second)
    assert targets[row].tolist() == [0, 0, 0]
    swaps = page.evaluate("window.medlabel.timings")
    assert len(swaps) == 2 and all(ms > 0 for ms in swaps)
    assert page.js_errors == []
