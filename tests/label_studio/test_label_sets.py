"""A project with two label sets in a real Label Studio 1.23.2: each task offers only its
scan's set's classes (dynamic choices), and an answer from another set is refused."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from annotator import label_studio
from annotator.models import Annotation, LabelStudioTask
from tests.label_studio.conftest import ADMIN_EMAIL
from tests.ml_backend.test_label_sets import BRAIN, CHEST, _two_sets

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_each_task_offers_only_its_label_sets_classes(project, users, linked_settings):
    users["alice"].email = ADMIN_EMAIL
    users["alice"].save()
    _two_sets(project, pool_limit=6)       # a few tasks per class: Label Studio is slow
    call_command("labelstudio_sync", project=project.name, create=True, scope="pool")
    project.refresh_from_db()
    ls = label_studio.client()
    ls_id = project.label_studio_project_id
    remote = ls.projects.get(id=ls_id)
    assert 'value="$classes"' in remote.label_config
    assert "glioma" not in remote.label_config           # no class is listed for every task

    tasks = {t.data["scan_id"]: t for t in ls.tasks.list(project=ls_id, fields="all")}
    linked = {t.scan_id: t.scan for t in LabelStudioTask.objects.filter(
        project=project).select_related("scan__label_set")}
    assert set(tasks) == set(linked)
    for scan_id, task in tasks.items():
        offered = {c["value"] for c in task.data["classes"]}
        expected = set(linked[scan_id].label_set.classes.values_list("name", flat=True))
        assert offered == expected, (linked[scan_id].label_set.name, offered)
        assert task.data["label_set"] == linked[scan_id].label_set.name
        assert {c.get("hotkey") for c in task.data["classes"]} <= {"1", "2", "3", "4"}

    chest = next(s for s in linked.values() if s.label_set.name == CHEST)
    brain = next(s for s in linked.values() if s.label_set.name == BRAIN)
    right = ls.annotations.create(id=tasks[chest.pk].id, result=[{
        "from_name": "diagnosis", "to_name": "image", "type": "choices",
        "value": {"choices": ["pneumonia"]}}])
    wrong = ls.annotations.create(id=tasks[brain.pk].id, result=[{
        "from_name": "diagnosis", "to_name": "image", "type": "choices",
        "value": {"choices": ["normal"]}}])             # forced through the API
    call_command("labelstudio_reconcile", project=project.name)
    got = Annotation.objects.get(source="label_studio", external_id=str(right.id))
    assert got.scan == chest and got.label_class.name == "pneumonia"
    assert not Annotation.objects.filter(source="label_studio",
                                         external_id=str(wrong.id)).exists()

    # a class added to one set reaches that set's tasks, and only those
    from annotator import services

    brain_set = brain.label_set
    services.label_class_get_or_create(project=project, name="glioma_tumor",
                                       label_set=brain_set)
    label_studio.push_config(project, ls=ls)
    after = {t.data["scan_id"]: {c["value"] for c in t.data["classes"]}
             for t in ls.tasks.list(project=ls_id, fields="all")}
    assert "glioma_tumor" in after[brain.pk] and "glioma_tumor" not in after[chest.pk]


def test_a_new_round_reaches_label_studio_by_itself(encoded_project, users, linked_settings):
    """Linked with the current round only: when the next round is chosen, its scans become
    Label Studio tasks without a manual sync (and not when the project opts out)."""
    from annotator.models import LabelClass
    from ml_backend import services as ml

    project = encoded_project
    call_command("labelstudio_sync", project=project.name, create=True, scope="round")
    project.refresh_from_db()
    ls = label_studio.client()
    first = set(LabelStudioTask.objects.filter(project=project).values_list("scan_id", flat=True))
    assert first and len(first) == project.query_batch_size
    label_class = LabelClass.objects.filter(project=project).first()
    for scan_id in first:                    # the round is read: the next one is chosen
        Annotation.objects.create(scan_id=scan_id, reader=users["bob"], label_class=label_class)
    new_round = ml.query_round_create(project=project, strategy="random")
    expected = first | set(new_round.items.values_list("scan_id", flat=True))
    remote = {t.data["scan_id"] for t in ls.tasks.list(project=project.label_studio_project_id,
                                                       fields="all")}
    assert remote == expected and len(expected) > len(first)
    # a project that opts out keeps its tasks as they are
    project.label_studio_push_rounds = False
    project.save()
    Annotation.objects.bulk_create([Annotation(scan_id=s, reader=users["bob"],
                                               label_class=label_class)
                                    for s in expected - first])
    ml.query_round_create(project=project, strategy="random")
    assert LabelStudioTask.objects.filter(project=project).count() == len(expected)
