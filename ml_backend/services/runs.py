"""Training runs: create, claim (exactly once), execute with a lease, abandon, and the ONE
place a retrain or a refit is started (a lock on the project row makes concurrent callers
agree). Imports no torch: the handlers are looked up when a run executes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from annotator.models import Annotation, Project
from ml_backend.errors import RetrainSkipped, RunBusy, TrainingError
from medsite.when import in_words
from ml_backend.models import ModelVersion, TrainingRun

logger = logging.getLogger(__name__)

LEASE = timedelta(minutes=30)


Progress = Callable[[dict], None]


def training_run_create(*, project: Project, kind: str, params: dict | None = None,
                        requested_by=None, enqueue: bool = False) -> TrainingRun:
    """Record a run; with ``enqueue`` the Celery task is sent once the row is committed."""
    if kind not in TrainingRun.Kind.values:
        raise ValueError(f"unknown run kind {kind!r}")
    run = TrainingRun.objects.create(project=project, kind=kind, params=params or {},
                                     requested_by=requested_by)
    if enqueue:
        from ml_backend import dispatch

        transaction.on_commit(lambda: dispatch.enqueue_training_run(run.pk))
    return run


def training_run_claim(run_id: int) -> bool:
    """Claim a queued run for this worker. Exactly one caller gets True."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING, started_at=now, lease_expires_at=now + LEASE,
        claimed_by=f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}",
    )
    return claimed == 1


class RunReporter:
    """Writes progress and log lines to the run row, at most every few seconds."""

    def __init__(self, run: TrainingRun, echo: Progress | None = None, every: float = 3.0):
        self.run, self.echo, self.every, self.last = run, echo, every, 0.0

    def log(self, line: str) -> None:
        self.run.log += f"{in_words(seconds=True, date=False)} {line}\n"
        self.run.save(update_fields=["log"])

    def __call__(self, event: dict) -> None:
        if self.echo is not None:
            self.echo(event)
        fraction = _fraction(event)
        now = time.monotonic()
        if fraction is not None and (now - self.last >= self.every or fraction >= 1.0):
            self.last = now
            self.run.progress = round(fraction, 4)
            self.run.lease_expires_at = timezone.now() + LEASE
            self.run.save(update_fields=["progress", "lease_expires_at"])


def _fraction(event: dict) -> float | None:
    if "epochs" in event:
        step = event.get("step", event.get("steps", 1))
        steps = max(event.get("steps", 1), 1)
        return min(1.0, (event["epoch"] - 1 + step / steps) / event["epochs"])
    if "total" in event:
        return min(1.0, event["done"] / max(event["total"], 1))
    return None


def training_run_execute(run_id: int, *, progress: Progress | None = None) -> TrainingRun | None:
    """Claim and run one TrainingRun. Returns None when another worker has it."""
    if not training_run_claim(run_id):
        logger.info("training run %s already claimed or finished", run_id)
        return None
    from ml_backend.services.training import (
        HANDLERS,  # torch: only in a process that trains
    )

    run = TrainingRun.objects.select_related("project").get(pk=run_id)
    reporter = RunReporter(run, progress)
    try:
        HANDLERS[run.kind](run, reporter)
        run.status = TrainingRun.Status.SUCCEEDED
        run.progress = 1.0
    except KeyboardInterrupt:
        # Ctrl+C, or SIGTERM in a command (``_runs.run_existing`` turns it into this): the
        # row says so now, rather than "running" until its lease runs out half an hour later
        # and blocks the next run of its kind until then
        _run_stopped(run, "stopped by a signal (SIGTERM or Ctrl+C) while it ran")
        raise
    except TrainingError as exc:
        run.status, run.last_error = TrainingRun.Status.FAILED, str(exc)
    except Exception as exc:  # the run's boundary: the row must say what happened
        logger.exception("training run %s crashed", run_id)
        run.status = TrainingRun.Status.FAILED
        run.last_error = f"unexpected error: {type(exc).__name__}: {exc}"
    # run.model_version is always the version this run created (embed runs create none).
    if run.status == TrainingRun.Status.FAILED and run.model_version is not None:
        version = run.model_version
        version.status = ModelVersion.Status.FAILED
        version.status_reason = run.last_error[:2000]
        version.save(update_fields=["status", "status_reason"])
    run.finished_at = timezone.now()
    run.lease_expires_at = None
    run.save()
    if run.kind == TrainingRun.Kind.REFIT and run.status == TrainingRun.Status.SUCCEEDED:
        # labels that arrived while it ran (a Label Studio batch, a fast reader) bring the
        # next refit now rather than at the next answer, which may never come
        try:
            follow = refit_start_if_due(project=run.project)
        except Exception:   # noqa: BLE001 - the finished run stays as it is
            logger.exception("could not queue the refit after run %s", run.pk)
        else:
            if follow is not None:
                logger.info("refit run %s queued after run %s: labels arrived while it ran",
                            follow.pk, run.pk)
    return run


