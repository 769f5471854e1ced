"""The label page's model status line in a real browser: "Model updating…" while a training
run is queued or running (polled every 2 s, and not at all otherwise), then what came of it;
the novelty warning and the model notice when the payload carries them."""

from __future__ import annotations

import pytest
from django.utils import timezone

from annotator import label_page
from annotator import services as annotator_services
from ml_backend.models import ModelVersion, QueryItem, QueryRound, TrainingRun
from tests.base import FIXTURES
from tests.browser.conftest import login
from tests.conftest import run_import

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def round_project(project):
    """Ten unlabeled pool scans, two classes, and a round holding them (no model needed)."""
    run_import(project, FIXTURES / "brain_mri" / "eval" / "no_tumor", layout="flat",
               dataset_name="brain")
    for name in ("no_tumor", "pituitary_tumor"):
        annotator_services.label_class_get_or_create(project=project, name=name)
    query_round = QueryRound.objects.create(project=project, strategy="random", size=10)
    for rank, scan in enumerate(project.scans.order_by("pk"), start=1):
        QueryItem.objects.create(query_round=query_round, scan=scan, rank=rank, score=0.5,
                                 reason={"why": "test"})
    return project


def status_requests(page) -> list[str]:
    seen: list[str] = []
    page.on("request", lambda r: seen.append(r.url) if "/model-status/" in r.url else None)
    return seen


def wait_ready(page) -> None:
    page.wait_for_function("window.medlabel && window.medlabel.payload && document.body.dataset.scan")


def status_text(page) -> str:
    return page.inner_text("#model-status")


def test_the_status_line_follows_a_refit_and_stops_polling(browser_page, round_project, users):
    page, project = browser_page, round_project
    polls = status_requests(page)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    wait_ready(page)
    page.wait_for_timeout(3000)
    assert status_text(page) == ""
    assert len(polls) == 1                     # asked once on load; nothing is running

    # an answer whose response says a refit is queued
    run = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    scan = page.evaluate("document.body.dataset.scan")
    page.keyboard.press(page.evaluate("window.medlabel.payload.classes[0].key"))
    page.wait_for_function(f"document.body.dataset.scan !== '{scan}'")
    page.wait_for_function("document.getElementById('model-status').textContent.startsWith('Model updating')")
    line = page.locator("#model-status")
    assert line.get_attribute("role") == "status" and line.get_attribute("aria-live") == "polite"
    assert page.evaluate("window.medlabel.lastUpdating") is True
    TrainingRun.objects.filter(pk=run.pk).update(status="running", progress=0.5,
                                                 started_at=timezone.now())
    page.wait_for_function("document.getElementById('model-status').textContent.includes('50%')",
                           timeout=10_000)
    page.shot("1-updating")

    # the refit ends: its version is promoted
    model = ModelVersion.objects.create(project=project, kind="classifier", version="clf-8",
                                        status="active", promoted_at=timezone.now(),
                                        status_reason="first classifier: promoted")
    project.active_model = model
    project.save(update_fields=["active_model"])
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded", progress=1.0,
                                                 model_version=model, finished_at=timezone.now())
    page.wait_for_function("document.getElementById('model-status').textContent === 'Model clf-8 is now active'",
                           timeout=10_000)
    page.shot("2-promoted")
    settled = len(polls)
    page.wait_for_timeout(4500)
    assert len(polls) == settled               # not updating: no more polling

    # a second refit is held back by the gate (seen by polling alone: another reader's answer)
    run = TrainingRun.objects.create(project=project, kind=TrainingRun.Kind.REFIT)
    scan = page.evaluate("document.body.dataset.scan")
    page.keyboard.press("s")
    page.wait_for_function(f"document.body.dataset.scan !== '{scan}'")
    page.wait_for_function("document.getElementById('model-status').textContent.startsWith('Model updating')")
    held = ModelVersion.objects.create(project=project, kind="classifier", version="clf-9",
                                       status="ready",
                                       status_reason="not promoted: F1 dropped for no_tumor")
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded", model_version=held,
                                                 finished_at=timezone.now())
    page.wait_for_function("document.getElementById('model-status').textContent.includes('held back')",
                           timeout=10_000)
    assert status_text(page) == "clf-9 was held back: F1 dropped for no_tumor"
    page.shot("3-held-back")
    assert not page.js_errors, page.js_errors


