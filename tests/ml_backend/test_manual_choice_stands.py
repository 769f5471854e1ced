"""A person's choice of the active classifier stands against a refit already running; the
"promote anyway" reason keeps the gate's verdict once (the promotion probe's faults)."""

from __future__ import annotations

import numpy as np
import pytest
from django.urls import reverse

from annotator.models import AuditEvent
from ml_backend import services
from ml_backend.models import ModelVersion, TrainingRun
from ml_backend.services.artifacts import new_version
from tests.base import PASSWORD
from tests.factories import model_version_with_files


def _classes(project):
    from annotator.services import label_class_get_or_create

    return [label_class_get_or_create(project=project, name=name)[0]
            for name in ("normal", "pneumonia")]


def _versions(project):
    """clf-3 (retired, the version dora wants back) and clf-10, active by the gate."""
    classes = _classes(project)
    clf3 = model_version_with_files(project, "p-clf-3", status="training", classes=classes)
    services.model_version_activate(clf3, reason="promoted: the first classifier")
    clf10 = model_version_with_files(project, "p-clf-10", status="ready", classes=classes)
    services.model_version_activate(clf10, reason="promoted: better than p-clf-3")
    return classes, ModelVersion.objects.get(pk=clf3.pk), clf10


def _refit_starts(project) -> tuple[TrainingRun, ModelVersion]:
    """A refit claimed by a worker and its version made (what ``_refit`` does first)."""
    run = services.training_run_create(project=project, kind=TrainingRun.Kind.REFIT)
    assert services.training_run_claim(run.pk)
    run = TrainingRun.objects.select_related("project").get(pk=run.pk)
    classes = _classes(project)
    model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=None, config={
        "kind": "head", "classes": [{"id": c.pk, "name": c.name} for c in classes]})
    return run, model


def _refit_finishes(model: ModelVersion, classes) -> None:
    """The gate passed it (what ``_finish_classifier`` stores), then ``publish``."""
    model.status, model.status_reason = ModelVersion.Status.READY, "promoted: no class fell"
    model.save(update_fields=["status", "status_reason"])
    services.publish(model, predict=lambda scans: np.full((len(scans), len(classes)), 0.5),
                     classes=[c.pk for c in classes])


def test_a_refit_started_before_an_admin_rollback_does_not_replace_it(project, users):
    classes, clf3, clf10 = _versions(project)
    run, candidate = _refit_starts(project)
    # dora rolls back to clf-3 while the refit runs (the Django admin's "Promote")
    services.model_version_promote(clf3, actor=users["dora"], reason="promoted by dora in admin")
    _refit_finishes(candidate, classes)

    project.refresh_from_db()
    candidate.refresh_from_db()
    assert project.active_model_id == clf3.pk                     # her choice stands
    assert ModelVersion.objects.get(pk=clf3.pk).status == "active"
    assert candidate.status == "ready" and candidate.promoted_at is None
    assert candidate.status_reason.startswith(
        f"not activated: dora chose p-clf-3 as the active classifier while this refit "
        f"(run #{run.pk}) ran"), candidate.status_reason
    assert "(the gate had said: promoted: no class fell)" in candidate.status_reason
    event = AuditEvent.objects.get(action=AuditEvent.Action.MODEL_NOT_ACTIVATED)
    assert event.model_version == candidate.version and event.project_id == project.pk
    assert event.details["chosen"] == "p-clf-3" and event.details["chosen_by"] == "dora"
    assert event.details["reason"] == candidate.status_reason
    # the audit trail shows no promotion of the refit's version
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MODEL_PROMOTED,
                                         model_version=candidate.version).exists()


def test_a_refit_started_after_the_admin_choice_gates_against_it(project, users):
    classes, clf3, clf10 = _versions(project)
    services.model_version_promote(clf3, actor=users["dora"], reason="promoted by dora in admin")
    run, candidate = _refit_starts(project)          # started after her choice
    _refit_finishes(candidate, classes)

    project.refresh_from_db()
    assert project.active_model_id == candidate.pk
    assert ModelVersion.objects.get(pk=candidate.pk).status_reason == "promoted: no class fell"
    assert ModelVersion.objects.get(pk=clf3.pk).status == "retired"
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.MODEL_NOT_ACTIVATED).exists()