def _run_stopped(run: TrainingRun, reason: str) -> None:
    run.status, run.last_error = TrainingRun.Status.ABANDONED, reason
    run.finished_at, run.lease_expires_at = timezone.now(), None
    run.save(update_fields=["status", "last_error", "finished_at", "lease_expires_at"])
    if run.model_version_id:
        ModelVersion.objects.filter(pk=run.model_version_id).exclude(
            status=ModelVersion.Status.ACTIVE).update(status=ModelVersion.Status.FAILED,
                                                     status_reason=reason)


def training_run_start(*, project: Project, kind: str, params: dict | None = None
                       ) -> TrainingRun:
    """A run made by a command (``refit``, ``pretrain``, ``embed``, ``finetune``,
    ``distill``): unless one of its kind is queued or running for the project (RunBusy with
    which one; a lock on the project row makes two commands started together agree). Two
    refits at once were both gated against the same active version, and both queued a round."""
    runs_abandon_expired(project=project)
    with transaction.atomic():
        Project.objects.select_for_update(no_key=True).get(pk=project.pk)
        busy = TrainingRun.objects.filter(
            project=project, kind=kind,
            status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).first()
        if busy is not None:
            raise RunBusy(f"{kind} run #{busy.pk} is already {busy.status} "
                          f"(since {in_words(busy.started_at or busy.created_at)})")
        return training_run_create(project=project, kind=kind, params=params)


def runs_abandon_expired(*, project: Project | None = None) -> int:
    """Mark running runs whose worker lease expired (a killed worker) as abandoned."""
    runs = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING,
                                      lease_expires_at__lt=timezone.now())
    if project is not None:
        runs = runs.filter(project=project)
    count = 0
    for run in runs:
        run.status = TrainingRun.Status.ABANDONED
        run.last_error = (f"worker {run.claimed_by or '?'} stopped renewing its lease "
                          f"(expired {run.lease_expires_at:%Y-%m-%d %H:%M:%S})")
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "last_error", "finished_at"])
        if run.model_version_id:
            ModelVersion.objects.filter(pk=run.model_version_id).exclude(
                status=ModelVersion.Status.ACTIVE).update(status=ModelVersion.Status.FAILED,
                                                         status_reason=run.last_error)
        count += 1
    return count


def retrain_start(*, project: Project, if_new_labels: int = 0, params: dict | None = None,
                  enqueue: bool = False, refuse: bool = True) -> TrainingRun:
    """Create a retrain run unless one is queued or running (a lock on the project row makes
    two cron invocations agree), or fewer than ``if_new_labels`` labels arrived since the last
    successful retrain. Raises RetrainSkipped with the reason. A retrain that could only
    fail is then refused (``refuse``, the default for every caller: the command, the beat
    schedule, the API, scripts): TrainingError with the sentence its run would fail with,
    and no run (a failed run does not count as a retrain: ``if_new_labels`` would let one
    more through every time). ``refuse=False`` stores the run anyway, for the worker to fail
    in words (tests of the worker's own checks)."""
    runs_abandon_expired(project=project)
    with transaction.atomic():
        Project.objects.select_for_update(no_key=True).get(pk=project.pk)
        busy = TrainingRun.objects.filter(
            project=project, kind=TrainingRun.Kind.RETRAIN,
            status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).first()
        if busy is not None:
            raise RetrainSkipped(f"retrain run #{busy.pk} is already {busy.status} "
                                 f"(since {in_words(busy.started_at or busy.created_at)})")
        if if_new_labels:
            last = TrainingRun.objects.filter(project=project, kind=TrainingRun.Kind.RETRAIN,
                                              status=TrainingRun.Status.SUCCEEDED
                                              ).order_by("-created_at").first()
            labels = Annotation.objects.filter(scan__project=project, scan__split="pool",
                                               outcome=Annotation.Outcome.LABEL)
            if last is not None:
                labels = labels.filter(created_at__gt=last.created_at)
            if labels.count() < if_new_labels:
                raise RetrainSkipped(f"{labels.count()} new labels since the last retrain; "
                                     f"waiting for {if_new_labels}")
        refusal = retrain_refusal(project, params) if refuse else None
        if refusal:
            raise TrainingError(refusal)
        return training_run_create(project=project, kind=TrainingRun.Kind.RETRAIN,
                                   params=params or {}, enqueue=enqueue)


