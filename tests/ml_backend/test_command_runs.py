"""The training commands as cron and an operator use them (tenth probe): two ``refit``s
started together were both gated against the same active version and both queued a round;
a ``retrain`` stopped with SIGTERM stayed "running" for its 30-minute lease and blocked the
next; ``pretrain`` on an empty project made failed runs; a refit of a fully labeled project
stored an empty round."""

from __future__ import annotations

import io
import os
import signal

import pytest
from django.core.management import CommandError, call_command

from annotator import services
from annotator.models import LabelClass
from ml_backend.models import QueryRound, TrainingRun
from ml_backend.services import training
from ml_backend.services.runs import training_run_create
from tests.base import FIXTURES
from tests.conftest import brain_truth, run_import

pytestmark = pytest.mark.django_db


def test_pretrain_on_an_empty_project_is_refused_and_makes_no_run(project):
    with pytest.raises(CommandError, match="Pretrain refused: pretraining needs at least 2 "
                                           "scans in the project \\(it has 0\\)"):
        call_command("pretrain", "--project", project.name, "--no-progress")
    assert not TrainingRun.objects.filter(project=project).exists()


@pytest.fixture
def scans(project):
    run_import(project, FIXTURES / "brain_mri" / "eval" / "glioma_tumor", layout="flat")
    return project


def test_a_run_of_the_same_kind_in_progress_is_said_and_nothing_is_made(scans):
    project = scans
    busy = training_run_create(project=project, kind="pretrain")        # queued
    out = io.StringIO()
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress",
                 stdout=out)
    assert f"Pretrain skipped: pretrain run #{busy.pk} is already queued (since " in \
        out.getvalue()
    assert TrainingRun.objects.filter(project=project).count() == 1


def test_sigterm_marks_the_run_stopped_and_the_next_run_starts(scans, monkeypatch):
    project = scans

    def killed(run, reporter):
        os.kill(os.getpid(), signal.SIGTERM)          # as `kill PID` during the training
        raise AssertionError("the signal should have stopped the run")

    monkeypatch.setitem(training.HANDLERS, "pretrain", killed)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CommandError, match="stopped by a signal; it is marked abandoned"):
        call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress")
    assert signal.getsignal(signal.SIGTERM) is previous          # put back
    stopped = TrainingRun.objects.get(project=project)
    assert stopped.status == TrainingRun.Status.ABANDONED
    assert "stopped by a signal" in stopped.last_error and stopped.lease_expires_at is None

    monkeypatch.setitem(training.HANDLERS, "pretrain", lambda run, reporter: None)
    call_command("pretrain", "--project", project.name, "--epochs", "0", "--no-progress",
                 stdout=io.StringIO())
    assert TrainingRun.objects.filter(project=project,
                                      status=TrainingRun.Status.SUCCEEDED).count() == 1


def test_a_refit_with_every_pool_scan_labeled_stores_no_empty_round(encoded_project, users):
    project = encoded_project
    classes = {c.name: c for c in LabelClass.objects.filter(project=project)}
    for scan in project.scans.filter(split="pool"):
        services.annotation_create(scan=scan, reader=users["alice"],
                                   label_class=classes[brain_truth(scan)])
    rounds = QueryRound.objects.filter(project=project).count()
    out = io.StringIO()
    call_command("refit", "--project", project.name, "--no-progress", stdout=out)
    run = TrainingRun.objects.filter(project=project, kind="refit").latest("pk")
    assert run.status == TrainingRun.Status.SUCCEEDED, run.last_error
    if project.__class__.objects.get(pk=project.pk).active_model_id:   # promoted: asked
        assert "no new query round: every pool scan" in run.log, run.log
    assert QueryRound.objects.filter(project=project).count() == rounds
