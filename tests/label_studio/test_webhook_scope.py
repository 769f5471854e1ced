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


def _bulk_cases(project, users, other_project):
    """A bulk event of every kind of annotation the webhook screens — each accepted or
    refused by its own rule — with what each must get."""
    from django.utils import timezone

    pool = list(project.scans.filter(split="pool").order_by("pk"))
    evaluation = project.scans.filter(split="eval").order_by("pk").first()
    quarantined = pool[5]
    quarantined.quarantined = True
    quarantined.save(update_fields=["quarantined"])
    for scan, ls_task_id in ((pool[1], 5101), (pool[6], 5103)):
        LabelStudioTask.objects.create(project=project, scan=scan, ls_task_id=ls_task_id,
                                       url_issued_at=timezone.now())
    _import_brain(other_project)
    theirs = other_project.scans.filter(split="pool").order_by("pk").first()
    LabelStudioTask.objects.create(project=other_project, scan=theirs, ls_task_id=5102,
                                   url_issued_at=timezone.now())
    # stored before: 9609 on pool[2] (arrives now for pool[3]), 9610 in the other project
    annotation, task = _item(pool[2], 9609, brain_truth(pool[2]))
    assert label_studio.ingest(project, annotation=annotation, task=task)[1] == "created"
    annotation, task = _item(theirs, 9610, brain_truth(theirs), task_id=5102)
    assert label_studio.ingest(other_project, annotation=annotation, task=task)[1] == "created"
    no_id = _item(pool[4], 0, "no_tumor", task_id=909611)
    del no_id[0]["id"]
    bad_id = _item(pool[4], 0, "no_tumor", task_id=909612)
    bad_id[0]["id"] = {"nested": 1}
    linked_no_data = _item(pool[6], 9613, brain_truth(pool[6]), task_id=5103)
    linked_no_data[1]["data"] = {}
    other = "pituitary_tumor" if brain_truth(pool[0]) == "no_tumor" else "no_tumor"
    cases = [
        (_item(pool[0], 9601, brain_truth(pool[0])), None),
        (_item(evaluation, 9602, "no_tumor"), f"scan {evaluation.pk} is an eval scan"),
        (_item(quarantined, 9603, "no_tumor"), f"scan {quarantined.pk} is quarantined"),
        (_item(theirs, 9604, "no_tumor"), f"task 909604 is not one of {project.name!r}'s scans"),
        (_item(pool[2], 9605, "no_tumor", task_id=5101),
         f"task 5101 is the task of scan {pool[1].pk}, but its data names scan {pool[2].pk}"),
        (_item(pool[0], 9606, "no_tumor", task_id=5102),
         "task 5102 is a Label Studio task of another project"),
        (_item(pool[1], 9607, "no_tumor"),
         f"task 909607 is not the task of scan {pool[1].pk} (that is task 5101)"),
        (no_id, "the annotation has no id"),
        (_item(pool[3], 9609, brain_truth(pool[3])),
         f"annotation 9609 was stored for scan {pool[2].pk}, not scan {pool[3].pk}"),
        (_item(pool[0], 9610, "no_tumor"), "annotation 9610 belongs to another project"),
        (bad_id, "the annotation id is not a Label Studio id"),
        (linked_no_data, None),
        # the same annotation again in the same event, changed: stored once, updated
        (_item(pool[0], 9601, other), None),
    ]
    # and a run of plain answers on pool scans, as a bulk event carries them
    for n, scan in enumerate(pool[7:37]):
        cases.append((_item(scan, 9700 + n, brain_truth(scan)), None))
    return cases


def test_a_bulk_event_gets_each_answer_a_single_event_gets(brain, users, other_project,
                                                           django_assert_max_num_queries):
    """A bulk event is screened item by item by the same rules as single events — the same
    accept or refuse, the same reason — while its rows are read once for the payload: a
    few queries, however many annotations (before: 3 to 5 per annotation)."""
    from annotator.label_studio import inbound

    project = brain
    cases = _bulk_cases(project, users, other_project)
    singly = []
    for pair, expected in cases:
        accepted, refused = inbound.webhook_screen(project, {
            "action": "ANNOTATION_CREATED", "annotation": pair[0], "task": pair[1]})
        reason = refused[0]["reason"] if refused else None
        assert (reason or "").startswith(expected or ""), (pair, reason, expected)
        assert (reason is None) == (expected is None), (pair, reason)
        singly.append(reason)
    body = {"action": "ANNOTATIONS_CREATED", "project": {"id": 7},
            "annotations": [dict(a, task=t["id"]) for (a, t), _ in cases],
            "tasks": [t for (_, t), _ in cases]}
    with django_assert_max_num_queries(4):
        accepted, refused = inbound.webhook_screen(project, body)
    assert len(accepted) == singly.count(None) == 33
    assert [r["reason"] for r in refused] == [r for r in singly if r is not None]
    assert [r["annotation"] for r in refused] == [
        pair[0].get("id") if isinstance(pair[0].get("id"), int) else None
        for pair, expected in cases if expected is not None]


