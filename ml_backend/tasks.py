"""Celery tasks for ML work: thin, idempotent, on the ``train`` queue."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from ml_backend import services

logger = logging.getLogger(__name__)


@shared_task(name="ml_backend.tasks.run_training", acks_late=True,
             soft_time_limit=settings.TRAIN_TASK_SOFT_TIME_LIMIT,
             time_limit=settings.TRAIN_TASK_TIME_LIMIT)
def run_training(run_id: int) -> str:
    """Run a TrainingRun; a redelivered message finds it claimed and does nothing."""
    run = services.training_run_execute(run_id)
    return run.status if run is not None else "skipped"


@shared_task(name="ml_backend.tasks.spread_help", acks_late=True,
             soft_time_limit=settings.TRAIN_TASK_SOFT_TIME_LIMIT,
             time_limit=settings.TRAIN_TASK_TIME_LIMIT)
def spread_help(model_id: int, name: str) -> int:
    """Help a run with its chunks (ml_backend/services/spread.py): compute the ones nobody
    has claimed; nothing when the run has finished them."""
    from ml_backend.services.spread import work_on

    return work_on(model_id, name)


@shared_task(name="ml_backend.tasks.scheduled_retrain")
def scheduled_retrain(if_new_labels: int = 20) -> list[str]:
    """Celery beat entry: start a retrain for every project with enough new labels. A
    project whose retrain could only fail (``runs.retrain_refusal``: labels of one class,
    the encoder's files missing) is skipped with a log line, and no run is made: a failed
    run does not count as a retrain, so one would otherwise be added every time beat fires."""
    from annotator.models import Project
    from ml_backend.services.runs import encoder_files_refusal

    started = []
    for project in Project.objects.exclude(active_encoder=None):
        try:
            run = services.retrain_start(project=project, if_new_labels=if_new_labels,
                                         enqueue=True, refuse=True)
        except services.RetrainSkipped:
            continue
        except services.TrainingError as exc:
            # labels still to come are the normal course (INFO); lost files need a person
            level = logging.WARNING if encoder_files_refusal(project) else logging.INFO
            logger.log(level, "scheduled retrain of project %s (%s) skipped: %s",
                       project.pk, project.name, exc)
            continue
        started.append(f"{project.name}: run {run.pk}")
    return started
