"""A Celery worker killed (SIGKILL) in the middle of a retrain, on Redis and PostgreSQL: the
active model is unchanged and still serves, the run is marked abandoned with a reason once its
lease expires, a redelivered message does nothing twice, and a retry succeeds."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from annotator import label_page
from annotator.models import Annotation, LabelClass
from ml_backend import services as ml
from ml_backend.models import ModelVersion, TrainingRun
from ml_backend.ssl.train import load_classifier
from ml_backend.tasks import run_training
from tests.base import wait_for
from tests.conftest import brain_truth, start_worker, stop_worker

pytestmark = pytest.mark.worker




def test_sigkill_mid_retrain_leaves_the_active_model_serving_and_a_retry_succeeds(
        celery_worker_process, encoded_project, users, settings, tmp_path):
    project = encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for name in ("no_tumor", "pituitary_tumor"):
        for scan in [s for s in pool if brain_truth(s) == name][:4]:
            Annotation.objects.create(scan=scan, reader=users["alice"], label_class=classes[name])
    call_command("refit", project=project.name)
    project.refresh_from_db()
    active = project.active_model
    assert active is not None

    queue = celery_worker_process["queue"]
    worker = celery_worker_process["process"]
    run = ml.retrain_start(project=project, params={"epochs": 5000, "batch_size": 4})
    sent = time.monotonic()
    run_training.apply_async(args=[run.pk], queue=queue)
    wait_for(lambda: TrainingRun.objects.filter(pk=run.pk, status="running", progress__gt=0)
             .exists(), 120, "the retrain to be running")
    time.sleep(1.0)
    os.killpg(worker.pid, signal.SIGKILL)                 # no goodbye, no cleanup
    worker.wait(timeout=10)
    killed_after = time.monotonic() - sent
    progress_at_kill = TrainingRun.objects.get(pk=run.pk).progress

    # the active model is untouched and still serves
    project.refresh_from_db()
    assert project.active_model == active
    assert ml.predictor_for(active)(pool[:3]).shape == (3, 2)
    payload = label_page.label_payload(project=project, scan=pool[-1])
    assert payload["suggestion"]["model_version"] == active.version
    run.refresh_from_db()
    assert run.status == "running"                        # nobody told the database yet

    # a second retrain is refused while the lease holds (cron-safe) ...
    with pytest.raises(ml.RetrainSkipped, match="already running"):
        ml.retrain_start(project=project)
    # ... and once it expires the run is abandoned, with the reason, and so is its version
    TrainingRun.objects.filter(pk=run.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1))
    retry = ml.retrain_start(project=project, params={"epochs": 2, "batch_size": 4})
    run.refresh_from_db()
    assert run.status == "abandoned" and "stopped renewing its lease" in run.last_error
    if run.model_version_id:
        version = ModelVersion.objects.get(pk=run.model_version_id)
        assert version.status == "failed"
        checkpoint = ml.checkpoint_path(version, "classifier.pt")
        if checkpoint.exists():               # written atomically: whole, or not there
            load_classifier(checkpoint)

    # a redelivered message for the dead run does nothing
    assert run_training.apply(args=[run.pk]).get() == "skipped"

    # the retry on a fresh worker succeeds
    fresh, log = start_worker(settings, tmp_path, queue, name="worker-2")
    try:
        from medsite.celery import app

        app.conf.task_always_eager = False
        run_training.apply_async(args=[retry.pk], queue=queue)
        wait_for(lambda: TrainingRun.objects.filter(
            pk=retry.pk, status__in=["succeeded", "failed"]).exists(), 180, "the retry")
    finally:
        stop_worker(fresh)
    retry.refresh_from_db()
    assert retry.status == "succeeded", (retry.last_error, log.read_text()[-2000:])
    print(json.dumps({"killed_after_s": round(killed_after, 1),
                      "progress_at_kill": progress_at_kill, "active_model_kept": active.version,
                      "killed_run": run.status, "reason": run.last_error,
                      "retry": retry.status, "retry_seconds": round(
                          (retry.finished_at - retry.started_at).total_seconds(), 1),
                      "retry_model": retry.model_version.version,
                      "retry_model_status": retry.model_version.status}))
    assert retry.model_version.status in ("active", "ready")
    project.refresh_from_db()
    assert project.active_model in (active, retry.model_version)
