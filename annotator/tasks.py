"""Celery tasks: thin wrappers that load ids and call one service."""

from __future__ import annotations

from celery import shared_task

from annotator import services


@shared_task(name="annotator.tasks.run_import_job", acks_late=True)
def run_import_job(job_id: int) -> str:
    """Run an import job; a redelivered message finds the job claimed and does nothing."""
    job = services.import_job_run(job_id=job_id)
    return job.status if job is not None else "skipped"


@shared_task(name="annotator.tasks.label_studio_ingest", acks_late=True)
def label_studio_ingest(project_id: int, annotation: dict, task: dict) -> str:
    """One annotation from Label Studio's webhook; idempotent by its Label Studio id."""
    from annotator import label_studio
    from annotator.models import Project

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return "ignored: project deleted"
    ls = None
    if isinstance(annotation.get("completed_by"), int):
        try:
            ls = label_studio.client()
        except label_studio.LabelStudioError:
            ls = None   # not configured here: the reader stays unknown, reconcile fills it
    _, outcome = label_studio.ingest(project, annotation=annotation, task=task, ls=ls)
    return outcome


@shared_task(name="annotator.tasks.label_studio_push", acks_late=True)
def label_studio_push(project_id: int) -> int:
    """New model version: push its predictions and model_version to Label Studio."""
    from annotator import label_studio
    from annotator.models import Project

    project = Project.objects.filter(pk=project_id).first()
    return label_studio.push_predictions(project) if project is not None else 0


@shared_task(name="annotator.tasks.label_studio_push_config", acks_late=True)
def label_studio_push_config(project_id: int) -> bool:
    """A class was added or changed: send Label Studio the new labeling config."""
    from annotator import label_studio
    from annotator.models import Project

    project = Project.objects.filter(pk=project_id).first()
    return label_studio.push_config(project) if project is not None else False


@shared_task(name="annotator.tasks.label_studio_reconcile_all")
def label_studio_reconcile_all() -> dict:
    """Celery beat: pull every linked project's Label Studio export and fill gaps."""
    from annotator import label_studio
    from annotator.models import Project

    results = {}
    for project in Project.objects.exclude(label_studio_project_id=None):
        try:
            results[project.name] = label_studio.reconcile(project)
        except label_studio.LabelStudioError as exc:
            results[project.name] = {"error": str(exc)}
    return results
