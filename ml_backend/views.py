"""The Label Studio ML backend protocol, as plain views under ``/ml/<project id>/``.

Label Studio appends ``health``, ``setup``, ``predict``, ``webhook`` and ``versions`` to the
backend URL it was given. Health and setup answer fast (Label Studio waits 1 s / 3 s) and
load no model; predictions come from the stored pool predictions and are computed in one
batch only for scans that have none; training is never run in a request: START_TRAINING
queues a refit. HTTP Basic auth with ML_BACKEND_BASIC_AUTH="user:password" (required when DEBUG is off:
without it every call is refused; open on a DEBUG development machine).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from annotator.models import Project, Scan
from medsite import jsonbody
from ml_backend.errors import TrainingError
from ml_backend.label_studio_protocol import findings_prediction_json, prediction_json
from ml_backend.models import ModelVersion, Prediction, TrainingRun
from ml_backend.services import inference, runs
from ml_backend.services.artifacts import model_version_files_problem
from ml_backend.services.findings import findings_predictions

logger = logging.getLogger(__name__)
MODEL_CLASS = "MedLabel SimCLRv2 (linear head on frozen embeddings)"


def _authorized(request) -> bool:
    expected = settings.ML_BACKEND_BASIC_AUTH
    if not expected:
        # open only on a development machine; production must set ML_BACKEND_BASIC_AUTH
        return settings.DEBUG
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        given = base64.b64decode(header[6:].encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    # bytes against bytes: a non-ASCII user or password is a plain "no", never an error
    return hmac.compare_digest(given, expected.encode("utf-8"))


def _endpoint(methods: tuple[str, ...]):
    def wrap(view):
        @csrf_exempt
        def inner(request, project_id: int):
            if request.method not in methods:
                return JsonResponse({"error": f"use {' or '.join(methods)}"}, status=405)
            if not _authorized(request):
                response = JsonResponse({"error": "authentication required"}, status=401)
                response["WWW-Authenticate"] = 'Basic realm="medlabel-ml"'
                return response
            project = Project.objects.select_related("active_model").filter(pk=project_id).first()
            if project is None:
                return JsonResponse({"error": f"no project {project_id}"}, status=404)
            body = {}
            if request.method == "POST":
                try:
                    body = jsonbody.parse_json(request.body, expect=dict, empty={})
                except jsonbody.BodyError as exc:
                    return JsonResponse({"error": str(exc)}, status=exc.status)
            return view(request, project, body)
        return inner
    return wrap


def _version(project: Project) -> str:
    return project.active_model.version if project.active_model_id else "none"


def _training(project: Project) -> dict | None:
    """The project's latest training run, for Label Studio's operators (the ML backend
    protocol has no training-status call: ``health`` and START_TRAINING's answer carry it)."""
    run = TrainingRun.objects.filter(project=project).order_by("-created_at").first()
    if run is None:
        return None
    return {"run": run.pk, "kind": run.kind, "status": run.status,
            "progress": round(float(run.progress or 0), 3),
            "model_version": run.model_version.version if run.model_version_id else None,
            "created_at": run.created_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None}


def _problems(project: Project) -> list[str]:
    """What keeps the backend from doing all its work, in words (file checks only: health
    has 1 s): the active encoder's or model's files missing. Stored predictions are still
    served, so health stays UP; Label Studio shows the body to its operators."""
    problems = [p for p in [runs.encoder_files_refusal(project)] if p]
    if project.active_model is not None:
        problem = model_version_files_problem(project.active_model)
        if problem:
            problems.append(problem)
    return problems


@_endpoint(("GET",))
def health(request, project, body):
    """Label Studio needs 200 JSON with ``status`` (UP) within 1 s, or marks the backend
    disconnected; ``problems`` lists what it cannot do, in words ([] when none)."""
    return JsonResponse({"status": "UP", "model_class": MODEL_CLASS,
                         "model_version": _version(project), "training": _training(project),
                         "problems": _problems(project)})


@_endpoint(("POST",))
def setup(request, project, body):
    return JsonResponse({"model_version": _version(project)})


@_endpoint(("GET",))
def versions(request, project, body):
    names = list(ModelVersion.objects.filter(project=project, kind="classifier")
                 .exclude(status="failed").order_by("-created_at").values_list("version", flat=True))
    return JsonResponse({"versions": names})


def _scan_id(task: dict) -> int | None:
    data = task.get("data") if isinstance(task, dict) else None
    return jsonbody.db_id((data or {}).get("scan_id") if isinstance(data, dict) else None)


@_endpoint(("POST",))
def predict(request, project, body):
    """One result per task, in order: the suggested class as a Choices result and ``score``
    = confidence (Label Studio's ascending score order then shows the least confident first);
    for a findings scan, the findings above their thresholds with every finding's
    probability, and ``score`` = how sure the model is of the whole answer."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        return JsonResponse({"error": "expected {'tasks': [...]}"}, status=400)
    model = project.active_model
    if model is None:
        # no score: an unscored task must not sort first in the least-confident tab
        return JsonResponse({"results": [{"result": [], "model_version": "none"}
                                         for _ in tasks]})
    names = {c["id"]: c["name"] for c in model.config.get("classes", [])}
    ids = [_scan_id(t) for t in tasks]
    scans = Scan.objects.select_related("label_set").in_bulk([i for i in ids if i is not None])
    scans = {i: s for i, s in scans.items() if s.project_id == project.pk}
    findings = {i: s for i, s in scans.items() if s.label_set_id and s.label_set.is_multi}
    scans = {i: s for i, s in scans.items() if i not in findings}
    try:
        scored = findings_predictions(model, list(findings.values())) if findings else {}
    except (TrainingError, OSError, ValueError) as exc:
        logger.warning("findings predict for Label Studio with %s failed: %s", model.version, exc)
        return JsonResponse({"error": f"the model {model.version} could not score the "
                                      f"findings of {len(findings)} tasks: {exc}"}, status=503)
    stored = {p.scan_id: (p.predicted_class_id, p.confidence) for p in Prediction.objects.filter(
        model_version=model, scan_id__in=list(scans))}
    missing = [scans[i] for i in scans if i not in stored]
    if missing:                      # scans without a stored prediction: one batch
        try:
            proba = inference.predictor_for(model)(missing)
        except (TrainingError, OSError, ValueError) as exc:
            # an error Label Studio shows (it reports a failed ML backend call), not silence
            logger.warning("predict for Label Studio with %s failed: %s", model.version, exc)
            return JsonResponse({"error": f"the model {model.version} could not score "
                                          f"{len(missing)} of the tasks: {exc}"}, status=503)
        classes = list(names)
        for scan, p in zip(missing, proba):
            if float(p.max()) > 0:            # a scan whose label set has no head: no answer
                best = int(p.argmax())
                stored[scan.pk] = (classes[best], float(p[best]))
    results = []
    for scan_id in ids:
        if scan_id in scored:
            results.append(findings_prediction_json(model.version, *scored[scan_id]))
        elif scan_id in stored and stored[scan_id][0] in names:
            class_id, confidence = stored[scan_id]
            results.append(prediction_json(model.version, names[class_id], confidence))
        else:
            results.append({"result": [], "model_version": model.version})   # unscored
    return JsonResponse({"results": results})


@_endpoint(("POST",))
def webhook(request, project, body):
    """START_TRAINING queues a refit (never in the request), or answers 409 with why it
    could only fail (no encoder, labels of too few classes). Annotation events are taken from
    our own secret-carrying webhook (/labelstudio/<id>/webhook/), not from this one."""
    action = body.get("action")
    if action == "START_TRAINING":
        refusal = runs.refit_refusal(project) if project.active_encoder_id else None
        if refusal:     # labels of too few classes: the run could only fail, and says why
            return JsonResponse({"error": refusal}, status=409)
        run = runs.refit_start_if_due(project=project, force=True,
                                      params={"requested_from": "label_studio"})
        where = f"{settings.SITE_URL}{project.get_absolute_url()}"
        if run is not None:
            return JsonResponse({"status": "queued", "run": run.pk, "model_version": _version(
                project), "message": f"refit run {run.pk} queued; its progress is on {where} "
                "and in this backend's /health"}, status=201)
        busy = runs.refit_busy(project)
        if busy is not None:
            return JsonResponse({"status": "already queued", "run": busy.pk,
                                 "message": f"refit run {busy.pk} is {busy.status}; its "
                                 f"progress is on {where}"})
        return JsonResponse({"error": "the project has no encoder yet: pretrain one first "
                                      "(`manage.py pretrain`)"}, status=409)
    return JsonResponse({"status": "ignored", "action": action})