def test_novelty_warning_and_model_notice(browser_page, round_project, users, monkeypatch):
    page, project = browser_page, round_project
    model = ModelVersion.objects.create(project=project, kind="classifier", version="clf-3",
                                        status="active", promoted_at=timezone.now())
    classes = list(project.label_classes.order_by("pk"))
    real_payload = label_page.label_payload
    flags = {"ood": True}

    def payload_with_novelty(**kwargs):
        payload = real_payload(**kwargs)
        payload["suggestion"] = {
            "model_version": model.version, "class_id": classes[0].pk,
            "class_name": classes[0].name, "confidence": 0.91, "calibrated": True,
            "top": [{"class_id": c.pk, "name": c.name, "p": p}
                    for c, p in zip(classes, (0.91, 0.09))]}
        if flags["ood"]:
            payload["novelty"] = {"ood": True, "percentile": 99.7,
                                  "message": "This scan is far from every scan the model was trained on."}
            payload["model_notice"] = "clf-4 was held back: F1 dropped for no_tumor"
        return payload

    monkeypatch.setattr(label_page, "label_payload", payload_with_novelty)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    wait_ready(page)
    warning = page.locator("#novelty-warning")
    assert warning.is_visible()
    assert warning.inner_text() == "This scan is far from every scan the model was trained on."
    assert "not-confident" in page.get_attribute("#suggestion-card", "class")
    assert page.inner_text("#suggestion-text").startswith("not confident: no_tumor")
    assert page.locator("#suggestion-caution").is_visible()
    assert page.inner_text("#suggestion-caution") == (
        "The model has not seen scans like this; treat its suggestion with care")
    assert page.locator(".class-button.suggested").count() == 0
    assert page.inner_text("#model-notice") == "clf-4 was held back: F1 dropped for no_tumor"
    page.shot("1-novelty")

    # the next scan is an ordinary one: no warning, the suggestion as usual
    flags["ood"] = False
    scan = page.evaluate("document.body.dataset.scan")
    page.keyboard.press("s")
    page.wait_for_function(f"document.body.dataset.scan !== '{scan}'")
    assert not warning.is_visible() and not page.locator("#model-notice").is_visible()
    assert not page.locator("#suggestion-caution").is_visible()
    assert "not-confident" not in page.get_attribute("#suggestion-card", "class")
    assert page.inner_text("#suggestion-text").startswith("no_tumor")
    assert page.locator(".class-button.suggested").count() == 1
    assert not page.js_errors, page.js_errors


def test_a_scan_no_label_set_applies_to_says_so_instead_of_no_model_yet(browser_page, project,
                                                                       users):
    """A slide in a project whose sets take chest and brain scans: the suggestion card said
    "No model yet" (though a model may exist); it says why there is no suggestion."""
    annotator_services.label_set_create(project=project, name="Chest X-ray", body_parts="CHEST")
    annotator_services.label_set_create(project=project, name="Brain MRI", body_parts="BRAIN")
    run_import(project, FIXTURES / "brain_mri" / "eval" / "no_tumor", layout="flat",
               dataset_name="slides")
    scan = project.scans.filter(label_set__isnull=True).first()
    assert scan is not None
    page = browser_page
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/label/{scan.pk}/")
    wait_ready(page)
    assert "no label set applies to this scan" in page.inner_text("#suggestion-text")
    assert "No model yet" not in page.inner_text("#suggestion-text")
    assert "No label set applies" in page.inner_text("#label-set")
