"""The audit trail records annotations, adjudications, promotions, roll-backs and class
changes with who, when and the model version shown; admins read and export it as CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from annotator.models import Annotation, AuditEvent, LabelClass
from ml_backend.models import ModelVersion
from tests.base import PASSWORD
from tests.conftest import brain_truth

pytestmark = pytest.mark.django_db


def client_for(user) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_every_change_is_recorded_and_exported(encoded_project, users,
                                               django_capture_on_commit_callbacks, tmp_path):
    project = encoded_project
    alice, bob, dora = (client_for(users[n]) for n in ("alice", "bob", "dora"))
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    picks = [s for s in pool if brain_truth(s) == "no_tumor"][:2] + \
        [s for s in pool if brain_truth(s) == "pituitary_tumor"][:2]

    # labels through the label page: the refit after the third promotes a first model
    with django_capture_on_commit_callbacks(execute=True):
        for scan in picks:
            response = alice.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
                                  data=json.dumps({"class_id": classes[brain_truth(scan)].pk}),
                                  content_type="application/json")
            assert response.status_code == 201
    created = AuditEvent.objects.filter(action="annotation.created", actor=users["alice"])
    assert created.count() == 4
    assert created.first().details["label"] in {"no_tumor", "pituitary_tumor"}
    project.refresh_from_db()
    first_model = project.active_model
    promoted = AuditEvent.objects.get(action="model.promoted", model_version=first_model.version)
    assert promoted.actor is None and promoted.actor_name == "system"

    # an answer made while a model is shown records that version
    scan = pool[-1]
    suggestion = classes["no_tumor"]
    alice.post(reverse("annotator:answer", args=[project.pk, scan.pk]),
               data=json.dumps({"outcome": "unsure", "shown_model_version": first_model.version,
                                "shown_suggestion": suggestion.pk, "shown_confidence": 0.6}),
               content_type="application/json")
    event = AuditEvent.objects.filter(action="annotation.created").first()
    assert event.model_version == first_model.version
    assert event.details["shown_suggestion"] == "no_tumor" and event.details["shown_confidence"] == 0.6

    # an adjudication by the reviewer
    bob.post(reverse("annotator:adjudicate", args=[project.pk, picks[0].pk]),
             {"label_class": classes["pituitary_tumor"].pk, "note": "second look"})
    adjudicated = AuditEvent.objects.get(action="annotation.adjudicated")
    assert adjudicated.actor == users["bob"] and adjudicated.details["label"] == "pituitary_tumor"

    # a class added in the UI, then renamed in the admin
    alice.post(reverse("annotator:class_create", args=[project.pk]), {"name": "cyst"})
    cyst = LabelClass.objects.get(project=project, name="cyst")
    assert AuditEvent.objects.get(action="class.created", object_id=str(cyst.pk)).actor == users["alice"]
    change = reverse("admin:annotator_labelclass_change", args=[cyst.pk])
    form = {"project": project.pk, "label_set": cyst.label_set_id, "name": "arachnoid cyst",
            "description": "", "hotkey": "y",
            "color": cyst.color, "order": cyst.order}
    assert dora.post(change, form).status_code == 302
    changed = AuditEvent.objects.get(action="class.changed", object_id=str(cyst.pk))
    assert changed.actor == users["dora"]
    assert changed.details["changed"]["name"] == ["cyst", "arachnoid cyst"]

    # a roll-back in the admin by dora
    second = ModelVersion.objects.create(project=project, kind="classifier", version="manual-2",
                                         parent=first_model.parent, status="ready",
                                         config=first_model.config)
    from ml_backend import services

    services.model_version_activate(second, reason="test", actor=users["dora"])
    response = dora.post(reverse("admin:ml_backend_modelversion_changelist"),
                         {"action": "roll_back", "_selected_action": [second.pk]})
    assert response.status_code == 302
    rolled = AuditEvent.objects.get(action="model.rolled_back")
    assert rolled.actor == users["dora"] and rolled.model_version == first_model.version
    assert rolled.details["previous"] == "manual-2"

    # deleting an annotation is recorded too
    doomed = Annotation.objects.filter(reader=users["alice"], outcome="unsure").get()
    doomed_id = doomed.pk
    doomed.delete()
    assert AuditEvent.objects.filter(action="annotation.deleted", object_id=str(doomed_id)).exists()

    # admins read the trail and export it; clinicians cannot
    changelist = reverse("admin:annotator_auditevent_changelist")
    assert dora.get(changelist).status_code == 200
    assert alice.get(changelist).status_code == 302
    everything = list(AuditEvent.objects.values_list("pk", flat=True))
    export = dora.post(changelist, {"action": "export_csv", "_selected_action": everything})
    assert export["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(export.content.decode())))
    assert len(rows) == len(everything)
    assert {r["action"] for r in rows} >= {"annotation.created", "annotation.adjudicated",
                                          "model.promoted", "model.rolled_back",
                                          "class.created", "class.changed", "annotation.deleted"}
    out = tmp_path / "audit.csv"
    call_command("audit_export", project=project.name, out=str(out))
    assert out.read_text().splitlines()[0].startswith("time,actor,project,action")
