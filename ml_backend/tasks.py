"""Celery tasks for ML work: thin, idempotent, on the ``train`` queue."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from ml_backend import services


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
    """Celery beat entry: start a retrain for every project with enough new labels."""
    from annotator.models import Project

    started = []
    for project in Project.objects.exclude(active_encoder=None):
        try:
            run = services.retrain_start(project=project, if_new_labels=if_new_labels,
                                         enqueue=True)
        except services.RetrainSkipped:
            continue
        started.append(f"{project.name}: run {run.pk}")
    return started
