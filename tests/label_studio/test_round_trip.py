"""Our project in a real Label Studio 1.23.2 and back: sync, predictions ordered least
confident first, annotations through the webhook, reconciliation of a missed webhook,
"Retrieve predictions" calling our predict, START_TRAINING queuing a refit."""

from __future__ import annotations

import json
import time

import pytest
from django.core.management import call_command

from annotator import label_studio
from annotator.models import Annotation, LabelClass, LabelStudioTask
from ml_backend.models import Prediction, TrainingRun
from tests.base import wait_for
from tests.conftest import brain_truth
from tests.label_studio.conftest import ADMIN_EMAIL

pytestmark = [pytest.mark.django_db(transaction=True)]




@pytest.fixture
def linked(encoded_project, users, linked_settings):
    """A trained project synced to Label Studio (pool scope), alice mapped by e-mail."""
    project = encoded_project
    users["alice"].email = ADMIN_EMAIL          # the Label Studio admin is alice here
    users["alice"].save()
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for name in ("no_tumor", "pituitary_tumor"):
        for scan in [s for s in pool if brain_truth(s) == name][:2]:
            Annotation.objects.create(scan=scan, reader=users["bob"], label_class=classes[name])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    assert project.active_model is not None
    project.refit_every = 1000
    project.gate_tolerance = 1.0     # promote the refit that learns from Label Studio's labels
    project.save()
    call_command("labelstudio_sync", project=project.name, create=True, scope="pool")
    project.refresh_from_db()
    return project, label_studio.client()


def test_round_trip_with_a_real_label_studio(linked, users, settings):
    project, ls = linked
    ls_id = project.label_studio_project_id
    model = project.active_model
    pool_count = project.scans.filter(split="pool").exclude(annotations__outcome="label").count()

    # tasks and predictions are visible through Label Studio's API
    remote = ls.projects.get(id=ls_id)
    assert remote.model_version == model.version
    assert 'hotkey="1"' in remote.label_config and "no_tumor" in remote.label_config
    tasks = list(ls.tasks.list(project=ls_id, fields="all"))
    assert len(tasks) == pool_count == LabelStudioTask.objects.filter(project=project).count()
    ours = {p.scan_id: p for p in Prediction.objects.filter(model_version=model)}
    for task in tasks:
        prediction = task.predictions[0]
        assert prediction.model_version == model.version
        assert prediction.score == pytest.approx(ours[task.data["scan_id"]].confidence, abs=1e-5)
        # the image is served by this site (SITE_URL), for Label Studio's browser to fetch
        assert task.data["image"].startswith(settings.SITE_URL + "/"), task.data["image"]
    # the image URL is served to a cookie-less browser
    import urllib.request

    with urllib.request.urlopen(tasks[0].data["image"], timeout=10) as response:
        assert response.status == 200 and response.read(8) == b"\x89PNG\r\n\x1a\n"

    # ordering by prediction score puts the least confident first
    ordered = label_studio._raw(ls, "GET", "api/tasks", params={
        "project": ls_id, "fields": "all",
        "query": json.dumps({"ordering": ["tasks:predictions_score"]})})
    ordered = ordered["tasks"] if isinstance(ordered, dict) else ordered
    scores = [t["predictions"][0]["score"] for t in ordered if t.get("predictions")]
    assert scores[0] == pytest.approx(min(p.confidence for p in ours.values()), abs=1e-5)
    assert scores == sorted(scores)
    views = ls.views.list(project=ls_id)
    assert any(v.data.get("title") == label_studio.VIEW_TITLE for v in views)

    # a class added here is pushed to Label Studio's labeling config by itself
    from annotator import services as annotator_services

    annotator_services.label_class_get_or_create(project=project, name="cyst")
    wait_for(lambda: 'value="cyst"' in ls.projects.get(id=ls_id).label_config,
             what="the new class in Label Studio's config")

    # running the sync again sends nothing new
    again = label_studio.sync(project, scope="pool")
    assert again["tasks_created"] == 0 and again["predictions_pushed"] == 0

    # an annotation made in Label Studio arrives through the webhook
    first = tasks[0]
    scan = project.scans.get(pk=first.data["scan_id"])
    choice = brain_truth(scan)
    made = ls.annotations.create(id=first.id, lead_time=4.25, result=[{
        "from_name": "diagnosis", "to_name": "image", "type": "choices",
        "value": {"choices": [choice]}}])
    got = wait_for(lambda: Annotation.objects.filter(source="label_studio",
                                                     external_id=str(made.id)).first(),
                   what="the webhook's annotation")
    assert got.scan == scan and got.label_class.name == choice and got.reader == users["alice"]
    assert got.duration_ms == 4250 and got.shown_model_version == model
    assert got.shown_confidence == pytest.approx(ours[scan.pk].confidence, abs=1e-5)

    # a missed webhook (ours switched off) is recovered by reconciliation, once
    hook = next(h for h in ls.webhooks.list(project=ls_id) if "/labelstudio/" in h.url)
    ls.webhooks.update(id=hook.id, url=hook.url, is_active=False)
    second, third = tasks[1], tasks[2]
    missed = ls.annotations.create(id=second.id, result=[{
        "from_name": "diagnosis", "to_name": "image", "type": "choices",
        "value": {"choices": ["pituitary_tumor"]}}])
    skipped = ls.annotations.create(id=third.id, was_cancelled=True, result=[])
    time.sleep(2)
    assert not Annotation.objects.filter(external_id__in=[str(missed.id), str(skipped.id)]).exists()
    call_command("labelstudio_reconcile", project=project.name)
    recovered = Annotation.objects.get(source="label_studio", external_id=str(missed.id))
    assert recovered.label_class.name == "pituitary_tumor" and recovered.reader == users["alice"]
    assert Annotation.objects.get(external_id=str(skipped.id)).outcome == "skip"
    before = Annotation.objects.count()
    assert label_studio.reconcile(project)["created"] == 0       # a replay changes nothing
    assert Annotation.objects.count() == before
    ls.webhooks.update(id=hook.id, url=hook.url, is_active=True)

    # "Retrieve predictions" in the Data Manager calls our predict: a task without any
    eval_scan = project.scans.filter(split="eval").first()      # no stored prediction
    created = ls.projects.import_tasks(ls_id, request=[{"data": {
        "image": label_studio.image_url(eval_scan), "scan_id": eval_scan.pk}}],
        return_task_ids=True)
    new_task = created.task_ids[0]
    label_studio._raw(ls, "POST", "api/dm/actions",
                      params={"id": "retrieve_tasks_predictions", "project": ls_id},
                      json={"selectedItems": {"all": False, "included": [new_task]}})
    task = wait_for(lambda: (lambda t: t if t.predictions else None)(
        ls.tasks.get(id=new_task)), what="predictions from our backend")
    prediction = task.predictions[0]
    assert prediction.model_version == model.version and 0 < prediction.score <= 1
    assert prediction.result[0]["value"]["choices"][0] in {"no_tumor", "pituitary_tumor"}

    # START_TRAINING from Label Studio queues a refit
    backend = next(b for b in ls.ml.list(project=ls_id) if f"/ml/{project.pk}/" in b.url)
    ls.ml.train(id=backend.id)
    run = wait_for(lambda: TrainingRun.objects.filter(
        project=project, kind="refit", params__requested_from="label_studio").first(),
        what="a refit run queued by START_TRAINING")
    run = wait_for(lambda: TrainingRun.objects.filter(pk=run.pk, status="succeeded").first(),
                   timeout=60, what="the refit to finish")

    # Label Studio's labels trained the new model, which is in our reports, and Label
    # Studio now orders by the new model's predictions
    project.refresh_from_db()
    new_model = project.active_model
    assert new_model != model and new_model.num_labels == 4 + 2      # + webhook + reconciled
    evaluation = new_model.evaluations.get()
    assert set(evaluation.report["per_class"]) == {"no_tumor", "pituitary_tumor"}
    wait_for(lambda: ls.projects.get(id=ls_id).model_version == new_model.version,
             what="Label Studio's model_version to follow ours")
    refreshed = ls.tasks.get(id=tasks[5].id)
    assert new_model.version in {p.model_version for p in refreshed.predictions}


