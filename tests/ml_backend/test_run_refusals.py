"""A refit or retrain that could only fail is refused before a run is created: the API's
refit and retrain answer 409 and Label Studio's START_TRAINING answers 409, each with the
very sentence the run would have failed with (one check, ``runs.refit_refusal`` /
``runs.retrain_refusal``, that the run itself asks first). Once the labels are there, the run
is queued as before."""

from __future__ import annotations

import json

import pytest

from annotator import services
from annotator.models import LabelClass
from ml_backend.models import TrainingRun
from ml_backend.services import runs
from tests.api.test_api import api
from tests.conftest import _import_brain, brain_truth
from tests.factories import model_version_with_files
from tests.label_studio.conftest import ML_AUTH, ml_client

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def ml_backend_password(settings):
    settings.ML_BACKEND_BASIC_AUTH = ML_AUTH        # as in production (the sync registers it)


@pytest.fixture
def encoded(project):
    """Brain-MRI fixture scans (pool unlabeled, eval labeled by the import) and an active
    encoder row (its file a placeholder: no run here gets as far as reading it)."""
    _import_brain(project)
    encoder = model_version_with_files(project, "enc-refusals", kind="encoder", status="active")
    project.active_encoder = encoder
    project.save(update_fields=["active_encoder"])
    return project


def _label(project, reader, name: str, n: int) -> None:
    label_class = LabelClass.objects.get(project=project, name=name)
    scans = [s for s in project.scans.filter(split="pool").order_by("pk")
             if brain_truth(s) == name][:n]
    for scan in scans:
        services.annotation_create(scan=scan, reader=reader, label_class=label_class)


def _start_training(project):
    return ml_client().post(f"/ml/{project.pk}/webhook", data=json.dumps(
        {"action": "START_TRAINING", "project": {"id": 1}}), content_type="application/json")


def test_refit_and_retrain_with_no_pool_labels_are_409_and_create_no_run(encoded, users):
    """The probe's calls: a reviewer's refit and retrain, and Label Studio's START_TRAINING,
    in a project whose pool has no label: 409 with the run's own sentence, no run."""
    project = encoded
    bob = api(users["bob"])                                        # a reviewer
    base = f"/api/v1/projects/{project.pk}"
    refit = bob.post(f"{base}/refit/")
    assert refit.status_code == 409, refit.content
    assert refit["Content-Type"] == "application/problem+json"
    assert refit.json()["detail"] == (
        "a refit needs labeled pool scans of at least 2 classes in one label set, or findings "
        "answers (have 0 labels; no labels yet)")
    retrain = bob.post(f"{base}/retrain/")
    assert retrain.status_code == 409 and retrain.json()["detail"] == (
        "fine-tuning needs labeled pool scans of at least 2 classes (have 0 labels in 0 "
        "class(es))")
    admin = api(users["dora"]).post(f"{base}/refit/")               # a site admin alike
    assert admin.status_code == 409
    hook = _start_training(project)
    assert hook.status_code == 409 and hook.json() == {"error": refit.json()["detail"]}
    assert not TrainingRun.objects.filter(project=project).exists()


def test_labels_of_one_class_are_refused_with_the_sentence_the_run_fails_with(encoded, users):
    project = encoded
    _label(project, users["alice"], "no_tumor", 3)
    bob = api(users["bob"])
    base = f"/api/v1/projects/{project.pk}"
    refit = bob.post(f"{base}/refit/")
    set_name = LabelClass.objects.get(project=project, name="no_tumor").label_set.name
    assert refit.status_code == 409 and refit.json()["detail"] == (
        "a refit needs labeled pool scans of at least 2 classes in one label set, or findings "
        f"answers (have 3 labels; {set_name}: labels of 1 class so far)")
    retrain = bob.post(f"{base}/retrain/")
    assert retrain.status_code == 409 and "(have 3 labels in 1 class(es))" in retrain.json()[
        "detail"]
    assert _start_training(project).status_code == 409
    assert not TrainingRun.objects.filter(project=project).exists()
    # the runs, had they been created, fail with exactly these sentences (one check)
    for kind, answer in (("refit", refit), ("retrain", retrain)):
        run = runs.training_run_create(project=project, kind=kind)
        runs.training_run_execute(run.pk)
        run.refresh_from_db()
        assert (run.status, run.last_error) == ("failed", answer.json()["detail"])


def test_with_labels_of_two_classes_the_runs_are_queued_as_before(encoded, users):
    project = encoded
    _label(project, users["alice"], "no_tumor", 2)
    _label(project, users["alice"], "pituitary_tumor", 2)
    assert runs.refit_refusal(project) is None and runs.retrain_refusal(project) is None
    bob = api(users["bob"])
    base = f"/api/v1/projects/{project.pk}"
    refit = bob.post(f"{base}/refit/")
    assert refit.status_code == 201, refit.content
    assert TrainingRun.objects.get(pk=refit.json()["run"]).kind == "refit"
    again = _start_training(project)                      # that refit is queued already
    assert again.status_code == 200 and again.json()["run"] == refit.json()["run"]
    retrain = bob.post(f"{base}/retrain/")
    assert retrain.status_code == 201 and TrainingRun.objects.get(
        pk=retrain.json()["run"]).kind == "retrain"


def test_no_encoder_is_still_refused_first(project, users):
    """Without an encoder the answers stay what they were (the labels are not the reason)."""
    _import_brain(project)
    bob = api(users["bob"])
    refit = bob.post(f"/api/v1/projects/{project.pk}/refit/")
    assert refit.status_code == 409 and "no encoder" in refit.json()["detail"]
    retrain = bob.post(f"/api/v1/projects/{project.pk}/retrain/")
    assert retrain.status_code == 409 and retrain.json()["detail"] == runs.NO_ENCODER
    assert _start_training(project).status_code == 409
    assert not TrainingRun.objects.filter(project=project).exists()