def refit_start_if_due(*, project: Project, force: bool = False,
                       params: dict | None = None) -> TrainingRun | None:
    """THE way a refit starts (after labels in the UI, the admin, Label Studio's webhook or
    its "start training"): queue one — as a task after commit, never in the request — once
    ``refit_every`` newly labeled pool scans arrived since the last refit (``force``: now),
    unless one is already queued or running. A lock on the project row makes concurrent
    callers agree on one run; a refit queued so long ago that no worker took it does not
    block. Returns the new run, or None (no encoder yet, not due, one is busy, or the labels
    so far are of one class per label set: a refit would have nothing to fit)."""
    if Project.objects.filter(pk=project.pk, active_encoder__isnull=True).exists():
        return None
    runs_abandon_expired(project=project)
    TrainingRun.objects.filter(
        project=project, kind=TrainingRun.Kind.REFIT, status=TrainingRun.Status.QUEUED,
        created_at__lt=timezone.now() - settings.REFIT_QUEUED_STALE).update(
        status=TrainingRun.Status.ABANDONED, finished_at=timezone.now(),
        last_error="never picked up by a worker (its server or worker stopped)")
    with transaction.atomic():
        project = Project.objects.select_for_update(no_key=True).get(pk=project.pk)
        refits = TrainingRun.objects.filter(project=project, kind=TrainingRun.Kind.REFIT)
        if refits.filter(status__in=[TrainingRun.Status.QUEUED,
                                     TrainingRun.Status.RUNNING]).exists():
            return None
        if not force:
            last = refits.order_by("-created_at").first()
            new_labels = Annotation.objects.filter(scan__project=project, scan__split="pool",
                                                   outcome__in=Annotation.LABELLING)
            if last is not None:
                # a refit reads the labels once it has started: what came before is in it
                new_labels = new_labels.filter(
                    created_at__gt=last.started_at or last.created_at)
            # new labeled SCANS: a second reading of a scan does not bring a refit closer;
            # counting stops at refit_every (each answer asks; the labels since may be many)
            due = max(project.refit_every, 1)
            if new_labels.values("scan_id").distinct()[:due].count() < due:
                return None
            if not _refit_has_something_to_fit(project):
                return None
        return training_run_create(project=project, kind=TrainingRun.Kind.REFIT,
                                   params=params or {}, enqueue=True)


def _refit_has_something_to_fit(project: Project) -> bool:
    """Whether a refit could fit anything: labeled pool scans of at least two classes of one
    label set, or findings answers. Until then the labels wait and no refit is queued (one
    would only fail, and show the clinician a failed job for labeling too little)."""
    pool = Annotation.objects.filter(scan__project=project, scan__split="pool").order_by()
    if pool.filter(outcome=Annotation.Outcome.FINDINGS).exists():
        return True
    return (pool.filter(outcome=Annotation.Outcome.LABEL, label_class__isnull=False)
            .values("label_class__label_set")
            .annotate(classes=Count("label_class", distinct=True))
            .filter(classes__gte=2).exists())


def refit_busy(project: Project) -> TrainingRun | None:
    """The project's queued or running refit, if any."""
    return TrainingRun.objects.filter(
        project=project, kind=TrainingRun.Kind.REFIT,
        status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).first()


# --- whether a run could succeed on the labels there are (before it is created) -----------

NO_ENCODER = "the project has no active encoder: run `manage.py pretrain` first"


def encoder_files_missing(encoder: ModelVersion, project: Project) -> str | None:
    """Why ``encoder`` (of ``project``) cannot embed, be searched or be fitted on: its folder
    or its ``encoder.pt`` is not there (moved away, a disk lost, a restore without its
    files) — the sentence, with what to do — or None. Two file checks, no model loaded."""
    from pathlib import Path

    folder = Path(encoder.artifact_dir) if encoder.artifact_dir else None
    if folder is None or not folder.is_dir():
        where = f"its folder {folder} is not there" if folder else "it has no folder"
    elif not (folder / "encoder.pt").is_file():
        where = f"its folder {folder} has no encoder.pt"
    else:
        return None
    role = "active encoder" if project.active_encoder_id == encoder.pk else "encoder"
    return (f"the {role} {encoder.version}'s files are missing ({where}): restore its folder "
            f"from a backup, or pretrain a new encoder (`manage.py pretrain --project "
            f"\"{project.name}\"`)")