def test_a_bulk_event_is_one_ingest_task_and_stores_what_single_events_store(
        brain, users, other_project):
    """The whole payload is one background task (not one per annotation), and what it
    stores is what the single events would: each accepted answer once, the repeated one
    updated, nothing of the refused."""
    from celery.signals import task_prerun

    project = brain
    cases = _bulk_cases(project, users, other_project)
    before = set(Annotation.objects.values_list("pk", flat=True))
    started = []

    def count(sender=None, **kwargs):
        started.append(sender.name)

    task_prerun.connect(count, weak=False)
    try:
        answer = _hook(project, *[pair for pair, _ in cases], bulk=True)
    finally:
        task_prerun.disconnect(count)
    assert answer["queued"] == 33 and len(answer["refused"]) == 10
    assert started == ["annotator.tasks.label_studio_ingest_payload"]
    new = Annotation.objects.exclude(pk__in=before)
    stored = {a.external_id: a for a in new}
    accepted_ids = {str(pair[0]["id"]) for pair, expected in cases if expected is None}
    assert set(stored) == accepted_ids and new.count() == len(accepted_ids)   # 9601 once
    first = stored["9601"]
    (last, _), _ = [case for case in cases if case[0][0].get("id") == 9601][-1]
    assert first.label_class.name == last["result"][0]["value"]["choices"][0]
    assert "updated in Label Studio" in first.note and first.reader == users["alice"]
    assert stored["9613"].scan == LabelStudioTask.objects.get(ls_task_id=5103).scan


def test_the_webhook_of_a_project_that_does_not_exist_answers_json(brain):
    url = reverse("annotator:ls_webhook", args=[999999])
    missing = Client().post(url, data="{}", content_type="application/json",
                            HTTP_X_MEDLABEL_SECRET=SECRET)
    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"
    assert "no project 999999" in missing.json()["error"]
    wrong_secret = Client().post(url, data="{}", content_type="application/json",
                                 HTTP_X_MEDLABEL_SECRET="nope")
    assert wrong_secret.status_code == 403          # the secret is checked before the project


@pytest.mark.django_db(transaction=True)
def test_a_bulk_event_brings_at_most_one_refit(brain, users):
    """Answers crossing ``refit_every`` many times over in one bulk event: one refit run,
    asked for once they are all stored (before: a refit every few answers, as each
    annotation was its own task, committed and asked on its own). The runs here fail
    at once (a placeholder encoder file): what counts is how many are started."""
    from ml_backend.models import TrainingRun
    from tests.factories import model_version_with_files

    project = brain
    project.refit_every = 2
    encoder = model_version_with_files(project, "enc-bulk", kind="encoder", status="active")
    project.active_encoder = encoder
    project.save(update_fields=["refit_every", "active_encoder"])
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    by_class = {}
    for scan in pool:
        by_class.setdefault(brain_truth(scan), []).append(scan)
    scans = [s for pair in zip(*(found[:6] for found in by_class.values())) for s in pair]
    assert len(scans) == 12
    answer = _hook(project, *[_item(s, 9800 + n, brain_truth(s)) for n, s in enumerate(scans)],
                   bulk=True)
    assert answer["queued"] == 12
    assert Annotation.objects.filter(external_id__startswith="98").count() == 12
    assert TrainingRun.objects.filter(project=project, kind="refit").count() == 1


def test_a_fault_in_one_annotation_of_a_bulk_event_loses_only_that_one(
        brain, users, other_project, monkeypatch):
    """A database fault while storing one annotation (a deadlock, a value the database
    refuses) rolls back that annotation's savepoint only: the payload's others are stored."""
    from django.db import OperationalError

    from annotator.label_studio import inbound

    project = brain
    cases = _bulk_cases(project, users, other_project)
    pairs = [pair for pair, expected in cases if expected is None]
    doomed = str(pairs[1][0]["id"])
    real = inbound.ingest

    def faulty(project, *, annotation, **kwargs):
        result = real(project, annotation=annotation, **kwargs)   # written, then the fault
        if str(annotation.get("id")) == doomed:
            raise OperationalError("deadlock detected")
        return result

    monkeypatch.setattr(inbound, "ingest", faulty)
    before = set(Annotation.objects.values_list("pk", flat=True))
    counts = inbound.ingest_payload(project, pairs)
    stored = set(Annotation.objects.exclude(pk__in=before).values_list("external_id", flat=True))
    assert doomed not in stored and counts["ignored"] >= 1
    assert stored == {str(a["id"]) for a, _ in pairs} - {doomed}
