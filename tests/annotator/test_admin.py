"""Every model is in the admin, and its list, add and change pages load."""

from __future__ import annotations

from django.apps import apps
from django.contrib import admin
from django.urls import reverse

from annotator.models import Annotation, ImportChunk, Scan
from ml_backend.models import Evaluation, ModelVersion, Prediction, QueryItem, QueryRound, TrainingRun
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import


def make_ml_rows(project, scan, label_class):
    encoder = ModelVersion.objects.create(project=project, kind="encoder", version="enc-1",
                                          status="active", config={"arch": "resnet18"})
    model = ModelVersion.objects.create(project=project, kind="classifier", version="clf-1",
                                        parent=encoder, status="active", num_labels=40)
    TrainingRun.objects.create(project=project, kind="refit", status="succeeded", model_version=model)
    Prediction.objects.create(scan=scan, model_version=model, probabilities={str(label_class.pk): 0.9},
                              predicted_class=label_class, confidence=0.9, uncertainty=0.1)
    round_ = QueryRound.objects.create(project=project, model_version=model, strategy="hybrid", size=1)
    QueryItem.objects.create(query_round=round_, scan=scan, rank=1, score=0.5,
                             reason={"uncertainty": 0.5})
    Evaluation.objects.create(model_version=model, num_labels=40, num_eval=40, macro_f1=0.8,
                              report={"per_class": {}})
    from annotator.labeling import lease_acquire

    assert lease_acquire(scan=scan, user=project.memberships.first().user)
    from django.utils import timezone

    from annotator.models import LabelStudioTask

    LabelStudioTask.objects.create(project=project, scan=scan, ls_task_id=17,
                                   url_issued_at=timezone.now(), shown_model_version=model,
                                   shown_suggestion=label_class, shown_confidence=0.9)


def test_every_model_is_registered():
    """Every model has an admin page, except the encrypted honest-broker linkage, which is
    never shown (README "Connect your PACS")."""
    from annotator.models import DicomLinkage

    for app_label in ("annotator", "ml_backend"):
        for model in apps.get_app_config(app_label).get_models():
            assert admin.site.is_registered(model) is (model is not DicomLinkage), model


def test_admin_pages_load_for_every_model(client, users, project):
    job = run_import(project, FIXTURES / "chest_xray" / "eval" , split="eval")
    ImportChunk.objects.create(job=job, index=0, start=0, stop=40, status="done",
                               processed=40, imported=40)
    scan = Scan.objects.first()
    make_ml_rows(project, scan, Annotation.objects.first().label_class)
    _findings_row(project, scan)
    assert client.login(username="dora", password=PASSWORD)
    from annotator.models import DicomLinkage, PacsReport

    PacsReport.objects.create(scan=scan, result="normal", sop_instance_uid="1.2.3")
    # the encrypted honest-broker linkage is never shown, not even to a superuser
    assert DicomLinkage not in admin.site._registry
    for app_label in ("annotator", "ml_backend"):
        for model in apps.get_app_config(app_label).get_models():
            if model is DicomLinkage:
                continue
            info = (model._meta.app_label, model._meta.model_name)
            changelist = reverse("admin:%s_%s_changelist" % info)
            assert client.get(changelist).status_code == 200, changelist
            assert client.get(changelist, {"q": "a"}).status_code == 200, changelist
            obj = model.objects.first()
            assert obj is not None, model
            change = reverse("admin:%s_%s_change" % info, args=[obj.pk])
            assert client.get(change).status_code == 200, change
            if admin.site._registry[model].has_add_permission(_request(users["dora"])):
                add = reverse("admin:%s_%s_add" % info)
                assert client.get(add).status_code == 200, add
    page = client.get(reverse("admin:annotator_scan_changelist")).content.decode()
    assert reverse("annotator:scan_preview", args=[scan.pk]) in page


def _findings_row(project, scan):
    """A findings answer (and its FindingAnswer) so every admin page has a row to show."""
    from annotator.models import FindingAnswer, LabelClass, LabelSet

    findings = LabelSet.objects.create(project=project, name="chest findings", kind="multi")
    effusion = LabelClass.objects.create(project=project, name="Effusion", label_set=findings)
    answer = Annotation.objects.create(scan=scan, outcome="findings", source="web")
    FindingAnswer.objects.create(annotation=answer, finding=effusion, state="present")


def test_admin_is_closed_to_clinicians(client, users):
    assert client.login(username="alice", password=PASSWORD)
    response = client.get(reverse("admin:annotator_scan_changelist"))
    assert response.status_code == 302


def _request(user):
    from django.test import RequestFactory

    request = RequestFactory().get("/")
    request.user = user
    return request


def test_label_added_in_admin_records_the_admin_as_reader(client, users, project):
    from annotator.models import LabelClass

    run_import(project, FIXTURES / "chest_xray" / "pool" / "normal", layout="flat")
    scan = Scan.objects.first()
    normal = LabelClass.objects.create(project=project, name="normal")
    assert client.login(username="dora", password=PASSWORD)
    response = client.post(reverse("admin:annotator_annotation_add"), {
        "scan": scan.pk, "label_class": normal.pk, "outcome": "label", "source": "web",
        "external_id": "", "note": "",
        # the findings inline (empty for a class label)
        "findings-TOTAL_FORMS": "0", "findings-INITIAL_FORMS": "0"})
    assert response.status_code == 302, response.content.decode()[:2000]
    annotation = Annotation.objects.get(scan=scan)
    assert annotation.reader == users["dora"] and annotation.label_class == normal
