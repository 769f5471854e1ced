"""Celery tasks of the Label Studio sync: thin wrappers that load ids and call one function.
Their names stay ``annotator.tasks.*`` (``annotator/tasks.py`` imports them, so Celery finds
them where it always did and routes them to the ``default`` queue)."""

from __future__ import annotations

import logging

from celery import shared_task

from annotator.label_studio import api, inbound, outbound
from annotator.models import Project

logger = logging.getLogger(__name__)


@shared_task(name="annotator.tasks.label_studio_ingest", acks_late=True)
def label_studio_ingest(project_id: int, annotation: dict, task: dict) -> str:
    """One annotation from Label Studio's webhook; idempotent by its Label Studio id. (The
    webhook now queues ``label_studio_ingest_payload``, one task per payload; this one stays
    for messages queued before.)"""
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return "ignored: project deleted"
    ls = None
    if isinstance(annotation.get("completed_by"), int):
        try:
            ls = api.client()
        except api.LabelStudioError:
            ls = None   # not configured here: the reader stays unknown, reconcile fills it
    _, outcome = inbound.ingest(project, annotation=annotation, task=task, ls=ls)
    if outcome.startswith("ignored"):     # the record of a refusal, where no one sees the result
        logger.warning("Label Studio annotation %s for project %s %s",
                       str(annotation.get("id"))[:24], project.pk, outcome)
    return outcome


@shared_task(name="annotator.tasks.label_studio_ingest_payload", acks_late=True)
def label_studio_ingest_payload(project_id: int, items: list) -> dict:
    """One webhook payload's annotations (``[annotation, task]`` pairs, a bulk event's
    thousands as one task); idempotent by their Label Studio ids."""
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return {"ignored": len(items)}
    ls = None
    if any(isinstance(annotation.get("completed_by"), int) for annotation, _ in items):
        try:
            ls = api.client()
        except api.LabelStudioError:
            ls = None   # not configured here: the readers stay unknown, reconcile fills them
    return inbound.ingest_payload(project, items, ls=ls)


@shared_task(name="annotator.tasks.label_studio_push", acks_late=True)
def label_studio_push(project_id: int) -> int:
    """New model version: push its predictions and model_version to Label Studio."""
    project = Project.objects.filter(pk=project_id).first()
    return outbound.push_predictions(project) if project is not None else 0


@shared_task(name="annotator.tasks.label_studio_push_round", acks_late=True)
def label_studio_push_round(project_id: int) -> dict:
    """A new worklist round: its scans become Label Studio tasks (a sync of the round;
    what is there already is not sent again)."""
    project = Project.objects.filter(pk=project_id).first()
    if project is None or not project.label_studio_project_id:
        return {}
    return outbound.sync(project, scope="round")


@shared_task(name="annotator.tasks.label_studio_push_config", acks_late=True)
def label_studio_push_config(project_id: int) -> bool:
    """A class was added or changed: send Label Studio the new labeling config."""
    project = Project.objects.filter(pk=project_id).first()
    return outbound.push_config(project) if project is not None else False


@shared_task(name="annotator.tasks.label_studio_reconcile_all")
def label_studio_reconcile_all() -> dict:
    """Celery beat: pull every linked project's Label Studio export and fill gaps."""
    results = {}
    for project in Project.objects.exclude(label_studio_project_id=None):
        try:
            results[project.name] = outbound.reconcile(project)
        except api.LabelStudioError as exc:
            results[project.name] = {"error": str(exc)}
    return results