def encoder_files_refusal(project: Project) -> str | None:
    """``encoder_files_missing`` of the project's active encoder, or None (no encoder is not
    this problem: ``NO_ENCODER``). Health asks it on every call: no model is loaded."""
    project = Project.objects.select_related("active_encoder").get(pk=project.pk)
    if project.active_encoder is None:
        return None
    return encoder_files_missing(project.active_encoder, project)


def embed_refusal(project: Project) -> str | None:
    """Why an embed of ``project`` could only fail now (no active encoder, or its files are
    missing), or None."""
    if not Project.objects.filter(pk=project.pk, active_encoder__isnull=False).exists():
        return NO_ENCODER
    return encoder_files_refusal(project)


def run_refusal(project: Project, kind: str, params: dict | None = None) -> str | None:
    """THE check before a refit, retrain or embed run is made, by any path (the API, Label
    Studio's START_TRAINING, the commands, the beat schedule): the sentence the run would
    fail with at once, or None. The runs ask the same checks first (``training``), so a
    refused path and a failed run say the same thing."""
    if kind == TrainingRun.Kind.REFIT:
        if not Project.objects.filter(pk=project.pk, active_encoder__isnull=False).exists():
            return NO_ENCODER
        return refit_refusal(project)
    if kind == TrainingRun.Kind.RETRAIN:
        return retrain_refusal(project, params)
    if kind == TrainingRun.Kind.EMBED:
        return embed_refusal(project)
    if kind == TrainingRun.Kind.PRETRAIN:
        scans = project.scans.count()
        if scans < 2:       # the run's own first check (``training._pretrain``)
            return (f"pretraining needs at least 2 scans in the project (it has {scans}): "
                    "import scans first")
    return None


def refit_nothing_to_fit(labels: int, skipped: list[str]) -> str:
    """The sentence a refit fails with when no label set has labels of two classes and no
    findings set could be fitted: ``labels`` pool labels in all, ``skipped`` one phrase
    per label set left out."""
    return (f"a refit needs labeled pool scans of at least 2 classes in one label set, or "
            f"findings answers (have {labels} labels; "
            + "; ".join(skipped or ["no labels yet"]) + ")")


def refit_refusal(project: Project) -> str | None:
    """Why a refit of ``project`` could only fail on the labels it has now — the sentence
    its run fails with (``training._refit``, which asks this first) — or None. Read the way
    the refit reads its labels (``training_labels``: each reader's latest label, the
    project's disagreement rule): a label set takes a head once its labels are of two
    classes. Findings answers, or findings networks the active model could carry over, are
    left to the run to judge (never refused here)."""
    from annotator.selectors import class_label_sets, training_labels

    files = encoder_files_refusal(project)         # every head is fit on its embeddings
    if files:
        return files
    scans, class_ids = training_labels(project, split="pool")
    class_set = class_label_sets(project)
    by_set: dict[int, set[int]] = {}
    for class_id in class_ids:
        by_set.setdefault(class_set[class_id], set()).add(class_id)
    if any(len(classes) >= 2 for classes in by_set.values()):
        return None
    if Annotation.objects.filter(scan__project=project, scan__split="pool",
                                 outcome=Annotation.Outcome.FINDINGS).exists():
        return None
    active = project.active_model
    if active is not None and any("net" in entry for entry in
                                  (active.config or {}).get("findings_sets") or []):
        return None
    names = dict(project.label_sets.values_list("pk", "name"))
    return refit_nothing_to_fit(len(scans), [f"{names[set_id]}: labels of 1 class so far"
                                             for set_id in sorted(by_set)])


def retrain_refusal(project: Project, params: dict | None = None) -> str | None:
    """Why a retrain (fine-tuning the network on every label) of ``project`` could only
    fail now — the sentence its run fails with (``training._finetune``, which asks this
    first) — or None. A findings set's network (``params["findings_set"]``) is judged by
    its run."""
    from annotator.selectors import training_labels

    if not Project.objects.filter(pk=project.pk, active_encoder__isnull=False).exists():
        return NO_ENCODER
    files = encoder_files_refusal(project)         # fine-tuning starts from its encoder.pt
    if files:
        return files
    if (params or {}).get("findings_set"):
        return None
    scans, class_ids = training_labels(project, split="pool")
    classes = set(class_ids)
    if len(classes) < 2:
        return (f"fine-tuning needs labeled pool scans of at least 2 classes "
                f"(have {len(scans)} labels in {len(classes)} class(es))")
    return None
