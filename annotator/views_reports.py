"""The per-project Reports page: how good is a model version, and how did we get here.

Mirrors ``manage.py report``: per-class precision / recall / F1 / support / AUC / AP, the
summary metrics with calibration before and after temperature scaling, the confusion matrix,
the per-site (data set) breakdown, the learning curve across model versions, plus maps of the
pool in the encoder's embedding space. Charts are PNGs drawn by the pure
``ml_backend.charts`` and served one per URL, each for the version in ``?model=``.

The page itself only reads rows and checks that files exist; the charts load artifacts.
Nothing here trains or predicts.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

from annotator import selectors
from annotator.models import LabelClass, Project
from ml_backend import charts
from ml_backend import services as ml
from ml_backend.models import Evaluation, ModelVersion, Prediction
from ml_backend.services.runs import encoder_files_missing

logger = logging.getLogger(__name__)

PLAIN_TEXT = "text/plain; charset=utf-8"   # a reason in words ("…", "×") reads as written

# The charts one URL each serves: name → what it shows.
CHARTS = {
    "confusion": "Confusion matrix",
    "reliability": "Reliability diagram",
    "per_site": "Metrics per data set",
    "learning_curve": "Learning curve",
    "embedding_labels": "Pool embedding map coloured by label",
    "embedding_predictions": "Pool embedding map coloured by prediction",
}
# Linked from each finding's row rather than shown on the page: ?set=<set>&finding=<name>.
FINDING_CHART = "finding_reliability"
MAX_MAP_POINTS = 5000


@login_required
@require_safe
def reports(request, project_id: int):
    project = selectors.project_get_for_user(request.user, project_id)
    model = _selected_model(project, request.GET.get("model"))
    extra = {"eval_labeled": selectors.eval_labeled_count(project)} if model is None else {}
    return render(request, "annotator/reports.html",
                  {**_page(project, model), **extra,
                   "blind": selectors.reads_blind(project, request.user)})


@login_required
@require_safe
def chart(request, project_id: int, name: str):
    project = selectors.project_get_for_user(request.user, project_id)
    if name not in CHARTS and name != FINDING_CHART:
        raise Http404("No such chart.")
    model = _selected_model(project, request.GET.get("model"))
    try:
        png = (_draw_finding_reliability(model, request.GET.get("set", ""),
                                         request.GET.get("finding", ""))
               if name == FINDING_CHART else _draw(project, model, name))
    except (OSError, ValueError) as error:      # unreadable artifacts, inconsistent report
        logger.exception("report chart %s of project %s failed", name, project.pk)
        raise Http404(f"The {name} chart could not be drawn: {error}") from error
    if png is None:
        raise Http404(f"No data for the {name} chart yet.")
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=60"
    return response


# --- reads -----------------------------------------------------------------------------


def _selected_model(project: Project, version: str | None) -> ModelVersion | None:
    """``?model=<version>`` among the project's classifiers (404 if unknown), else the
    active classifier, else the newest one."""
    classifiers = ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER)
    if version:
        model = classifiers.select_related("parent").filter(version=version).first()
        if model is None:
            raise Http404("No such model version in this project.")
        return model
    if project.active_model_id:
        return classifiers.select_related("parent").filter(pk=project.active_model_id).first()
    return classifiers.select_related("parent").order_by("-created_at", "-pk").first()


def _evaluation(model: ModelVersion | None) -> Evaluation | None:
    if model is None:
        return None
    return model.evaluations.order_by("-created_at", "-pk").first()


def _learning_curve(project: Project) -> list[dict]:
    """One point per evaluated classifier version (its latest evaluation), by labels."""
    latest: dict[int, Evaluation] = {}
    for evaluation in (Evaluation.objects.filter(model_version__project=project)
                       .select_related("model_version").order_by("created_at", "pk")):
        latest[evaluation.model_version_id] = evaluation
    points = [{"version": e.model_version.version, "labels": e.num_labels,
               "accuracy": e.accuracy, "macro_f1": e.macro_f1, "macro_auc": e.macro_auc,
               "status": e.model_version.get_status_display(),
               "promoted": e.model_version.promoted_at is not None}
              for e in latest.values()]
    return sorted(points, key=lambda p: (p["labels"], p["version"]))


def _encoder_for(project: Project, model: ModelVersion | None) -> ModelVersion | None:
    """The embedding space to map: the selected classifier's encoder, else the active one."""
    if model is not None and model.parent is not None:
        return model.parent
    return project.active_encoder


def _has_embeddings(encoder: ModelVersion | None) -> bool:
    if encoder is None or not encoder.artifact_dir:
        return False
    paths = ml.embeddings_paths(encoder)
    return paths["ids"].exists() and paths["vectors"].exists()


