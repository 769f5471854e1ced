"""Reads: what the project's model is doing now, for the label page's status line
(``GET /projects/<id>/model-status/``, polled every 2 s while a run is queued or running)."""

from __future__ import annotations

from annotator.models import Project


def model_status(project: Project) -> dict:
    """``updating``: a training run (refit, retrain, distill, pretrain, embed) is queued or
    running, described by ``run`` (the running one first, else the next queued).
    ``model_version``: the active classifier. ``last``: the newest finished classifier
    version, so the page can say "clf-8 is now active" or "clf-8 was held back: <reason>".
    ``held_back_in_a_row``: classifier versions held back by the gate (status ready) since
    the last promotion. ``last_run``: the newest finished run (a refit can fail before it
    makes a version)."""
    from ml_backend.models import ModelVersion, TrainingRun

    runs = TrainingRun.objects.filter(project=project)
    busy = runs.filter(status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING])
    run = (busy.filter(status=TrainingRun.Status.RUNNING).order_by("-started_at", "-pk").first()
           or busy.order_by("created_at", "pk").first())
    finished = (runs.exclude(finished_at=None).select_related("model_version")
                .order_by("-finished_at", "-pk").first())

    classifiers = ModelVersion.objects.filter(project=project,
                                              kind=ModelVersion.Kind.CLASSIFIER)
    active = classifiers.filter(pk=project.active_model_id).values_list(
        "version", flat=True).first() if project.active_model_id else None
    last = (classifiers.exclude(status=ModelVersion.Status.TRAINING)
            .order_by("-created_at", "-pk").first())
    promoted_at = (classifiers.exclude(promoted_at=None).order_by("-promoted_at")
                   .values_list("promoted_at", flat=True).first())
    held_back = classifiers.filter(status=ModelVersion.Status.READY)
    if promoted_at is not None:
        held_back = held_back.filter(created_at__gt=promoted_at)

    return {
        "updating": run is not None,
        "run": None if run is None else {
            "id": run.pk, "kind": run.kind, "status": run.status,
            "progress": round(run.progress or 0.0, 3)},
        "model_version": active,
        "last": None if last is None else {
            "version": last.version, "status": last.status, "reason": last.status_reason},
        "held_back_in_a_row": held_back.count(),
        "last_run": None if finished is None else {
            "id": finished.pk, "kind": finished.kind, "status": finished.status,
            "error": finished.last_error[:500],
            "model_version": finished.model_version.version if finished.model_version else None},
    }
