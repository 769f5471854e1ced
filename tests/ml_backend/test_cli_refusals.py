"""The commands and the beat schedule ask the refusal the API asks (``runs.run_refusal``)
before they make a run: a refit, retrain or embed that could only fail is refused in the
sentence the run would have failed with, and no run is made. Beat skips such a project
with a log line instead of adding a failed retrain every time it fires (a failed run does
not count as a retrain, so ``if_new_labels`` never stops it). ``query`` with nothing to
choose from is refused instead of storing an empty round."""

from __future__ import annotations

import logging
import shutil

import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import LabelClass
from ml_backend.models import QueryRound, TrainingRun
from ml_backend.services import runs
from ml_backend.tasks import scheduled_retrain
from tests.base import FIXTURES
from tests.conftest import _import_brain, brain_truth, run_import
from tests.factories import model_version_with_files

pytestmark = pytest.mark.django_db


@pytest.fixture
def one_class(project, users):
    """The probe's P-OneClass: an active encoder (placeholder files: no run here gets as far
    as reading them) and 10 pool labels, all of one class."""
    _import_brain(project)
    encoder = model_version_with_files(project, "enc-cli", kind="encoder", status="active")
    project.active_encoder = encoder
    project.save(update_fields=["active_encoder"])
    no_tumor = LabelClass.objects.get(project=project, name="no_tumor")
    for scan in [s for s in project.scans.filter(split="pool").order_by("pk")
                 if brain_truth(s) == "no_tumor"][:10]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=no_tumor)
    return project


def test_cli_retrain_and_refit_refuse_in_the_runs_own_words_and_make_no_run(one_class):
    project = one_class
    retrain = runs.retrain_refusal(project, {"epochs": 30})
    refit = runs.refit_refusal(project)
    assert "(have 10 labels in 1 class(es))" in retrain and "labels of 1 class so far" in refit
    with pytest.raises(CommandError) as refused:
        call_command("retrain", "--project", project.name, "--no-progress")
    assert str(refused.value) == f"Retrain refused: {retrain}."
    with pytest.raises(CommandError) as refused:
        call_command("retrain", "--project", project.name, "--if-new-labels", "10",
                     "--no-progress")
    assert str(refused.value) == f"Retrain refused: {retrain}."
    with pytest.raises(CommandError) as refused:
        call_command("refit", "--project", project.name, "--no-progress")
    assert str(refused.value) == f"Refit refused: {refit}."
    assert not TrainingRun.objects.filter(project=project).exists()


def test_cli_embed_and_refit_without_an_encoder_are_refused(project):
    _import_brain(project)
    for command in ("embed", "refit", "retrain"):
        with pytest.raises(CommandError) as refused:
            call_command(command, "--project", project.name, "--no-progress")
        assert str(refused.value) == f"{command.capitalize()} refused: {runs.NO_ENCODER}."
    assert not TrainingRun.objects.filter(project=project).exists()


def test_beat_skips_a_retrain_that_could_only_fail_with_a_log_line(one_class, caplog):
    """The probe: ``retrain_start(if_new_labels=10, enqueue=True)`` twice, as beat does,
    made failed runs 17 and 18. Now beat skips the project, says why at INFO, makes none."""
    project = one_class
    with caplog.at_level(logging.INFO, logger="ml_backend.tasks"):
        assert scheduled_retrain(if_new_labels=10) == []
        assert scheduled_retrain(if_new_labels=10) == []
    assert not TrainingRun.objects.filter(project=project).exists()
    said = [r for r in caplog.records if r.name == "ml_backend.tasks"]
    assert len(said) == 2 and all(r.levelno == logging.INFO for r in said)
    assert runs.retrain_refusal(project) in said[0].getMessage()
    assert project.name in said[0].getMessage()


def test_beat_warns_when_the_encoders_files_are_missing(one_class, users, caplog):
    """Labels of two classes, but the encoder's folder is gone: a person must act, so the
    skip is a WARNING, and the retrain, refit and embed commands say the same."""
    project = one_class
    pituitary = LabelClass.objects.get(project=project, name="pituitary_tumor")
    for scan in [s for s in project.scans.filter(split="pool").order_by("pk")
                 if brain_truth(s) == "pituitary_tumor"][:10]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=pituitary)
    assert runs.retrain_refusal(project) is None
    shutil.rmtree(project.active_encoder.artifact_dir)
    missing = runs.encoder_files_refusal(project)
    assert missing.startswith("the active encoder enc-cli's files are missing (its folder ")
    with caplog.at_level(logging.INFO, logger="ml_backend.tasks"):
        assert scheduled_retrain(if_new_labels=10) == []
    said = [r for r in caplog.records if r.name == "ml_backend.tasks"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert missing in said[0].getMessage()
    for command in ("retrain", "refit", "embed"):
        with pytest.raises(CommandError) as refused:
            call_command(command, "--project", project.name, "--no-progress")
        assert str(refused.value) == f"{command.capitalize()} refused: {missing}."
    assert not TrainingRun.objects.filter(project=project).exists()


def test_beat_still_starts_a_retrain_that_can_run(one_class, users):
    project = one_class
    pituitary = LabelClass.objects.get(project=project, name="pituitary_tumor")
    for scan in [s for s in project.scans.filter(split="pool").order_by("pk")
                 if brain_truth(s) == "pituitary_tumor"][:10]:
        services.annotation_create(scan=scan, reader=users["alice"], label_class=pituitary)
    started = scheduled_retrain(if_new_labels=10)
    run = TrainingRun.objects.get(project=project)
    assert started == [f"{project.name}: run {run.pk}"] and run.kind == "retrain"


def test_cli_query_with_nothing_to_choose_stores_no_round(project, other_project):
    with pytest.raises(CommandError) as refused:              # an empty project
        call_command("query", "--project", project.name)
    assert str(refused.value) == ("No query round: the project has no pool scans to choose "
                                  "from: import pool scans first (`manage.py import_scans … "
                                  "--split pool`).")
    run_import(other_project, FIXTURES / "brain_mri" / "eval" / "no_tumor", layout="flat",
               split="eval", default_label="no_tumor")        # an eval-only project
    with pytest.raises(CommandError) as refused:
        call_command("query", "--project", other_project.name)
    assert "has no pool scans to choose from (its 10 other scans are eval scans" in str(
        refused.value)
    assert not QueryRound.objects.exists()


def test_cli_query_when_every_pool_scan_is_labeled(project, users):
    run_import(project, FIXTURES / "brain_mri" / "pool" / "no_tumor", layout="flat",
               default_label="no_tumor")                        # every pool scan labeled
    with pytest.raises(CommandError) as refused:
        call_command("query", "--project", project.name, "--strategy", "random")
    pool = project.scans.filter(split="pool").count()
    assert str(refused.value) == (f"No query round: every pool scan ({pool}) is labeled: "
                                  "import more scans to go on.")
    assert not QueryRound.objects.exists()
