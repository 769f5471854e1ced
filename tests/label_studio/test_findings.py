"""A findings (multi-label) project in a real Label Studio 1.23.2 and back: the config has a
multiple-choice control of the findings present ("No finding" on key 0) and one of the
uncertain findings; each task's prediction carries every finding's probability; answers come
back per finding (present / uncertain / absent), with what the reader was shown, and a
changed answer replaces the findings. Plus the ML backend's predict for findings scans and
the dynamic config of a project mixing a findings set with a single-label set."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from annotator import label_studio
from annotator.findings import findings_states
from annotator.models import Annotation, AuditEvent, LabelSet, LabelStudioTask
from ml_backend.label_studio_protocol import NO_FINDING, findings_confidence
from ml_backend.services.findings import findings_predictions
from tests.label_studio.conftest import ADMIN_EMAIL, ml_client
from tests.ml_backend.test_findings_refit import FINDINGS, findings_project  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True)]


def _answer(present=(), uncertain=()):
    result = [{"from_name": "findings", "to_name": "image", "type": "choices",
               "value": {"choices": list(present)}}]
    if uncertain:
        result.append({"from_name": "uncertain", "to_name": "image", "type": "choices",
                       "value": {"choices": list(uncertain)}})
    return result


def test_findings_round_trip_with_a_real_label_studio(findings_project, users,  # noqa: F811
                                                      linked_settings):
    project = findings_project
    call_command("refit", project=project.name)
    project.refresh_from_db()
    model = project.active_model
    assert model is not None and model.config["findings_sets"]
    users["alice"].email = ADMIN_EMAIL
    users["alice"].save()
    project.refit_every = 1000
    project.save()
    call_command("labelstudio_sync", project=project.name, create=True, scope="pool")
    project.refresh_from_db()
    ls = label_studio.client()
    ls_id = project.label_studio_project_id

    # pre-labelling is off (no model answer preselected), the image leaves room for the answer
    remote = ls.projects.get(id=ls_id)
    assert remote.show_collab_predictions is False and 'maxHeight="65vh"' in remote.label_config
    # the config: findings present (multiple, hotkeys 1-3, No finding on 0) and uncertain
    config = ls.projects.get(id=ls_id).label_config
    assert 'name="findings"' in config and 'name="uncertain"' in config
    assert config.count('choice="multiple"') == 2
    assert f'value="{NO_FINDING}" hotkey="0"' in config
    for name in FINDINGS:
        assert f'value="{name}"' in config

    # every unanswered pool scan is a task whose prediction carries every finding's score
    label_set = LabelSet.objects.get(project=project, name="brain findings")
    unanswered = project.scans.filter(split="pool").exclude(annotations__outcome="findings")
    tasks = {t.data["scan_id"]: t for t in ls.tasks.list(project=ls_id, fields="all")}
    assert set(tasks) == set(unanswered.values_list("pk", flat=True)) and len(tasks) > 10
    ours = findings_predictions(model, list(unanswered.select_related("label_set")))
    for scan_id, task in tasks.items():
        prediction = task.predictions[0]
        item = prediction.result[0]
        scores, thresholds = ours[scan_id]
        assert prediction.model_version == model.version
        assert set(item["scores"]) == set(FINDINGS)
        for name in FINDINGS:
            assert item["scores"][name] == pytest.approx(scores[name], abs=1e-4)
        above = [n for n in FINDINGS if scores[n] >= thresholds[n]]
        assert item["value"]["choices"] == (above or [NO_FINDING])
        assert prediction.score == pytest.approx(findings_confidence(scores, thresholds),
                                                 abs=1e-5)
    linked = LabelStudioTask.objects.get(project=project, scan_id=next(iter(tasks)))
    assert linked.shown_model_version == model and set(linked.shown_scores) == {
        str(f.pk) for f in label_set.classes.all()}

    # answers: present + uncertain, "No finding", and a contradictory one refused
    ids = sorted(tasks)
    both = ls.annotations.create(id=tasks[ids[0]].id, lead_time=3.5, result=_answer(
        ["glioma_tumor"], ["meningioma_tumor"]))
    none = ls.annotations.create(id=tasks[ids[1]].id, result=_answer([NO_FINDING]))
    wrong = ls.annotations.create(id=tasks[ids[2]].id,
                                  result=_answer([NO_FINDING, "pituitary_tumor"]))
    skipped = ls.annotations.create(id=tasks[ids[3]].id, was_cancelled=True, result=[])
    call_command("labelstudio_reconcile", project=project.name)
    names = {f.pk: f.name for f in label_set.classes.all()}
    got = Annotation.objects.get(source="label_studio", external_id=str(both.id))
    assert got.outcome == "findings" and got.reader == users["alice"]
    assert got.duration_ms == 3500 and got.shown_model_version == model
    assert got.shown_preselected is False
    assert {names[k]: v for k, v in findings_states(got).items()} == {
        "glioma_tumor": "present", "meningioma_tumor": "uncertain", "pituitary_tumor": "absent"}
    shown = {names[int(k)]: v for k, v in got.shown_scores.items()}
    assert shown == pytest.approx(ours[ids[0]][0], abs=1e-4)
    empty = Annotation.objects.get(source="label_studio", external_id=str(none.id))
    assert set(findings_states(empty).values()) == {"absent"} and len(findings_states(empty)) == 3
    assert not Annotation.objects.filter(external_id=str(wrong.id)).exists()
    assert Annotation.objects.get(external_id=str(skipped.id)).outcome == "skip"
    assert label_studio.reconcile(project)["created"] == 0          # a replay adds nothing

    # a changed answer replaces the findings, keeps the answer and is audited
    ls.annotations.update(id=both.id, result=_answer(["glioma_tumor", "pituitary_tumor"]))
    counts = label_studio.reconcile(project)    # the webhook may have brought it already
    assert counts["updated"] + counts["unchanged"] == 3 and counts["created"] == 0
    got.refresh_from_db()
    assert {names[k]: v for k, v in findings_states(got).items()} == {
        "glioma_tumor": "present", "meningioma_tumor": "absent", "pituitary_tumor": "present"}
    event = AuditEvent.objects.filter(object_type="annotation", object_id=str(got.pk),
                                      action="annotation.updated").latest("pk")
    assert event.details["findings_before"]["meningioma_tumor"] == "uncertain"
    assert event.details["findings"]["pituitary_tumor"] == "present"

    # a project that wants pre-labelling gets it at the next sync
    project.label_studio_prelabel = True
    project.save()
    label_studio.sync(project, scope="pool")
    assert ls.projects.get(id=ls_id).show_collab_predictions is True

    # "Retrieve predictions" calls our predict, which answers findings scans too
    response = ml_client().post(f"/ml/{project.pk}/predict",
                                {"tasks": [{"data": {"scan_id": ids[5]}}]},
                                content_type="application/json")
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["result"][0]["from_name"] == "findings"
    assert result["result"][0]["scores"] == pytest.approx(
        {k: round(v, 4) for k, v in ours[ids[5]][0].items()}, abs=1e-4)


def test_mixed_project_offers_findings_or_classes_per_task(findings_project,  # noqa: F811
                                                          label_studio_server, settings):
    """A findings set beside a single-label set: dynamic controls, each task filled with
    only its own set's choices; the real Label Studio takes the config and both kinds of
    task, and an answer of each kind comes back as ours."""
    from annotator import services
    from annotator.label_studio.config import _task_data, labeling_config

    project = findings_project
    chest = services.label_set_create(project=project, name="chest x-ray")
    services.label_class_get_or_create(project=project, name="pneumonia", label_set=chest)
    services.label_class_get_or_create(project=project, name="normal", label_set=chest)
    config = labeling_config(project)
    assert 'value="$classes"' in config and 'value="$findings"' in config
    assert 'value="$uncertain"' in config and "glioma_tumor" not in config
    assert 'required="true"' not in config       # findings tasks have no class to choose
    scan = project.scans.filter(label_set__name="brain findings").first()
    data = _task_data(scan, multi_set=True)
    assert data["classes"] == [] and data["findings_header"]
    assert [c["value"] for c in data["findings"]] == FINDINGS + [NO_FINDING]
    assert [c["value"] for c in data["uncertain"]] == FINDINGS

    # the real server accepts the config and a task of each kind, and both answers come back
    settings.LABEL_STUDIO_URL = label_studio_server["url"]
    settings.LABEL_STUDIO_API_KEY = label_studio_server["token"]
    ls = label_studio.client()
    remote = ls.projects.create(title="mixed sets", label_config=config)
    # a pool scan: only those may be Label Studio tasks (an eval scan's answer is refused)
    chest_scan = project.scans.filter(label_set__name="brain findings", split="pool").last()
    chest_scan.label_set = chest
    chest_scan.save(update_fields=["label_set"])
    created = ls.projects.import_tasks(remote.id, request=[
        {"data": data}, {"data": _task_data(chest_scan, multi_set=True)}], return_task_ids=True)
    findings_task, class_task = created.task_ids
    assert ls.tasks.get(id=class_task).data["classes"][0]["value"] in {"pneumonia", "normal"}
    answers = [
        ls.annotations.create(id=findings_task, result=_answer(["pituitary_tumor"])),
        ls.annotations.create(id=class_task, result=[{
            "from_name": "diagnosis", "to_name": "image", "type": "choices",
            "value": {"choices": ["pneumonia"]}}])]
    for made, task_id in zip(answers, created.task_ids):
        _, outcome = label_studio.ingest(project, annotation=made.dict(),
                                         task=ls.tasks.get(id=task_id).dict())
        assert outcome == "created", outcome
    assert Annotation.objects.get(external_id=str(answers[1].id)).label_class.name == "pneumonia"
    found = Annotation.objects.get(external_id=str(answers[0].id))
    assert found.outcome == "findings" and "present" in findings_states(found).values()
