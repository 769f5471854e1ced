"""Cron-safe retrain (lock, --if-new-labels, expired leases) and admin promote / roll back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from annotator.models import Annotation
from ml_backend import services
from ml_backend.models import ModelVersion, TrainingRun
from tests.base import FIXTURES, PASSWORD
from tests.conftest import run_import


def test_second_retrain_while_one_runs_exits_cleanly(project, capsys):
    busy = TrainingRun.objects.create(project=project, kind="retrain", status="running",
                                      started_at=timezone.now(),
                                      lease_expires_at=timezone.now() + timedelta(minutes=10))
    call_command("retrain", "--project", project.name)
    assert f"Retrain skipped: retrain run #{busy.pk} is already running" in capsys.readouterr().out
    assert TrainingRun.objects.filter(kind="retrain").count() == 1


def test_killed_worker_lease_expires_then_retrain_may_start(project, capsys):
    model = ModelVersion.objects.create(project=project, kind="classifier", version="half-done")
    TrainingRun.objects.create(project=project, kind="retrain", status="running",
                               claimed_by="host:123", model_version=model,
                               lease_expires_at=timezone.now() - timedelta(minutes=1))
    with pytest.raises(CommandError, match="no active encoder"):   # the new run starts and
        call_command("retrain", "--project", project.name, "--no-progress")  # fails clearly
    abandoned = TrainingRun.objects.get(claimed_by="host:123")
    assert abandoned.status == "abandoned" and "stopped renewing its lease" in abandoned.last_error
    model.refresh_from_db()
    assert model.status == "failed"


def test_if_new_labels_waits_for_enough_labels(project, capsys):
    run_import(project, FIXTURES / "chest_xray" / "pool" / "normal", layout="flat",
               default_label="normal")
    TrainingRun.objects.create(project=project, kind="retrain", status="succeeded")
    call_command("retrain", "--project", project.name, "--if-new-labels", "5")
    assert "0 new labels since the last retrain; waiting for 5" in capsys.readouterr().out
    Annotation.objects.update(created_at=timezone.now() + timedelta(seconds=5))
    with pytest.raises(services.TrainingError, match="no active encoder"):
        services.retrain_start(project=project, if_new_labels=5)   # refused: would fail
    assert not TrainingRun.objects.filter(status="queued").exists()
    run = services.retrain_start(project=project, if_new_labels=5, refuse=False)
    assert run.kind == "retrain" and run.status == "queued"


def test_admin_promote_and_roll_back(client, users, project):
    from annotator.services import label_class_get_or_create
    from tests.factories import model_version_with_files

    normal, _ = label_class_get_or_create(project=project, name="normal")
    old = model_version_with_files(project, "clf-old", status="training", classes=[normal])
    new = model_version_with_files(project, "clf-new", classes=[normal])
    services.model_version_activate(old, reason="first")
    assert client.login(username="dora", password=PASSWORD)
    url = reverse("admin:ml_backend_modelversion_changelist")
    client.post(url, {"action": "promote", "_selected_action": [new.pk]})
    project.refresh_from_db()
    old.refresh_from_db()
    assert project.active_model == new and old.status == "retired"
    client.post(url, {"action": "roll_back", "_selected_action": [new.pk]})
    project.refresh_from_db()
    assert project.active_model == old
    assert "rolled back from clf-new by dora" in ModelVersion.objects.get(pk=old.pk).status_reason


def test_refit_is_queued_after_refit_every_labels_with_current_settings(
        project, users, django_capture_on_commit_callbacks):
    from annotator import services as annotator_services
    from annotator.models import LabelClass, Project, Scan

    encoder = ModelVersion.objects.create(project=project, kind="encoder", version="enc-x",
                                          status="active")
    project.active_encoder = encoder
    project.save()
    run_import(project, FIXTURES / "chest_xray" / "pool" / "normal", layout="flat")
    normal = LabelClass.objects.create(project=project, name="normal")
    pneumonia = LabelClass.objects.create(project=project, name="pneumonia")
    scans = list(Scan.objects.filter(project=project, split="pool").select_related("project")[:8])
    Project.objects.filter(pk=project.pk).update(refit_every=8)   # changed after scans loaded
    with django_capture_on_commit_callbacks(execute=True):
        for scan in scans[:7]:
            annotator_services.annotation_create(scan=scan, reader=users["alice"],
                                                 label_class=normal)
    assert not TrainingRun.objects.filter(kind="refit").exists()
    with django_capture_on_commit_callbacks(execute=True):
        # the 8th label, of a second class: a refit has something to fit (one class alone
        # queues none: test_label_sets)
        annotator_services.annotation_create(scan=scans[7], reader=users["alice"],
                                             label_class=pneumonia)
    refit = TrainingRun.objects.get(kind="refit")
    assert refit.status == "failed"   # this fake encoder has no files: a clear error, no crash
    assert refit.last_error
