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
