"""The ML adapter end to end on real fixture scans: pretrain → embed → similar → fine-tune →
distill, as commands and as Celery tasks; failures never touch the active models."""

from __future__ import annotations

import time

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from annotator.models import Annotation, Scan
from ml_backend import services
from ml_backend.models import Evaluation, ModelVersion, Prediction, TrainingRun
from ml_backend.tasks import run_training
from tests.base import FIXTURES
from tests.conftest import run_import

TINY = ["--epochs", "2", "--image-size", "32", "--batch-size", "32", "--no-progress"]


def brain_project(project, classes=("no_tumor", "pituitary_tumor")):
    for name in classes:
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   default_label=name, dataset_name="brain")
        run_import(project, FIXTURES / "brain_mri" / "eval" / name, layout="flat",
                   default_label=name, dataset_name="brain", split="eval")
    return project


@pytest.mark.sqlite_pass
def test_an_encoder_embeds_at_the_scales_it_was_made_with(project, settings):
    settings.EMBED_SCALES = [1]                     # MEDLABEL_EMBED_SCALES=1: one size
    settings.EMBED_LAYERS = [4]                     # MEDLABEL_EMBED_LAYERS=4: its output
    brain_project(project)
    call_command("pretrain", "--project", project.name, *TINY)
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder.config["embed_scales"] == [1] and encoder.config["embed_layers"] == [4]
    paths = services.embeddings_paths(encoder)
    assert np.load(paths["vectors"]).shape == (100, 512)
    # a later change of the settings leaves this encoder's vectors (and every head fit on
    # them) alone: it applies to encoders made after it
    settings.EMBED_SCALES, settings.EMBED_LAYERS = [1, 2], [3, 4]
    call_command("embed", "--project", project.name, "--full")
    assert np.load(paths["vectors"]).shape == (100, 512)
    scan = Scan.objects.filter(split="pool").first()
    assert len(services.similar_scans(scan=scan, k=3)) == 3


@pytest.mark.sqlite_pass
def test_pretrain_embed_similar_finetune_distill(project, settings, capsys):
    brain_project(project)
    call_command("pretrain", "--project", project.name, *TINY)
    project.refresh_from_db()
    encoder = project.active_encoder
    assert encoder is not None and encoder.status == ModelVersion.Status.ACTIVE
    assert encoder.kind == "encoder" and encoder.config["pretrain"]["image_size"] == 32
    run = TrainingRun.objects.get(kind="pretrain")
    assert run.status == "succeeded" and run.progress == 1.0 and "final loss" in run.log
    paths = services.embeddings_paths(encoder)
    ids = np.load(paths["ids"])
    assert sorted(ids.tolist()) == sorted(Scan.objects.values_list("pk", flat=True))
    # read at 32 and 64 px (the default embed_scales 1,2), each pooled from the third
    # stage and the output (embed_layers 3,4): 256 + 512 features per size, side by side
    assert encoder.config["embed_scales"] == [1, 2] and encoder.config["embed_layers"] == [3, 4]
    assert np.load(paths["vectors"]).shape == (100, 1536)
    out = capsys.readouterr().out
    assert "succeeded" in out and encoder.version in out

    scan = Scan.objects.filter(split="pool").first()
    hits = services.similar_scans(scan=scan, k=5)
    assert len(hits) == 5 and scan.pk not in [s.pk for s, _ in hits]
    assert all(-1.0 <= score <= 1.0001 for _, score in hits)
    assert [score for _, score in hits] == sorted([score for _, score in hits], reverse=True)
    Annotation.objects.filter(scan__split="pool").exclude(scan__pk__in=[h.pk for h, _ in hits[:2]]).delete()
    labeled = services.similar_scans(scan=scan, k=5, labeled_only=True)
    assert {s.pk for s, _ in labeled} <= {h.pk for h, _ in hits[:2]} | set(
        Annotation.objects.values_list("scan_id", flat=True))
    call_command("similar", str(scan.pk), "-k", "3")
    assert len(capsys.readouterr().out.strip().splitlines()) == 3

    # new scans are embedded incrementally, old vectors kept
    brain_project(project, classes=("glioma_tumor",))
    call_command("embed", "--project", project.name, "--no-progress")
    assert len(np.load(paths["ids"])) == 150
    # the imports themselves embedded their 40 + 10 new scans (for their novelty reports)
    logs = [run.log for run in TrainingRun.objects.filter(kind="embed").order_by("pk")]
    assert any("embedding 40 scans" in log for log in logs)
    assert any("embedding 10 scans" in log for log in logs)
    assert "embedding 0 scans" in logs[-1] and "(150 already embedded)" in logs[-1]

    # labels back for fine-tuning: re-import the pool with labels
    for name in ("no_tumor", "pituitary_tumor"):
        run_import(project, FIXTURES / "brain_mri" / "pool" / name, layout="flat",
                   default_label=name, dataset_name="brain")
    # a class network reads at twice the encoder's size by default: it learns and predicts
    # on 64 px scans
    call_command("finetune", "--project", project.name, "--epochs", "3", "--batch-size", "32",
                 "--no-progress")
    project.refresh_from_db()
    classifier = project.active_model
    assert classifier is not None and classifier.parent == encoder
    assert classifier.config["input_size"] == 64 and classifier.config["finetune"]["input_scale"] == 2
    assert "scans read at 64 px" in TrainingRun.objects.filter(kind="retrain").latest("pk").log
    assert classifier.status_reason == "promoted: the first classifier of this project"
    assert {c["name"] for c in classifier.config["classes"]} == {
        "no_tumor", "pituitary_tumor", "glioma_tumor"}
    evaluation = Evaluation.objects.get(model_version=classifier)
    assert evaluation.num_eval == 30 and 0 <= evaluation.macro_f1 <= 1
    assert set(evaluation.report["per_class"]) == {"no_tumor", "pituitary_tumor", "glioma_tumor"}
    assert Prediction.objects.filter(model_version=classifier).count() == Scan.objects.filter(
        split="pool").count()

    with pytest.raises(CommandError, match="teacher_temperature must be positive"):
        call_command("distill", "--project", project.name, "--teacher-temperature", "0")
    with pytest.raises(CommandError, match="temperature must be positive"):
        call_command("distill", "--project", project.name, "--temperature", "-1")
    runs_before = TrainingRun.objects.count()
    call_command("distill", "--project", project.name, "--epochs", "1", "--batch-size", "32",
                 "--teacher-temperature", "0.5", "--no-progress")
    assert TrainingRun.objects.count() == runs_before + 1   # the refused ones queued nothing
    student = ModelVersion.objects.filter(kind="classifier").latest("pk")
    assert student.config["kind"] == "distilled" and student.config["teacher"] == classifier.version
    assert student.config["distill"]["teacher_temperature"] == 0.5   # saved with the version
    assert student.status in ("active", "ready") and student.status_reason
    assert Evaluation.objects.filter(model_version=student).exists()
    # the student reads at its teacher's size
    from ml_backend.services.artifacts import checkpoint_path
    from ml_backend.ssl.checkpoints import load_classifier
    assert load_classifier(checkpoint_path(student, "classifier.pt"))[1].image_size == 64