def test_a_gate_promotion_meanwhile_does_not_stop_a_running_refit(project, users):
    """Only a person's choice stands: another run's gate promoting meanwhile (a retrain)
    leaves the refit to gate and promote as before."""
    classes, clf3, clf10 = _versions(project)
    run, candidate = _refit_starts(project)
    retrained = model_version_with_files(project, "p-clf-12", status="ready", classes=classes)
    services.model_version_activate(retrained, reason="promoted: better than p-clf-10")
    _refit_finishes(candidate, classes)

    project.refresh_from_db()
    assert project.active_model_id == candidate.pk


def test_promote_anyway_again_keeps_the_gate_verdict_once(client, users, project):
    classes, clf3, clf10 = _versions(project)
    verdict = "held back: pneumonia F1 fell from 0.87 to 0.63 on 30 scans"
    ModelVersion.objects.filter(pk=clf3.pk).update(status="ready", status_reason=verdict)
    assert client.login(username="dora", password=PASSWORD)
    for active, again in [(clf3, clf10), (clf10, clf3), (clf3, clf10), (clf10, clf3)]:
        url = reverse("annotator:model_promote", args=[project.pk, active.pk])
        assert client.post(url).status_code == 302
        url = reverse("annotator:model_promote", args=[project.pk, again.pk])
        assert client.post(url).status_code == 302
    reason = ModelVersion.objects.get(pk=clf3.pk).status_reason
    assert reason == f"promoted anyway by dora (the gate had said: {verdict})", reason
    last = AuditEvent.objects.filter(action=AuditEvent.Action.MODEL_PROMOTED,
                                     model_version="p-clf-3").first()
    assert last.details["reason"].count("the gate had said") == 1
    # a reason already nested by the old code unwraps to the verdict too
    nested = verdict
    for _ in range(4):
        nested = f"promoted anyway by dora (the gate had said: {nested})"
    assert services.gate_verdict(nested) == verdict
    assert services.gate_verdict(verdict) == verdict


def test_promoting_the_active_version_again_changes_nothing(client, users, project):
    """The seventh probe: a double click on "Promote anyway" (or a resubmitted form) wrote a
    second audit event, replaced the version's reason and made a second worklist round."""
    from ml_backend.models import QueryRound

    classes, clf3, clf10 = _versions(project)
    assert client.login(username="dora", password=PASSWORD)
    url = reverse("annotator:model_promote", args=[project.pk, clf3.pk])
    first = client.post(url, {"active": str(clf10.pk)})
    assert first.status_code == 302
    project.refresh_from_db()
    assert project.active_model_id == clf3.pk
    state = (AuditEvent.objects.filter(action=AuditEvent.Action.MODEL_PROMOTED).count(),
             QueryRound.objects.filter(project=project).count(),
             ModelVersion.objects.get(pk=clf3.pk).status_reason)
    again = client.post(url, {"active": str(clf10.pk)}, follow=True)    # the second click
    assert "already is the active classifier: nothing changed" in again.content.decode()
    assert state == (AuditEvent.objects.filter(action=AuditEvent.Action.MODEL_PROMOTED).count(),
                     QueryRound.objects.filter(project=project).count(),
                     ModelVersion.objects.get(pk=clf3.pk).status_reason)
    with pytest.raises(services.AlreadyActive):
        services.model_version_promote(clf3, actor=users["dora"])


def test_a_promotion_from_a_page_the_gate_has_moved_past_is_refused(client, users, project):
    """The page showed clf-10 active and clf-3 held back; the gate then promoted clf-12. The
    old page's button must not replace clf-12 unseen."""
    classes, clf3, clf10 = _versions(project)
    ModelVersion.objects.filter(pk=clf3.pk).update(status="ready", status_reason="held back")
    newer = model_version_with_files(project, "p-clf-12", status="ready", classes=classes)
    services.model_version_activate(newer, reason="promoted: better than p-clf-10")
    assert client.login(username="dora", password=PASSWORD)
    page = client.post(reverse("annotator:model_promote", args=[project.pk, clf3.pk]),
                       {"active": str(clf10.pk)}, follow=True)
    text = page.content.decode()
    assert "changed since this page was shown (it is now p-clf-12)" in text
    project.refresh_from_db()
    assert project.active_model_id == newer.pk
    # the page as shown now carries the active version, and its button works
    detail = client.get(reverse("annotator:project_detail", args=[project.pk])).content.decode()
    assert f'name="active" value="{newer.pk}"' in detail or "promote-anyway" not in detail
    client.post(reverse("annotator:model_promote", args=[project.pk, clf3.pk]),
                {"active": str(newer.pk)})
    project.refresh_from_db()
    assert project.active_model_id == clf3.pk
