"""What Label Studio's webhook (and reconciliation) may write: answers only on the scans that
can be Label Studio tasks (pool, out of quarantine, this project's), and a reader credited
only when the e-mail is a member's. Every refusal is answered with its reason; nothing else
in the same payload is lost and nothing is half written."""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import reverse

from annotator import label_studio, services
from annotator.models import Annotation, LabelStudioTask, Membership
from tests.base import PASSWORD
from tests.conftest import _import_brain, brain_truth

pytestmark = pytest.mark.django_db

SECRET = "scope-test-secret"


@pytest.fixture
def brain(project, users, settings):
    """Brain-MRI fixture scans (pool unlabeled, eval labeled), linked to Label Studio
    project 7; mallory is a clinician of another project only."""
    settings.LABEL_STUDIO_WEBHOOK_SECRET = SECRET
    _import_brain(project)
    project.label_studio_project_id = 7
    project.refit_every = 1000                    # no refit while these tests label
    project.save(update_fields=["label_studio_project_id", "refit_every"])
    return project


@pytest.fixture
def mallory(users, other_project, django_user_model):
    user = django_user_model.objects.create_user("mallory", "mallory@example.org", PASSWORD)
    services.membership_set(project=other_project, user=user, role=Membership.Role.CLINICIAN)
    return user


def _item(scan, annotation_id: int, choice: str, email: str = "alice@example.org",
          task_id: int | None = None) -> tuple[dict, dict]:
    annotation = {"id": annotation_id, "lead_time": 2.0, "completed_by": {"email": email},
                  "result": [{"from_name": "diagnosis", "to_name": "image", "type": "choices",
                              "value": {"choices": [choice]}}]}
    return annotation, {"id": 900000 + annotation_id if task_id is None else task_id,
                        "data": {"scan_id": scan.pk}}


def _hook(project, *items, bulk: bool = False):
    if bulk:
        body = {"action": "ANNOTATIONS_CREATED", "project": {"id": 7},
                "annotations": [dict(a, task=t["id"]) for a, t in items],
                "tasks": [t for _, t in items]}
    else:
        (annotation, task), = items
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 7},
                "annotation": annotation, "task": task}
    response = Client().post(reverse("annotator:ls_webhook", args=[project.pk]),
                             data=json.dumps(body), content_type="application/json",
                             HTTP_X_MEDLABEL_SECRET=SECRET)
    assert response.status_code == 200, response.content[:300]
    return response.json()


def _pool(project, n: int = 0):
    return project.scans.filter(split="pool").order_by("pk")[n]


def test_webhook_refuses_an_eval_scan_with_its_reason_and_stores_nothing(brain, users):
    """The probe's payload: a clinician's answer on an eval scan. Refused, said so, nothing
    stored — and a reviewer's too (eval scans are never Label Studio tasks)."""
    project = brain
    scan = project.scans.filter(split="eval").order_by("pk").first()
    before = list(Annotation.objects.filter(scan=scan).values_list("pk", flat=True))
    for number, email in ((9001, "clinician@example.org"), (9002, "alice@example.org"),
                          (9003, "bob@example.org")):
        answer = _hook(project, _item(scan, number, "no_tumor", email))
        assert answer["queued"] == 0
        (refused,) = answer["refused"]
        assert refused["annotation"] == number and refused["task"] == 900000 + number
        assert f"scan {scan.pk}" in refused["reason"] and "eval" in refused["reason"]
    # reconciliation (the same ingest, without the webhook) refuses it too
    annotation, task = _item(scan, 9004, "no_tumor")
    got, outcome = label_studio.ingest(project, annotation=annotation, task=task)
    assert got is None and outcome.startswith("ignored") and "eval" in outcome
    assert list(Annotation.objects.filter(scan=scan).values_list("pk", flat=True)) == before


def test_webhook_refuses_a_quarantined_scan_and_an_update_onto_one(brain, users):
    project = brain
    scan, later = _pool(project, 0), _pool(project, 1)
    scan.quarantined = True
    scan.save(update_fields=["quarantined"])
    answer = _hook(project, _item(scan, 9101, brain_truth(scan)))
    assert answer["queued"] == 0 and "quarantined" in answer["refused"][0]["reason"]
    assert not Annotation.objects.filter(scan=scan).exclude(source="import").exists()
    # stored before its scan went into quarantine: a change from Label Studio is refused
    assert _hook(project, _item(later, 9102, "no_tumor"))["queued"] == 1
    later.quarantined = True
    later.save(update_fields=["quarantined"])
    answer = _hook(project, _item(later, 9102, "pituitary_tumor"))
    assert answer["queued"] == 0 and "quarantined" in answer["refused"][0]["reason"]
    assert Annotation.objects.get(external_id="9102").label_class.name == "no_tumor"


def test_a_non_member_email_is_not_credited(brain, users, mallory):
    """mallory (a clinician of another project) and charlie (no project) are not this
    project's readers: their answers are kept as an unknown reader's, never as theirs."""
    project = brain
    for number, user in ((9201, mallory), (9202, users["charlie"])):
        scan = _pool(project, number - 9201)
        assert _hook(project, _item(scan, number, brain_truth(scan), user.email))["queued"] == 1
        got = Annotation.objects.get(source="label_studio", external_id=str(number))
        assert got.reader is None and got.scan == scan
        assert user.email in got.note and "not a member" in got.note
    assert not Annotation.objects.filter(reader__in=[mallory, users["charlie"]]).exists()
    # seen again (a replay, reconciliation): still nobody's
    annotation, task = _item(_pool(project, 0), 9201, brain_truth(_pool(project, 0)),
                             mallory.email)
    got, _ = label_studio.ingest(project, annotation=annotation, task=task)
    got.refresh_from_db()
    assert got.reader is None
    # an inactive member is not credited either
    users["bob"].is_active = False
    users["bob"].save(update_fields=["is_active"])
    scan = _pool(project, 2)
    assert _hook(project, _item(scan, 9203, brain_truth(scan), "bob@example.org"))["queued"] == 1
    assert Annotation.objects.get(external_id="9203").reader is None


