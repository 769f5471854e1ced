"""The clinician's loop: worklist, label page (JSON answers, no reload), Grad-CAM, new
classes with their candidates, and classifying an uploaded scan."""

from __future__ import annotations

import base64
import hashlib
import shutil
import time

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, HttpResponse, HttpResponseForbidden, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from annotator import label_page as page_content
from annotator import labeling, selectors, services, storage
from annotator.auth import login_required_json
from annotator.forms import ClassifyForm, LabelClassForm
from annotator.models import Annotation, LabelClass, Scan
from annotator.status import model_status
from annotator.tasks import run_import_job
from annotator.uploads import (
    StagingRefused,
    check_upload,
    classify_claim,
    classify_decode,
    classify_stage,
    classify_staged,
    shown_file_name,
)
from medsite import jsonbody
from ml_backend.data.decode import ScanDecodeError, decode_scan, render_preview
from ml_backend.errors import TrainingError



@login_required
def worklist(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    data = labeling.worklist(project, request.user)
    return render(request, "annotator/worklist.html", {
        "project": project, **data, "role": project.role_of(request.user),
        "has_encoder": project.active_encoder_id is not None,
    })


@login_required
def next_scan(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    found = labeling.lease_next_or_new_round(project=project, user=request.user)
    if found is None:
        messages.info(request, labeling.nothing_left_words(project, request.user))
        return redirect("annotator:worklist", project.pk)
    scan, _item, new_round = found
    if new_round:
        messages.info(request, "The round was done: the model chose the next batch.")
    return redirect("annotator:label", project.pk, scan.pk)


@login_required
@require_POST
def query_new(request, project_id: int):
    """A new round of scans chosen by the project's strategy (a selection, not training)."""
    from ml_backend import services as ml

    project = selectors.project_get_for_user(request.user, project_id)
    try:
        # nothing to choose is said in words, not stored as an empty round that would
        # replace the current one on the worklist
        query_round = ml.query_round_create(project=project, created_by=request.user,
                                            refuse_empty=True)
    except TrainingError as exc:
        messages.error(request, f"Could not choose scans: {exc}")
        return redirect("annotator:worklist", project.pk)
    messages.success(request, f"{query_round.size} scans chosen ({query_round.strategy}).")
    return redirect("annotator:worklist", project.pk)


def _scan_in_project(project, scan_id: int) -> Scan:
    scan = Scan.objects.select_related("dataset", "project").filter(
        pk=scan_id, project=project, quarantined=False).first()
    if scan is None:
        raise Http404("No such scan in this project.")
    return scan


def _item_for(project, scan):
    query_round = labeling.current_round(project)
    if query_round is None:
        return None
    return query_round.items.filter(scan=scan).first()


@login_required_json
@require_GET
def label_page(request, project_id: int, scan_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    scan = _scan_in_project(project, scan_id)
    refusal = selectors.eval_answer_refusal(project, scan, request.user)
    if refusal is not None:
        if request.GET.get("format") == "json":
            return JsonResponse({"error": refusal}, status=403)
        # the reason in words, not an exception (whose traceback the log would print)
        return HttpResponseForbidden(refusal, content_type="text/plain; charset=utf-8")
    item = _item_for(project, scan)
    held_by = None
    if not labeling.lease_acquire(scan=scan, user=request.user):
        held_by = labeling.lease_holder(scan=scan)
    payload = page_content.label_payload(project=project, scan=scan, item=item, user=request.user)
    payload["held_by"] = held_by
    if request.GET.get("format") == "json":
        return JsonResponse(payload)
    return render(request, "annotator/label.html", {
        "project": project, "scan": scan, "payload": payload,
        "can_add_classes": labeling.can_add_classes(project, request.user),
    })


@login_required_json
@require_POST
def answer(request, project_id: int, scan_id: int):
    """Record an answer (JSON body or form fields) and return the next scan's payload."""
    started = time.perf_counter()
    project = selectors.project_get_for_user(request.user, project_id)
    scan = _scan_in_project(project, scan_id)
    if request.content_type == "application/json":
        try:
            data = jsonbody.parse_json(request.body, expect=dict)
        except jsonbody.BodyError as exc:
            return JsonResponse({"error": str(exc)}, status=exc.status)
    else:
        data = request.POST.dict()
        try:
            jsonbody.check_text(data)
        except jsonbody.BodyError as exc:
            return JsonResponse({"error": str(exc)}, status=exc.status)
    try:
        annotation, created = labeling.answer_submit(project=project, scan=scan,
                                                     user=request.user, data=data)
    except services.AnnotationError as exc:       # AnswerRefused: 403; conflicts: 409
        refusal = {"error": str(exc)}
        if getattr(exc, "code", None):
            refusal["code"] = exc.code
        if isinstance(exc, labeling.SubmissionConflict):     # the page offers to change it
            refusal["stored"] = _answer_words(exc.stored)
        return JsonResponse(refusal, status=getattr(exc, "status", 400))
    # the reader's earlier answer on this scan, which this one replaces in training (a
    # correction after an error whose first request was stored after all): the page says so
    replaced, too_quick = None, None
    if created:
        earlier = (Annotation.objects.filter(scan=scan, reader=request.user)
                   .exclude(pk=annotation.pk).order_by("-created_at", "-pk").first())
        replaced = _answer_words(earlier) if earlier is not None else None
        # an answer given sooner after the scan appeared than anyone reads: kept, said
        too_quick = labeling.reading_too_quick(annotation)
    project.refresh_from_db()
    found = labeling.lease_next_or_new_round(project=project, user=request.user)
    next_payload, new_round = None, False
    if found is not None:
        next_scan_obj, item, new_round = found
        next_payload = page_content.label_payload(project=project, scan=next_scan_obj, item=item,
                                              user=request.user)
    else:                 # the page goes to the worklist, which says why
        messages.info(request, labeling.nothing_left_words(project, request.user))
    status = model_status(project)
    return JsonResponse({
        "saved": {**_answer_words(annotation), "created": created},
        "replaced": replaced,
        "too_quick": too_quick,
        "model_version": status["model_version"],
        # a refit this answer queued runs in the background: the page shows "Model updating…"
        "model_status": status,
        "next": next_payload,
        # the round was done and the model chose the next batch for this answer
        "new_round": new_round,
        "worklist": reverse("annotator:worklist", args=[project.pk]),
        "server_ms": round((time.perf_counter() - started) * 1000, 1),
    }, status=201 if created else 200)


def _answer_words(annotation: Annotation) -> dict:
    return {"id": annotation.pk, "outcome": annotation.outcome,
            "label": annotation.label_class.name if annotation.label_class_id else None,
            "words": labeling.describe_answer(annotation),
            "at": annotation.created_at.isoformat()}


@login_required_json
@require_POST
def answer_undo(request, project_id: int, annotation_id: int):
    """Take back the reader's last answer; the page then shows that scan again."""
    project = selectors.project_get_for_user(request.user, project_id)
    if not Annotation.objects.filter(pk=annotation_id, scan__project=project).exists():
        raise Http404("No such answer in this project.")
    try:
        scan = labeling.answer_undo(project=project, annotation_id=annotation_id,
                                    user=request.user)
    except services.AnnotationError as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    return JsonResponse({"undone": annotation_id,
                         "scan_url": reverse("annotator:label", args=[project.pk, scan.pk])})


PLAIN_TEXT = "text/plain; charset=utf-8"   # a reason in words ("…", "×") reads as written
WINDOW_LIMIT = 1e7       # values beyond any modality's units (HU, 16-bit counts)


@login_required
@require_GET
def scan_window(request, scan_id: int):
    """The scan rendered from its stored (de-identified) file with the window
    ``?center=&width=`` on its own values (HU for CT, the 16-bit values of a 16-bit PNG),
    and/or one frame ``?frame=k`` of a series imported as one scan (0 = the first slice in
    position order)."""
    scan = selectors.scan_get_for_user(request.user, scan_id)
    window, frame = None, None
    if "frame" in request.GET:
        try:
            frame = int(request.GET["frame"])
        except ValueError:
            frame = -1
        if not 0 <= frame < max(scan.num_frames, 1):
            return HttpResponse(f"frame must be a whole number from 0 to "
                                f"{max(scan.num_frames, 1) - 1}", status=400,
                                content_type=PLAIN_TEXT)
    if "center" in request.GET or "width" in request.GET:
        if scan.colour:
            return HttpResponse("a colour scan has no window: use brightness and contrast",
                                status=400, content_type=PLAIN_TEXT)
        try:
            center, width = float(request.GET["center"]), float(request.GET["width"])
        except (KeyError, ValueError):
            return HttpResponse("give ?center=…&width=… as numbers", status=400,
                                content_type=PLAIN_TEXT)
        if not (abs(center) < WINDOW_LIMIT and 0 < width < WINDOW_LIMIT):
            return HttpResponse("the window needs |centre| and width below 10 million, "
                                "width > 0", status=400, content_type=PLAIN_TEXT)
        window = (center, width)
    if window is None and frame is None:
        return HttpResponse("give ?center=…&width=… (a window) and/or ?frame=… (a slice)",
                            status=400, content_type=PLAIN_TEXT)
    try:
        with open(storage.media_path(scan.file.name), "rb") as handle:
            data = handle.read()
        decoded = decode_scan(data, salt=settings.DEID_SALT, keep_copy=False,
                              max_pixels=(settings.IMPORT_MAX_SERIES_PIXELS
                                          if scan.num_frames > 1 else
                                          settings.IMPORT_MAX_PIXELS), window=window,
                              frame=frame if scan.num_frames > 1 else None)
    except (OSError, ValueError):
        raise Http404("The stored file is missing.") from None
    except ScanDecodeError as exc:
        return HttpResponse(f"the stored file cannot be windowed: {exc}", status=409,
                            content_type=PLAIN_TEXT)
    response = HttpResponse(render_preview(decoded.pixels, max_side=settings.PREVIEW_MAX_SIDE),
                            content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@login_required
@require_GET
def gradcam(request, scan_id: int):
    from ml_backend import services as ml

    scan = selectors.scan_get_for_user(request.user, scan_id)
    try:
        class_id = int(request.GET.get("class", ""))
    except ValueError:
        raise Http404("Say which class: ?class=<id>.") from None
    if not LabelClass.objects.filter(pk=class_id, project=scan.project).exists():
        raise Http404("No such class in this project.")
    if scan.pk in selectors.read_blind_scan_ids(scan.project, request.user, [scan.pk]):
        return HttpResponse("Blind reading: another reader has read this scan, so the model's "
                            "view of it is hidden until you have answered it.", status=403,
                            content_type=PLAIN_TEXT)
    try:
        png = ml.scan_gradcam(scan=scan, class_id=class_id)
    except TrainingError as exc:
        return HttpResponse(str(exc), status=409, content_type=PLAIN_TEXT)
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=600"
    return response


# --- new anomaly types -------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def class_create(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    if not labeling.can_add_classes(project, request.user):
        raise Http404("Only reviewers and admins add classes in this project.")
    form = LabelClassForm(request.POST or None, project=project)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            label_class, _ = services.label_class_get_or_create(
                project=project, name=form.cleaned_data["name"], created_by=request.user,
                description=form.cleaned_data["description"],
                label_set=form.cleaned_data["label_set"])
            if form.cleaned_data["hotkey"]:
                label_class.hotkey = form.cleaned_data["hotkey"]
                label_class.save(update_fields=["hotkey"])
        messages.success(request, f"Class {label_class.name!r} added. Label a few examples: "
                                  "candidates are below.")
        return redirect("annotator:class_detail", project.pk, label_class.pk)
    return render(request, "annotator/class_form.html", {"project": project, "form": form},
                  status=400 if request.method == "POST" else 200)


@login_required
def class_detail(request, project_id: int, class_id: int):
    from ml_backend import services as ml
    from ml_backend.services import runs

    project = selectors.project_get_for_user(request.user, project_id)
    label_class = LabelClass.objects.filter(project=project, pk=class_id).first()
    if label_class is None:
        raise Http404("No such class in this project.")
    # the scans read as this class in answers the user may see (blind reading)
    visible = selectors.class_examples(project, label_class, request.user)
    examples = list(visible[:24])
    candidates, error = {"neighbours": [], "novel": [], "propagated": []}, None
    try:
        candidates = ml.class_candidates(label_class=label_class, k=12)
    except (TrainingError, OSError) as exc:
        error = runs.encoder_files_refusal(project) or str(exc)   # lost files: restore them
    if selectors.reads_blind(project, request.user):    # "like #245": an example of theirs?
        seen = set(visible.values_list("pk", flat=True))
        candidates["neighbours"] = [c if c.get("like") in seen else {**c, "like": None}
                                    for c in candidates["neighbours"]]
    return render(request, "annotator/class_detail.html", {
        "project": project, "label_class": label_class, "examples": examples,
        "neighbours": candidates["neighbours"], "novel": candidates["novel"],
        "propagated": candidates["propagated"], "error": error,
    })


@login_required_json
@require_POST
def class_confirm(request, project_id: int, class_id: int):
    """Confirm a candidate: a label of this class by this reader (JSON in, JSON out)."""
    project = selectors.project_get_for_user(request.user, project_id)
    label_class = LabelClass.objects.filter(project=project, pk=class_id).first()
    if label_class is None:
        raise Http404("No such class in this project.")
    try:
        scan = _scan_in_project(project, int(request.POST.get("scan", "")))
    except ValueError:
        return JsonResponse({"error": "say which scan"}, status=400)
    if label_class.label_set.is_multi:     # a finding: present on this scan, others unread
        data = {"outcome": "findings", "findings": {label_class.pk: "present"},
                "note": "confirmed as a candidate for a new finding"}
    else:
        data = {"outcome": "label", "class_id": label_class.pk,
                "note": "confirmed as a candidate for a new class"}
    try:
        annotation, created = labeling.answer_submit(
            project=project, scan=scan, user=request.user,
            data={**data, "submission_id": request.POST.get("submission_id", "")})
    except services.AnnotationError as exc:       # AnswerRefused: 403
        return JsonResponse({"error": str(exc)}, status=getattr(exc, "status", 400))
    return JsonResponse({"saved": annotation.pk, "created": created}, status=201 if created else 200)


# --- classify an uploaded scan -----------------------------------------------------------


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def classify(request, project_id: int):
    from ml_backend import services as ml

    project = selectors.project_get_for_user(request.user, project_id)
    form = ClassifyForm(request.POST or None, request.FILES or None, project=project)
    context = {"project": project, "form": form}
    if request.method != "POST":
        return render(request, "annotator/classify.html", context)
    if not form.is_valid():
        return render(request, "annotator/classify.html", context, status=400)
    upload = form.cleaned_data["file"]
    reason = check_upload(upload)
    data = b""
    if reason is None:
        data = upload.read()
        try:      # with the de-identified copy an import would store: all that is kept
            decoded, not_kept = classify_decode(data, name=upload.name or "")
        except ScanDecodeError as exc:
            reason = str(exc)
    # a DICOM's file name often carries the patient's name: it is never shown
    shown_name = shown_file_name(upload.name or "", data)
    if reason is not None:
        form.add_error("file", f"{shown_name}: {reason}")
        return render(request, "annotator/classify.html", context, status=400)
    preview = render_preview(decoded.pixels)
    label_set, set_note = _classify_label_set(project, form.cleaned_data["label_set"], decoded)
    try:
        result = ml.classify_image(project=project, preview_png=preview, label_set=label_set)
    except TrainingError as exc:
        form.add_error(None, str(exc))
        return render(request, "annotator/classify.html", context, status=409)
    # the similar labeled scans, with the labels this reader may see (blind reading hides
    # other readers' answers on scans they have not read: such a scan is left out)
    visible = selectors.visible_label_names(project, request.user,
                                            [s["scan"].pk for s in result["similar"]])
    result["similar"] = [{**s, "label": visible[s["scan"].pk][0]} for s in result["similar"]
                         if visible.get(s["scan"].pk)]
    # Keep the de-identified copy (never the upload) for "add to the pool": one per user and
    # project, expires, a cap on all kept.
    try:
        if not_kept:
            raise StagingRefused(not_kept)
        token = classify_stage(decoded, name=upload.name or "", user_id=request.user.pk,
                               sha256=hashlib.sha256(data).hexdigest(), project_id=project.pk)
    except StagingRefused as exc:
        token = None
        context["not_kept"] = f"This scan cannot be added to the pool from here: {exc}."
    decoded.linkage = data = None
    request.session[f"classify-{project.pk}"] = token
    context.update({
        "result": result, "file_name": shown_name,
        "preview_b64": base64.b64encode(preview).decode(),
        "overlay_b64": base64.b64encode(result["overlay_png"]).decode(),
        "warnings": ([set_note] if set_note else []) + decoded.warnings,
        "token": token,
        "datasets": project.datasets.all(),
    })
    return render(request, "annotator/classify.html", context)


def _classify_label_set(project, chosen, decoded) -> tuple[object, str]:
    """The label set a classify upload is read with, and a note when the file's own
    modality and body part pick none: the chosen set, else the one an import of the file
    would resolve to, else the project's first."""
    if chosen is not None:
        return chosen, ""
    sets = list(project.label_sets.order_by("order", "pk"))
    modality = decoded.meta.get("modality") or ""
    body_part = decoded.meta.get("body_part") or ""
    label_set = services.label_set_resolve(sets, dataset_id=None, modality=modality,
                                           body_part=body_part)
    if label_set is not None or not sets:
        return label_set, ""
    return sets[0], (
        f"No label set of this project applies to this file (modality "
        f"{modality or 'not given'}, body part {body_part or 'not given'}): it was read with "
        f"{sets[0].name!r}; choose the kind of scan to read it with another.")


@login_required
@require_POST
def classify_add(request, project_id: int):
    """Import the last classified upload into the pool (the normal, de-identifying import)."""
    project = selectors.project_get_for_user(request.user, project_id)
    token = request.POST.get("token", "")
    if not token or request.session.get(f"classify-{project.pk}") != token:
        messages.error(request, "That upload is no longer available: classify it again.")
        return redirect("annotator:classify", project.pk)
    folder = classify_staged(token)
    if folder is None:
        messages.error(request, "That upload is no longer kept (it expired, or you classified "
                                "another scan since): classify it again.")
        return redirect("annotator:classify", project.pk)
    dataset = (request.POST.get("dataset") or "uploads").strip()[:200] or "uploads"
    refusal = services.dataset_name_refusal(dataset)
    if refusal is not None:         # the copy stays kept until it expires
        messages.error(request, f"{refusal[0].upper()}{refusal[1:]}: classify the scan again "
                                "and name another dataset.")
        return redirect("annotator:classify", project.pk)
    try:
        staged = classify_claim(folder, token)
    except StagingRefused as exc:   # a double click: the first request took it
        messages.error(request, f"{str(exc)[0].upper()}{str(exc)[1:]}.")
        return redirect("annotator:classify", project.pk)
    try:
        with transaction.atomic():
            job = services.import_job_create(
                project=project, source=str(staged), source_is_upload=True,
                dataset_name=dataset, split="pool", layout="flat", created_by=request.user)
            transaction.on_commit(lambda: run_import_job.delay(job.pk))
    except Exception:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    request.session.pop(f"classify-{project.pk}", None)
    messages.success(request, "The scan is being added to the pool.")
    return redirect(job)