def _pool_map(project: Project, encoder: ModelVersion) -> tuple[np.ndarray, np.ndarray]:
    """``(scan_ids, xy)``: the project's embedded pool scans projected to 2-D (PCA)."""
    paths = ml.embeddings_paths(encoder)
    pool = np.array(sorted(project.scans.filter(split="pool").values_list("pk", flat=True)),
                    dtype=np.int64)
    stat = paths["vectors"].stat()
    return _projection(str(paths["ids"]), str(paths["vectors"]),
                       (stat.st_mtime_ns, stat.st_size), pool.tobytes())


@lru_cache(maxsize=8)
def _projection(ids_path: str, vectors_path: str, stamp: tuple, pool_bytes: bytes
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cached per embeddings file version (``stamp``: mtime and size) and pool; the
    returned arrays are read-only."""
    ids = np.load(Path(ids_path)).astype(np.int64)
    vectors = np.load(Path(vectors_path), mmap_mode="r")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} scan ids for {len(vectors)} embedding rows")
    rows = np.flatnonzero(np.isin(ids, np.frombuffer(pool_bytes, dtype=np.int64)))
    xy, kept = charts.pca_2d(np.asarray(vectors[rows], dtype=np.float32),
                             max_points=MAX_MAP_POINTS, seed=0, normalize=True)
    scan_ids = ids[rows][kept]
    scan_ids.flags.writeable = False
    xy.flags.writeable = False
    return scan_ids, xy


def _class_palette(project: Project) -> tuple[list[LabelClass], list[str] | None]:
    """The project's classes in display order and their own colours when those tell the
    classes apart (else the charts' palette)."""
    classes = list(project.label_classes.all())
    colors = [c.color for c in classes]
    return classes, colors if len(set(colors)) == len(colors) else None


# --- charts ----------------------------------------------------------------------------


def _draw(project: Project, model: ModelVersion | None, name: str) -> bytes | None:
    """PNG bytes of chart ``name``, or None when there is nothing to draw yet."""
    if name == "learning_curve":
        points = _learning_curve(project)
        if not points:
            return None
        return charts.learning_curve_png(points, highlight=model.version if model else None)
    if name.startswith("embedding_"):
        return _draw_map(project, model, by_prediction=name == "embedding_predictions")
    evaluation = _evaluation(model)
    report = (evaluation.report if evaluation else None) or {}
    if name == "confusion" and report.get("confusion_matrix"):
        return charts.confusion_matrix_png(report["confusion_matrix"], report["class_names"],
                                           no_prediction=report.get("no_prediction"))
    if name == "reliability" and report.get("reliability"):
        return charts.reliability_png(report["reliability"], report.get("ece"),
                                      report.get("ece_before_scaling"),
                                      temperature=report.get("temperature")
                                      if isinstance(report.get("temperature"), (int, float))
                                      else None)
    if name == "per_site" and report.get("per_group"):
        return charts.per_site_png(report["per_group"])
    return None


def _draw_finding_reliability(model: ModelVersion | None, set_name: str, finding: str
                              ) -> bytes | None:
    """One finding's reliability diagram: per probability bin, how often the finding is
    present against the mean predicted probability."""
    reports = (((model.metrics or {}).get("training") or {}).get("findings") or {}) if model \
        else {}
    row = ((reports.get(set_name) or {}).get("per_finding") or {}).get(finding)
    if not row or not row.get("reliability"):
        return None
    bins = [{**b, "accuracy": b.get("frequency")} for b in row["reliability"]]
    return charts.reliability_png(bins, row.get("ece"), title=f"{finding}",
                                  y_label="share present",
                                  x_label="predicted probability of the finding")


def _draw_map(project: Project, model: ModelVersion | None, *, by_prediction: bool
              ) -> bytes | None:
    encoder = _encoder_for(project, model)
    if not _has_embeddings(encoder) or (by_prediction and model is None):
        return None
    scan_ids, xy = _pool_map(project, encoder)
    classes, colors = _class_palette(project)
    index = {c.pk: i for i, c in enumerate(classes)}
    if by_prediction:
        chosen = dict(Prediction.objects.filter(model_version=model)
                      .values_list("scan_id", "predicted_class_id"))
        if not chosen:
            return None
        title = f"Pool by prediction of {model.version} ({encoder.version} embeddings, PCA)"
        unlabeled = "no prediction"
    else:
        scans, class_ids = selectors.training_labels(project, split="pool")
        chosen = {s.pk: c for s, c in zip(scans, class_ids)}
        title = (f"Pool by label: {sum(int(s) in chosen for s in scan_ids)} of {len(scan_ids)} "
                 f"labeled ({encoder.version} embeddings, PCA)")
        unlabeled = "unlabeled"
    labels = [index.get(chosen.get(int(s)), charts.UNLABELED) for s in scan_ids]
    return charts.embedding_map_png(xy, labels, [c.name for c in classes], title,
                                    colors=colors, unlabeled_name=unlabeled)


# --- the page --------------------------------------------------------------------------


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _page(project: Project, model: ModelVersion | None) -> dict:
    evaluation = _evaluation(model)
    report = (evaluation.report if evaluation else None) or {}
    names = report.get("class_names") or list(report.get("per_class", {}))
    per_class = [{"name": n, **{k: _fmt(report["per_class"][n].get(k))
                                for k in ("precision", "recall", "f1", "auc", "ap")},
                  "support": report["per_class"][n].get("support")}
                 for n in names if n in report.get("per_class", {})]
    matrix = report.get("confusion_matrix") or []
    # Eval scans the version gave no prediction (no head for their label set): their own
    # column, never a class's (ml_backend.metrics.reports, "No prediction").
    missing = report.get("no_prediction") or [0] * len(matrix)
    no_prediction = sum(missing)
    confusion = [{"name": n, "cells": [{"count": v, "diagonal": i == j} for j, v in enumerate(row)]
                  + ([{"count": missing[i], "diagonal": False}] if no_prediction else []),
                  "total": sum(row) + missing[i]}
                 for i, (n, row) in enumerate(zip(names, matrix))]
    sites = [{"name": g, "n": v.get("n"), "accuracy": _fmt(v.get("accuracy")),
              "macro_f1": _fmt(v.get("macro_f1")), "macro_auc": _fmt(v.get("macro_auc")),
              "no_prediction": v.get("no_prediction", 0)}
             for g, v in (report.get("per_group") or {}).items()]
    curve = _learning_curve(project)
    for point in curve:
        point.update(accuracy_s=_fmt(point["accuracy"]), macro_f1_s=_fmt(point["macro_f1"]),
                     macro_auc_s=_fmt(point["macro_auc"]))
    encoder = _encoder_for(project, model)
    embedded = _has_embeddings(encoder)
    # lost files are not "no embeddings yet": `embed` cannot help, restoring them can
    encoder_missing = (encoder_files_missing(encoder, project)
                       if encoder is not None and not embedded else None)
    has_predictions = (model is not None
                       and Prediction.objects.filter(model_version=model).exists())
    temperature = report.get("temperature")
    summary = [
        ("Accuracy", _fmt(report.get("accuracy"))),
        ("Macro-F1", _fmt(report.get("macro_f1"))),
        ("Weighted F1", _fmt(report.get("weighted_f1"))),
        ("Macro-AUC", _fmt(report.get("macro_auc"))),
        ("Macro-AP", _fmt(report.get("macro_ap"))),
        ("Cohen's kappa", _fmt(report.get("cohen_kappa"))),
        ("ECE (after temperature scaling)" if "ece_before_scaling" in report else "ECE",
         _fmt(report.get("ece"))),
    ]
    if "ece_before_scaling" in report:
        summary.append(("ECE before temperature scaling", _fmt(report["ece_before_scaling"])))
        if isinstance(temperature, dict):     # one head per label set
            shown = " · ".join(f"{name} {t:.2f}" for name, t in temperature.items())
        else:
            shown = "—" if temperature is None else f"{temperature:.2f}"
        summary.append(("Temperature T", shown))
    summary.append(("NLL", _fmt(report.get("nll"))))
    per_set = [{"name": name, "n": r.get("num_eval"), "accuracy": _fmt(r.get("accuracy")),
                "macro_f1": _fmt(r.get("macro_f1")), "macro_auc": _fmt(r.get("macro_auc")),
                "ece": _fmt(r.get("ece")), "no_prediction": r.get("num_no_prediction", 0),
                "classes": ", ".join(r.get("class_names") or list(r.get("per_class", {})))}
               for name, r in (report.get("per_set") or {}).items()]
    unknown = report.get("unknown_classes") or []
    gate = (model.metrics or {}).get("gate") if model is not None else None
    return {
        "patient_overlap": selectors.patient_overlap_words(project),
        "per_set": per_set if len(per_set) > 1 else [],
        "unknown_classes": unknown,
        "unknown_scans": sum((report.get("per_class", {}).get(n) or {}).get("support") or 0
                             for n in unknown),
        "no_prediction": no_prediction,
        "gate": gate or None,
        "project": project,
        "model": model,
        "models": ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER)
                  .order_by("-created_at", "-pk"),
        "evaluation": evaluation,
        "summary": summary if evaluation else [],
        "per_class": per_class,
        "class_names": names,
        "confusion": confusion,
        "sites": sites,
        "curve": curve,
        "encoder": encoder,
        "embedded": embedded,
        "encoder_missing": encoder_missing,
        "has_predictions": has_predictions,
        "has_reliability": bool(report.get("reliability")),
        "findings": _findings_sections(project, model),
        "model_query": f"?{urlencode({'model': model.version})}" if model else "",
    }


def _findings_sections(project: Project, model: ModelVersion | None) -> list[dict]:
    """The version's findings sets: per-finding eval report, the findings gate and the macro
    AUC of every version that had a findings head for the set (its learning curve)."""
    if model is None:
        return []
    metrics = model.metrics or {}
    reports = (metrics.get("training") or {}).get("findings") or {}
    gates = metrics.get("findings_gate") or {}
    history = list(ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER)
                   .order_by("created_at", "pk"))
    sections = []
    for name, report in reports.items():
        rows = [{"name": finding, "chart": "?" + urlencode({"model": model.version, "set": name,
                                                             "finding": finding}),
                 **{k: _fmt(r.get(k)) for k in (
                    "prevalence", "auc", "ap", "threshold", "sensitivity", "specificity", "ppv",
                    "f1", "ece")}, "positives": r.get("positives"),
                 # never preselected (a constant head, or a threshold no better than chance)
                 "never": (r.get("threshold") or 0) > 1,
                 "note": r.get("threshold_note") or r.get("preselection_note") or ""}
                for finding, r in ((report or {}).get("per_finding") or {}).items()]
        gate = gates.get(name) or {}
        curve = []
        columns = [r["name"] for r in rows]
        for version in history:
            other = ((version.metrics or {}).get("training") or {}).get("findings") or {}
            if name in other:
                entry = next((e for e in (version.config or {}).get("findings_sets", [])
                              if e["name"] == name), {})
                per = (other[name] or {}).get("per_finding") or {}
                curve.append({"version": version.version, "scans": entry.get("num_scans"),
                              "macro_auc": _fmt((other[name] or {}).get("macro_auc")),
                              "per_finding": [_fmt((per.get(f) or {}).get("auc"))
                                              for f in columns],
                              "status": version.get_status_display()})
        own = next((e for e in (model.config or {}).get("findings_sets", [])
                    if e["name"] == name), {})
        sections.append({
            "name": name, "report": report, "rows": rows,
            "threshold_rule": own.get("threshold_rule", ""),
            "summary": [] if not report else [
                ("Eval scans", report.get("num_scans")),
                ("Macro AUC", _fmt(report.get("macro_auc"))),
                ("Micro AUC", _fmt(report.get("micro_auc"))),
                ("Any-finding AUC", _fmt(report.get("any_finding_auc"))),
                ("Macro AP", _fmt(report.get("macro_ap"))),
                ("Macro F1", _fmt(report.get("macro_f1"))),
                ("Micro F1", _fmt(report.get("micro_f1"))),
                ("Macro ECE", _fmt(report.get("macro_ece")))],
            "gate": [{"name": finding, "candidate": _fmt(g.get("candidate_auc")),
                      "active": _fmt(g.get("active_auc")), "delta": _fmt(g.get("delta")),
                      "status": g.get("status")}
                     for finding, g in (gate.get("per_finding") or {}).items()],
            "gate_note": gate.get("note", ""),
            "curve": curve, "curve_columns": columns})
    return sections


@login_required
@require_safe
def export_labels(request, project_id: int):
    """The labels as a download: ``?format=csv|jsonl&split=all|pool|eval&adjudicated=1``
    (the `export_labels` command also writes an image folder)."""
    from annotator import exports

    project = selectors.project_get_for_user(request.user, project_id)
    if selectors.reads_blind(project, request.user):
        return HttpResponse(selectors.BLIND_DOWNLOAD, status=403, content_type=PLAIN_TEXT)
    # a filter silently ignored would download what was not asked for (as the API refuses it)
    adjudicated = request.GET.get("adjudicated") or ""
    if adjudicated not in ("", "0", "1", "false", "true"):
        return HttpResponse(f"adjudicated: use 1 (true) or 0 (false), not {adjudicated[:40]!r}",
                            status=400, content_type=PLAIN_TEXT)
    try:
        body, content_type, name = exports.label_download(
            project, fmt=request.GET.get("format", "csv"), split=request.GET.get("split", "all"),
            adjudicated_only=adjudicated in ("1", "true"))
    except exports.ExportError as exc:
        return HttpResponse(str(exc), status=400, content_type=PLAIN_TEXT)
    response = HttpResponse(body, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