def test_promote_and_roll_back_keep_label_studio_in_sync(linked, users):
    """A classifier the gate held back, promoted anyway from the project page, then rolled
    back in Django admin: each time Label Studio gets the active version's predictions and
    model_version, and the next sync succeeds (it used to fail with Label Studio's HTTP 400
    "Model version doesn't exist")."""
    from django.test import Client
    from django.urls import reverse

    from ml_backend.models import ModelVersion

    project, ls = linked
    ls_id = project.label_studio_project_id
    first = project.active_model
    project.gate_tolerance = 0.02
    project.save(update_fields=["gate_tolerance"])
    # a reader who swapped the two classes: the refit learns them backwards, the gate holds
    # it back (it is confidently worse on the labeled eval scans)
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    Annotation.objects.filter(scan__project=project, scan__split="pool").delete()
    swapped = {"no_tumor": "pituitary_tumor", "pituitary_tumor": "no_tumor"}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for truth, wrong in swapped.items():
        for scan in [s for s in pool if brain_truth(s) == truth][:4]:
            Annotation.objects.create(scan=scan, reader=users["bob"], label_class=classes[wrong])
    call_command("refit", project=project.name)
    held = ModelVersion.objects.filter(project=project, kind="classifier").latest("created_at")
    project.refresh_from_db()
    assert held != first and held.status == "ready" and project.active_model == first, \
        held.status_reason
    assert not Prediction.objects.filter(model_version=held).exists()

    # the project's admin promotes it anyway, from the project page
    admin = Client()
    admin.force_login(users["dora"])
    response = admin.post(reverse("annotator:model_promote", args=[project.pk, held.pk]))
    assert response.status_code == 302
    project.refresh_from_db()
    assert project.active_model == held and Prediction.objects.filter(model_version=held).exists()
    wait_for(lambda: ls.projects.get(id=ls_id).model_version == held.version,
             what="Label Studio's model_version after the promotion")
    call_command("labelstudio_sync", project=project.name, scope="pool")   # no HTTP 400
    versions = {p.model_version for t in ls.tasks.list(project=ls_id, fields="all")
                for p in t.predictions}
    assert held.version in versions

    # and rolls it back in Django admin
    response = admin.post(reverse("admin:ml_backend_modelversion_changelist"),
                          {"action": "roll_back", "_selected_action": [held.pk]})
    assert response.status_code == 302
    project.refresh_from_db()
    assert project.active_model == first
    wait_for(lambda: ls.projects.get(id=ls_id).model_version == first.version,
             what="Label Studio's model_version after the roll-back")
    summary = label_studio.sync(project, scope="pool")
    assert summary["tasks_created"] == 0
    ordered = label_studio._raw(ls, "GET", "api/tasks", params={
        "project": ls_id, "fields": "all",
        "query": json.dumps({"ordering": ["tasks:predictions_score"]})})
    ordered = ordered["tasks"] if isinstance(ordered, dict) else ordered
    shown = [[p for p in t["predictions"] if p["model_version"] == first.version]
             for t in ordered]
    assert all(shown), "every task carries the active version's prediction"
