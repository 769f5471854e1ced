"""Reads: what the project's model is doing now, for the label page's status line
(``GET /projects/<id>/model-status/``, polled every 2 s while a run is queued or running)."""

from __future__ import annotations

from annotator.models import Project


# the newest classifier versions the status reads (held back in a row counts within them)
RECENT_VERSIONS = 50


def model_status(project: Project) -> dict:
    """``updating``: a training run (refit, retrain, distill, pretrain, embed) is queued or
    running, described by ``run`` (the running one first, else the next queued).
    ``model_version``: the active classifier. ``last``: the newest finished classifier
    version, so the page can say "clf-8 is now active" or "clf-8 was held back: <reason>".
    ``held_back_in_a_row``: classifier versions held back by the gate (status ready) since
    the last promotion. ``last_run``: the newest finished run (a refit can fail before it
    makes a version)."""
    from ml_backend.models import ModelVersion, TrainingRun

    # three queries, not one per question: the label page asks on every answer
    busy = list(TrainingRun.objects.filter(
        project=project, status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING])
        .only("pk", "kind", "status", "progress", "started_at", "created_at")
        .order_by("created_at", "pk"))
    running = sorted((r for r in busy if r.status == TrainingRun.Status.RUNNING),
                     key=lambda r: (r.started_at is not None, r.started_at, r.pk), reverse=True)
    run = running[0] if running else (busy[0] if busy else None)
    finished = (TrainingRun.objects.filter(project=project).exclude(finished_at=None)
                .select_related("model_version").defer("log", "params")
                .order_by("-finished_at", "-pk").first())
    recent = list(ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER)
                  .order_by("-created_at", "-pk")
                  .values("pk", "version", "status", "status_reason", "promoted_at",
                          "created_at")[:RECENT_VERSIONS])
    active = next((v["version"] for v in recent if v["pk"] == project.active_model_id), None)
    if active is None and project.active_model_id:          # an old version rolled back to
        active = ModelVersion.objects.filter(pk=project.active_model_id).values_list(
            "version", flat=True).first()
    last = next((v for v in recent if v["status"] != ModelVersion.Status.TRAINING), None)
    promoted = [v["promoted_at"] for v in recent if v["promoted_at"] is not None]
    promoted_at = max(promoted) if promoted else None
    held_back = sum(1 for v in recent if v["status"] == ModelVersion.Status.READY
                    and (promoted_at is None or v["created_at"] > promoted_at))

    return {
        "updating": run is not None,
        "run": None if run is None else {
            "id": run.pk, "kind": run.kind, "status": run.status,
            "progress": round(run.progress or 0.0, 3)},
        "model_version": active,
        "last": None if last is None else {
            "version": last["version"], "status": last["status"],
            "reason": last["status_reason"]},
        "held_back_in_a_row": held_back,
        "last_run": None if finished is None else {
            "id": finished.pk, "kind": finished.kind, "status": finished.status,
            "error": finished.last_error[:500],
            "model_version": finished.model_version.version if finished.model_version else None},
    }