def test_a_member_still_works_and_a_refusal_loses_nothing_else(brain, users, mallory):
    """A bulk payload: alice on a pool scan, alice on an eval scan, a task of another
    project, dora (a site admin) on a pool scan. The refused are answered with their reasons;
    the others are stored, credited to their readers."""
    project = brain
    pool, second = _pool(project, 0), _pool(project, 1)
    evaluation = project.scans.filter(split="eval").order_by("pk").first()
    foreign = mallory.memberships.get().project.scans.create(
        dataset=mallory.memberships.get().project.datasets.create(name="x"), sha256="0" * 64,
        width=1, height=1, file_format="png")
    answer = _hook(project, _item(pool, 9301, brain_truth(pool)),
                   _item(evaluation, 9302, "no_tumor"), _item(foreign, 9303, "no_tumor"),
                   _item(second, 9304, brain_truth(second), "dora@example.org"), bulk=True)
    assert answer["queued"] == 2
    assert {r["annotation"]: r["reason"].split(":")[0] for r in answer["refused"]} == {
        9302: f"scan {evaluation.pk} is an eval scan",
        9303: f"task 909303 is not one of {project.name!r}'s scans"}
    got = Annotation.objects.get(source="label_studio", external_id="9301")
    assert (got.scan, got.reader, got.label_class.name) == (pool, users["alice"],
                                                            brain_truth(pool))
    assert Annotation.objects.get(external_id="9304").reader == users["dora"]
    assert not Annotation.objects.filter(external_id__in=["9302", "9303"]).exists()


def test_the_task_mapping_decides_the_scan(brain, users, other_project):
    """A task we exported is matched on its task id: a payload whose scan_id disagrees with
    it, a task of another project, or another task naming an exported scan are refused."""
    from django.utils import timezone

    project = brain
    scan, evaluation = _pool(project, 0), project.scans.filter(split="eval").first()
    LabelStudioTask.objects.create(project=project, scan=scan, ls_task_id=5001,
                                   url_issued_at=timezone.now())
    _import_brain(other_project)
    theirs = other_project.scans.filter(split="pool").first()
    LabelStudioTask.objects.create(project=other_project, scan=theirs, ls_task_id=5002,
                                   url_issued_at=timezone.now())
    cases = {
        9401: (_item(evaluation, 9401, "no_tumor", task_id=5001), "is the task of scan"),
        9402: (_item(scan, 9402, "no_tumor", task_id=5002), "another project"),
        9403: (_item(scan, 9403, "no_tumor", task_id=5003), "not the task of scan"),
    }
    for number, ((annotation, task), reason) in cases.items():
        answer = _hook(project, (annotation, task))
        assert answer["queued"] == 0 and reason in answer["refused"][0]["reason"], answer
    annotation, task = _item(scan, 9404, brain_truth(scan), task_id=5001)
    task["data"] = {}                                     # the mapping alone names the scan
    assert _hook(project, (annotation, task))["queued"] == 1
    assert Annotation.objects.get(external_id="9404").scan == scan
    assert not Annotation.objects.filter(external_id__in=["9401", "9402", "9403"]).exists()


def test_a_refused_change_writes_nothing(brain, users):
    """An annotation stored without its reader, seen again with the reader's e-mail but a
    class that does not apply to the scan, or naming another scan: refused whole (the reader
    is not filled in on the way)."""
    project = brain
    scan, other = _pool(project, 0), _pool(project, 1)
    chest = services.label_set_create(project=project, name="chest x-ray")
    services.label_class_get_or_create(project=project, name="pneumonia", label_set=chest)
    annotation, task = _item(scan, 9501, brain_truth(scan))
    annotation["completed_by"] = 12                      # an id only: the reader unknown
    got, outcome = label_studio.ingest(project, annotation=annotation, task=task)
    assert outcome == "created" and got.reader is None
    wrong_class, _ = _item(scan, 9501, "pneumonia")
    _, outcome = label_studio.ingest(project, annotation=wrong_class, task=task)
    assert outcome.startswith("ignored") and "does not apply" in outcome
    moved, moved_task = _item(other, 9501, brain_truth(scan))
    _, outcome = label_studio.ingest(project, annotation=moved, task=moved_task)
    assert outcome.startswith("ignored") and f"scan {scan.pk}" in outcome
    got.refresh_from_db()
    assert (got.reader, got.scan, got.label_class.name, got.note) == (
        None, scan, brain_truth(scan), "Label Studio user ?")


def test_the_export_and_the_webhook_share_one_rule(brain):
    """The scans the export makes tasks of are exactly those an answer may land on."""
    from annotator.label_studio.config import task_refusal

    project = brain
    quarantined = _pool(project, 3)
    quarantined.quarantined = True
    quarantined.save(update_fields=["quarantined"])
    exported = set(label_studio._scans_to_export(project, "pool"))
    allowed = {s for s in project.scans.all() if task_refusal(project, s) is None}
    assert exported == allowed and quarantined not in exported
    assert not {s.split for s in exported} - {"pool"} and len(exported) > 10