def test_failed_runs_leave_active_models_untouched(project, settings):
    brain_project(project)
    old_encoder = ModelVersion.objects.create(project=project, kind="encoder", version="old-enc",
                                              status="active")
    project.active_encoder = old_encoder
    project.save()
    run = services.training_run_create(project=project, kind="pretrain",
                                       params={"epochs": 1, "image_size": 32, "batch_size": 16,
                                               "temperature": 1e-45})
    finished = services.training_run_execute(run.pk)
    assert finished.status == "failed" and "non-finite loss" in finished.last_error
    project.refresh_from_db()
    assert project.active_encoder == old_encoder
    assert finished.model_version.status == ModelVersion.Status.FAILED

    # the failed pretraining left the old encoder active, and that one has no files here
    with pytest.raises(CommandError, match="needs labeled pool scans of at least 2 classes|"
                                           "cannot read checkpoint|checkpoint not found|"
                                           "the active encoder old-enc's files are missing"):
        call_command("finetune", "--project", project.name, "--no-progress")
    project.refresh_from_db()
    assert project.active_model is None and project.active_encoder == old_encoder


def test_duplicate_delivery_is_a_noop(project):
    run = services.training_run_create(project=project, kind="embed")
    assert run_training.apply(args=[run.pk]).get() == "failed"    # no encoder yet: clear error
    assert run_training.apply(args=[run.pk]).get() == "skipped"
    run.refresh_from_db()
    assert "no active encoder" in run.last_error


@pytest.mark.worker
def test_pretrain_runs_on_a_real_worker(celery_worker_process, project):
    brain_project(project)
    run = services.training_run_create(project=project, kind="pretrain",
                                       params={"epochs": 1, "image_size": 32, "batch_size": 32})
    result = run_training.apply_async(args=[run.pk], queue=celery_worker_process["queue"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.status in ("succeeded", "failed"):
            break
        time.sleep(1)
    log = celery_worker_process["log"].read_text()
    assert run.status == "succeeded", (run.last_error, log[-3000:])
    assert result.id in log
    project.refresh_from_db()
    assert project.active_encoder == run.model_version


def test_killed_pretraining_resumes_from_its_last_epoch(project, capsys):
    run_import(project, FIXTURES / "brain_mri" / "eval", layout="flat")   # 40 scans
    run = services.training_run_create(project=project, kind="pretrain", params={
        "epochs": 2, "image_size": 32, "batch_size": 16, "small_input": False})

    def crash_in_epoch_two(event):
        if event.get("stage") == "pretrain" and event["epoch"] == 2:
            raise RuntimeError("worker lost")

    failed = services.training_run_execute(run.pk, progress=crash_in_epoch_two)
    assert failed.status == "failed" and "worker lost" in failed.last_error
    version = failed.model_version
    assert version.status == ModelVersion.Status.FAILED
    project.refresh_from_db()
    assert project.active_encoder is None

    call_command("pretrain", "--project", project.name, "--resume", version.version, "--no-progress")
    version.refresh_from_db()
    project.refresh_from_db()
    assert project.active_encoder == version and version.status == ModelVersion.Status.ACTIVE
    assert version.metrics["pretrain"]["note"] == "resumed at epoch 1"
    assert [h["epoch"] for h in version.metrics["pretrain"]["history"]] == [1, 2]
    with pytest.raises(CommandError, match="only an unfinished or failed pretraining"):
        call_command("pretrain", "--project", project.name, "--resume", version.version,
                     "--no-progress")
