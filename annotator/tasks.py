"""Celery tasks: thin wrappers that load ids and call one service."""

from __future__ import annotations

import logging

from celery import shared_task

from annotator import services

# Label Studio's tasks live with the rest of its code; imported here so Celery registers them
# under their names (annotator.tasks.label_studio_*) and callers find them where they were.
from annotator.label_studio.tasks import (  # noqa: F401
    label_studio_ingest,
    label_studio_push,
    label_studio_push_config,
    label_studio_push_round,
    label_studio_reconcile_all,
)

logger = logging.getLogger(__name__)


@shared_task(name="annotator.tasks.run_import_job", acks_late=True)
def run_import_job(job_id: int) -> str:
    """Run an import job; a redelivered message finds the job claimed and does nothing."""
    job = services.import_job_run(job_id=job_id)
    return job.status if job is not None else "skipped"


@shared_task(name="annotator.tasks.run_import_chunk", acks_late=True)
def run_import_chunk(chunk_id: int) -> str:
    """Import one chunk of a large import; any number of workers take chunks in parallel."""
    chunk = services.import_chunk_run(chunk_id=chunk_id)
    return "skipped" if chunk is None else f"chunk {chunk.index} of import {chunk.job_id}"


@shared_task(name="annotator.tasks.incoming_sweep")
def incoming_sweep() -> dict:
    """Celery beat: remove what waits in INCOMING_ROOT past its time (a classify page's copy
    after CLASSIFY_STAGING_HOURS, an upload no import reads; ``uploads.incoming_sweep``).
    Safe to run twice: what is gone is gone."""
    from annotator.uploads import incoming_sweep as sweep

    return sweep()


@shared_task(name="annotator.tasks.pacs_pull_scheduled")
def pacs_pull_scheduled() -> dict:
    """Celery beat: pull the PACS studies matching PACS_PULL_QUERY that are not here yet
    into PACS_PULL_PROJECT (annotator/pacs.py; idempotent, so an overlap does no harm)."""
    from django.conf import settings

    from annotator import pacs
    from annotator.models import Project

    project = Project.objects.filter(name=settings.PACS_PULL_PROJECT).first()
    if project is None or not settings.PACS_DICOMWEB_URL:
        return {"error": f"no project {settings.PACS_PULL_PROJECT!r} or no PACS_DICOMWEB_URL"}
    try:
        summary = pacs.pacs_pull(project=project, url=settings.PACS_DICOMWEB_URL,
                                 query=settings.PACS_PULL_QUERY)
    except pacs.PacsError as exc:       # a bad PACS_PULL_QUERY is refused before any request
        logger.error("scheduled PACS pull into %r refused: %s", settings.PACS_PULL_PROJECT, exc)
        return {"error": str(exc)}
    if summary.errors:           # studies that did not come: retried by the next pull
        logger.warning("scheduled PACS pull into %r: %d stud(ies) not pulled: %s",
                       settings.PACS_PULL_PROJECT, len(summary.errors),
                       "; ".join(summary.errors[:5]))
    return {"pulled": summary.studies_pulled, "imported": summary.imported,
            "failed_studies": len(summary.errors), "words": summary.words()}

