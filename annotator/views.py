from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from annotator import labeling, selectors, services
from annotator.forms import UploadForm
from annotator.storage import media_path
from annotator.uploads import Rejection, upload_import_start


@login_required
@require_safe
def project_list(request):
    projects = selectors.project_list_for_user(request.user)
    return render(request, "annotator/project_list.html", {"projects": projects})


@login_required
@require_safe
def project_detail(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    split = request.GET.get("split") or None
    if split not in (None, "pool", "eval"):
        split = None
    role = project.role_of(request.user)
    stats = selectors.project_stats(project)
    paginator = Paginator(selectors.scan_list_for_project(
        project, split=split, include_quarantined=role == "admin", user=request.user), 48)
    # the count is in the stats' one pass over the scans: no second count of 100,000s
    paginator.count = stats[("" if role == "admin" else "visible_") + (split or "scans")
                            if role == "admin" or split else "visible"]
    page = paginator.get_page(request.GET.get("page"))
    from annotator.status import model_status

    status = model_status(project)
    held_back = None
    if status["last"] and status["last"]["status"] == "ready":
        from ml_backend.models import ModelVersion

        held_back = ModelVersion.objects.filter(project=project,
                                                version=status["last"]["version"]).first()
    return render(request, "annotator/project_detail.html", {
        "project": project,
        "stats": stats,
        "classes": selectors.label_class_counts(project),
        "label_sets": project.label_sets.order_by("order", "pk"),
        "model_status": status,
        "held_back": held_back,
        "datasets": project.datasets.all(),
        "jobs": project.import_jobs.all()[:5],
        "page": page,
        "split": split,
        "role": project.role_of(request.user),
        "jobs_running": selectors.training_runs_for_project(project),
        "can_add_classes": labeling.can_add_classes(project, request.user),
        "current_round": labeling.current_round(project),
    })


@login_required
@require_safe
def project_jobs(request, project_id: int):
    """Background work of a project (pretrain, embed, refit, retrain, imports) with progress,
    for the project page's live panel."""
    project = selectors.project_get_for_user(request.user, project_id)
    runs = selectors.training_runs_for_project(project)
    return JsonResponse({
        "active_model": project.active_model.version if project.active_model_id else None,
        "active_encoder": project.active_encoder.version if project.active_encoder_id else None,
        "runs": [{"id": r.pk, "kind": r.get_kind_display(), "status": r.status,
                  "progress": round(r.progress, 3), "error": r.last_error[-300:],
                  "model_version": r.model_version.version if r.model_version_id else None,
                  "started": r.started_at.isoformat() if r.started_at else None,
                  "finished": r.finished_at.isoformat() if r.finished_at else None}
                 for r in runs],
        "busy": any(r.status in ("queued", "running") for r in runs),
    })


@login_required
@require_safe
def scan_detail(request, scan_id: int):
    scan = selectors.scan_get_for_user(request.user, scan_id)
    # a blind reader sees other readers' answers once they have answered the scan themselves
    annotations = selectors.answers_visible(
        scan.project, request.user, scan.annotations.select_related("label_class", "reader"))
    return render(request, "annotator/scan_detail.html", {
        "scan": scan, "annotations": annotations,
        "hidden": selectors.hidden_answers_count(scan.project, request.user, scan)})


@login_required
@require_safe
def scan_preview(request, scan_id: int):
    scan = selectors.scan_get_for_user(request.user, scan_id)
    try:
        handle = open(media_path(scan.preview.name), "rb")
    except (OSError, ValueError):
        raise Http404("The preview file is missing.") from None
    response = FileResponse(handle, content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def upload(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    classes = list(project.label_classes.all())
    if request.method != "POST":         # GET, HEAD
        form = UploadForm(label_classes=classes)
        return render(request, "annotator/upload.html", {"project": project, "form": form})

    form = UploadForm(request.POST, request.FILES, label_classes=classes)
    rejected: list[Rejection] = []
    refusal = form.is_valid() and selectors.eval_upload_refusal(
        project, request.user, form.cleaned_data["split"])
    if refusal:                         # eval: the project's reviewers and admins only
        form.add_error("split", refusal)
        return render(request, "annotator/upload.html", {"project": project, "form": form},
                      status=403)
    if form.is_valid():
        try:
            job, rejected = upload_import_start(project=project, user=request.user,
                                                cleaned=form.cleaned_data)
        except services.DatasetMismatch as exc:      # nothing kept, the dataset unchanged
            reason = str(exc)
            form.add_error("dataset", reason[0].upper() + reason[1:] + ".")
            job = None
        if job is not None:
            for item in rejected:
                messages.error(request, f"{item.name}: {item.reason}")
            return redirect(job)
        if not form.has_error("dataset"):
            form.add_error("files", "None of the files can be imported.")
    status = 400
    return render(
        request,
        "annotator/upload.html",
        {"project": project, "form": form, "rejected": rejected},
        status=status,
    )


@login_required
@require_safe
def import_job_detail(request, job_id: int):
    job = selectors.import_job_get_for_user(request.user, job_id)
    return render(request, "annotator/import_job.html", {"job": job, "project": job.project})


@login_required
@require_POST
def model_promote(request, project_id: int, version_id: int):
    """A project admin promotes a held-back classifier anyway (recorded in the audit trail)."""
    from ml_backend import services as ml
    from ml_backend.models import ModelVersion

    project = selectors.project_get_for_user(request.user, project_id)
    if project.role_of(request.user) != "admin":
        raise Http404("Only a project admin promotes a model by hand.")
    model = ModelVersion.objects.filter(project=project, pk=version_id,
                                        kind=ModelVersion.Kind.CLASSIFIER).first()
    if model is None:
        raise Http404("No such classifier in this project.")
    # the active classifier the page showed: a page the project has moved past since (the
    # gate promoted a newer version) is refused rather than replacing that version unseen
    shown = request.POST.get("active", "")
    expected = {"expected_active": int(shown) if shown.isdigit() else None} if (
        "active" in request.POST) else {}
    try:
        warning = ml.model_version_promote(
            model, actor=request.user,
            reason=f"promoted anyway by {request.user.get_username()} "
                   f"(the gate had said: {ml.gate_verdict(model.status_reason)[:300]})",
            **expected)
    except ml.AlreadyActive as exc:
        messages.info(request, str(exc)[0].upper() + str(exc)[1:] + ".")
    except ml.TrainingError as exc:
        messages.error(request, str(exc))
    else:
        if warning:
            messages.warning(request, warning)
        else:
            messages.success(request, f"{model.version} is now the active classifier.")
    return redirect(project)
