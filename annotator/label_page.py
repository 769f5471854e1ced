"""What the label page shows for one scan (``label_payload``): the scan, why it was chosen,
the classes of its label set with their keys, the model's suggestion over those classes (or
why there is none, in words), its novelty, Grad-CAM and the most similar labeled scans.

Reads only: the model's answers come through the ML adapter's one inference cache.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.urls import reverse

from annotator.labeling import (
    blind_reason,
    describe_reason,
    peek_after,
    reasons_for_reader,
    round_progress,
    second_reading,
)
from annotator.models import VIEWER_KEYS, Annotation, LabelClass, Project, Scan, hotkey_error
from annotator.selectors import visible_label_names
from ml_backend.errors import ModelUnavailable, TrainingError
from ml_backend.models import ModelVersion, Prediction, QueryRound
from ml_backend.services import embeddings, inference, runs

logger = logging.getLogger(__name__)


def _own_key(c: LabelClass) -> str:
    """A class's own hotkey, unless the label page binds that key itself (one saved before
    ``hotkey_error`` checked it): it would answer instead of zooming, comparing, ..."""
    return c.hotkey.lower() if c.hotkey and not hotkey_error(c.hotkey) else ""


def effective_hotkeys(classes: list[LabelClass]) -> dict[int, str]:
    """Each class's key: its own hotkey, else the next free digit 1–9, then 0."""
    taken = {_own_key(c) for c in classes} - {""}
    free = [d for d in "1234567890" if d not in taken]
    keys = {}
    for c in classes:
        if _own_key(c):
            keys[c.pk] = _own_key(c)
        elif free:
            keys[c.pk] = free.pop(0)
    return keys


def _suggestion(project: Project, scan: Scan, set_classes: list | None = None) -> dict | None:
    """The active model's stored prediction over the classes of the scan's label set
    (computed on the fly for a scan it has not seen). None when there is no model yet or it
    has not learned this scan's label set; raises ModelUnavailable when it fails."""
    model = project.active_model
    if model is None or scan.label_set_id is None:
        return None
    classes = {c["id"]: c["name"] for c in model.config.get("classes", [])}
    mine = ({c.pk for c in set_classes} if set_classes is not None
            else set(scan.label_set.classes.values_list("pk", flat=True)))
    if not mine & set(classes):
        return None
    stored = Prediction.objects.filter(model_version=model, scan=scan).first()
    if stored is not None:
        probabilities = {int(k): float(v) for k, v in stored.probabilities.items()}
    else:
        try:
            p = inference.predictor_for(model)([scan])[0]
        except (TrainingError, OSError, ValueError) as exc:
            logger.warning("no prediction for scan %s with %s: %s", scan.pk, model.version, exc)
            raise ModelUnavailable(f"the model {model.version} could not score this scan: "
                                   f"{exc}") from None
        probabilities = {cid: float(v) for cid, v in zip(classes, p) if cid in mine}
    probabilities = {cid: p for cid, p in probabilities.items() if cid in mine}
    if not probabilities or max(probabilities.values()) <= 0:
        return None
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
    best_id, best_p = ranked[0]
    return {"model_version": model.version, "class_id": best_id,
            "class_name": classes.get(best_id, "?"), "confidence": round(best_p, 4),
            "calibrated": inference.is_calibrated(model, scan.label_set_id),
            "top": [{"class_id": cid, "name": classes.get(cid, "?"), "p": round(p, 4)}
                    for cid, p in ranked[:5]]}


# Keys of a findings set: digits first, then letters the page does not use otherwise
# (VIEWER_KEYS: s skip, u unsure, i invert, g Grad-CAM, r reset, n 1:1, c compare, h help);
# 0 means "no finding".
FINDING_KEYS = "123456789" + "".join(k for k in "abcdefghijklmnopqrstuvwxyz"
                                     if k not in VIEWER_KEYS)


def finding_hotkeys(findings: list[LabelClass]) -> dict[int, str]:
    taken = {c.hotkey.lower() for c in findings if c.hotkey and c.hotkey.lower() in FINDING_KEYS}
    free = [k for k in FINDING_KEYS if k not in taken]
    keys = {}
    for c in findings:
        hotkey = c.hotkey.lower() if c.hotkey else ""
        if hotkey in FINDING_KEYS and hotkey not in keys.values():
            keys[c.pk] = hotkey
        elif free:
            keys[c.pk] = free.pop(0)
    return keys


def _findings_suggestion(project: Project, scan: Scan, findings: list[LabelClass]) -> dict | None:
    """The active version's per-finding probabilities for the scan, with the thresholds
    saved with it; None when it has no findings head for the scan's set."""
    from ml_backend.services.findings import findings_scorer

    model = project.active_model
    scorer = findings_scorer(model, scan.label_set_id)
    if scorer is None:
        return None
    proba = scorer.predict([scan])[0]
    column = {int(i): j for j, i in enumerate(scorer.finding_ids)}
    scores = {f.pk: (round(float(proba[column[f.pk]]), 4),
                     round(float(scorer.thresholds[column[f.pk]]), 4))
              for f in findings if f.pk in column}
    return {"model_version": model.version, "scores": scores}


def _similar(scan: Scan, k: int = 6, user=None) -> tuple[list[dict], str | None]:
    """The most similar labeled scans of the scan's label set with their labels as ``user``
    may see them (blind reading: ``selectors.answers_visible``), and why there are none when
    the search failed (no encoder or no embeddings yet is not a failure: an empty list)."""
    try:
        hits = embeddings.similar_scans(scan=scan, k=k, labeled_only=True, same_label_set=True)
    except ModelUnavailable as exc:
        logger.warning("similar scans for scan %s: %s", scan.pk, exc)
        return [], f"Similar scans are unavailable: {exc}"
    except TrainingError:
        # not embedded yet is no failure; the encoder's files gone is, and says what to do
        missing = (runs.encoder_files_refusal(scan.project)
                   if scan.project.active_encoder_id else None)
        return [], (f"Similar scans are unavailable: {missing}" if missing else None)
    except (OSError, ValueError) as exc:
        logger.warning("similar scans for scan %s failed: %s", scan.pk, exc)
        return [], f"Similar scans are unavailable: {type(exc).__name__}: {exc}"
    labels = visible_label_names(scan.project, user, [s.pk for s, _ in hits])
    return [{"scan": s.pk, "similarity": round(score, 3), "labels": labels.get(s.pk, []),
             "preview": reverse("annotator:scan_preview", args=[s.pk])} for s, score in hits
            if not s.quarantined], None


def scan_classes(scan: Scan) -> list[LabelClass]:
    """The classes a reader may give this scan: its label set's (none without a set)."""
    if scan.label_set_id is None:
        return []
    return list(LabelClass.objects.filter(label_set_id=scan.label_set_id).order_by("order", "name"))


def model_notice(project: Project) -> str | None:
    """Why the newest refit is not the active model, in words (None when it is)."""
    newest = (ModelVersion.objects.filter(project=project, kind=ModelVersion.Kind.CLASSIFIER)
              .exclude(status=ModelVersion.Status.TRAINING).order_by("-created_at").first())
    if newest is None or newest.pk == project.active_model_id:
        return None
    if newest.status == ModelVersion.Status.FAILED:
        return f"The last refit ({newest.version}) failed: {newest.status_reason[:300]}"
    if newest.status == ModelVersion.Status.READY:
        return f"{newest.version} was {newest.status_reason[:400]}"
    return None


def label_payload(*, project: Project, scan: Scan, item=None, user=None) -> dict:
    """Everything the label page shows for one scan, as JSON-ready data."""
    classes = scan_classes(scan)
    findings_mode = scan.label_set_id is not None and scan.label_set.is_multi
    keys = finding_hotkeys(classes) if findings_mode else effective_hotkeys(classes)
    model_error = None
    findings_suggestion = None
    # a second reader (or a reviewer) reads blind: no model, no other readings (no anchoring)
    blinded = user is not None and second_reading(project, scan, user)
    try:
        if blinded:
            suggestion = None
        elif findings_mode:
            suggestion = None
            findings_suggestion = _findings_suggestion(project, scan, classes)
        else:
            suggestion = _suggestion(project, scan, classes)
    except (ModelUnavailable, OSError, ValueError) as exc:
        suggestion, model_error = None, str(exc)
    novelty = embeddings.scan_novelty(scan)
    if suggestion is not None and novelty is not None and novelty["ood"]:
        suggestion["unreliable"] = True
    similar, similar_error = _similar(scan, user=user)
    if blinded:                      # their labels are other readers' answers
        similar = [{**n, "labels": []} for n in similar]
    gradcam = None
    if suggestion is not None:
        gradcam = (reverse("annotator:gradcam", args=[scan.pk])
                   + f"?class={suggestion['class_id']}")
    findings_rows = (_findings_rows(classes, keys, findings_suggestion, scan)
                     if findings_mode else [])
    if findings_suggestion is not None:    # the most probable finding's map first
        top = max((r for r in findings_rows if r["p"] is not None), key=lambda r: r["p"],
                  default=None)
        gradcam = top["gradcam"] if top else None
    progress = None
    if item is not None and user is not None:
        progress = round_progress(project, user, QueryRound(pk=item.query_round_id))
    yours = None
    if user is not None:
        mine = (Annotation.objects.filter(scan=scan, reader=user).order_by("-created_at", "-pk")
                .select_related("label_class").first())
        if mine is not None:
            yours = {"id": mine.pk, "outcome": mine.outcome,
                     "label": mine.label_class.name if mine.label_class_id else None}
    return {
        "blinded": ("Blind reading: another reader has read this scan"
                    if project.role_of(user) != "reviewer" else "Blind reading as reviewer")
        + ", so the model's suggestion and other readers' answers are hidden until you answer."
        if blinded else None,
        "yours": yours,
        "scan": {"id": scan.pk, "preview": reverse("annotator:scan_preview", args=[scan.pk]),
                 "window": window_info(scan), "colour": scan.colour,
                 "width": scan.width, "height": scan.height, "dataset": scan.dataset.name,
                 "modality": scan.modality, "split": scan.split,
                 "label_set": scan.label_set.name if scan.label_set_id else None,
                 "url": reverse("annotator:label", args=[project.pk, scan.pk]),
                 "answer": reverse("annotator:answer", args=[project.pk, scan.pk]),
                 # a series imported as one scan: its frames, in position order (mm)
                 "frames": scan.num_frames if scan.file_format == "dicom" else 1,
                 "slices": scan.slices,
                 "render": reverse("annotator:scan_window", args=[scan.pk])},
        "item": None if item is None else {
            "round": item.query_round_id, "rank": item.rank, "score": round(item.score, 4),
            "reason": (blind_reason(describe_reason(item.reason, item.score)) if blinded
                       else describe_reason(item.reason, item.score) if user is None
                       else reasons_for_reader(project, user, [
                           describe_reason(item.reason, item.score)])[0])},
        "suggestion": suggestion,
        "model_error": model_error,
        "novelty": novelty,
        "model_notice": model_notice(project),
        "gradcam": gradcam,
        "similar": similar,
        "similar_error": similar_error,
        "classes": [{"id": c.pk, "name": c.name, "key": keys.get(c.pk, ""), "color": c.color,
                     "description": c.description} for c in classes],
        "no_label_set": scan.label_set_id is None,
        "findings_mode": findings_mode,
        "findings": findings_rows,
        "findings_model": findings_suggestion["model_version"] if findings_suggestion else None,
        "model_version": project.active_model.version if project.active_model_id else None,
        "progress": progress,
        "lease_seconds": settings.LABEL_LEASE_SECONDS,
        "prefetch": _prefetch(project, user, scan) if item is not None and user else None,
    }


# Window presets (centre, width) in Hounsfield units, as radiology viewers ship them.
CT_PRESETS = [("Brain", 40, 80), ("Subdural", 75, 215), ("Stroke", 40, 40),
              ("Lung", -600, 1500), ("Mediastinum", 50, 350), ("Abdomen", 40, 400),
              ("Liver", 60, 160), ("Bone", 400, 1800)]


def window_info(scan: Scan) -> dict | None:
    """Window/level for a greyscale scan: its stored values' range, the default window, the
    presets of its modality, and the URL that renders any window from the stored file."""
    display = scan.display or {}
    if scan.colour or "window" not in display:
        return None
    low, high = display["value_range"]
    presets = [{"name": "Default", "center": display["window"][0],
                "width": display["window"][1]},
               {"name": "Full range", "center": (low + high) / 2,
                "width": max(high - low, 1.0)}]
    if scan.modality.upper() == "CT":
        presets += [{"name": n, "center": c, "width": w} for n, c, w in CT_PRESETS]
    return {"center": display["window"][0], "width": display["window"][1],
            "range": [low, high], "presets": presets,
            "units": "HU" if scan.modality.upper() == "CT" else "",
            "url": reverse("annotator:scan_window", args=[scan.pk])}


def _prefetch(project: Project, user, scan: Scan) -> str | None:
    upcoming = peek_after(project=project, user=user, scan=scan)
    return reverse("annotator:scan_preview", args=[upcoming]) if upcoming else None




def _findings_rows(findings: list[LabelClass], keys: dict[int, str],
                   suggestion: dict | None, scan: Scan) -> list[dict]:
    """A findings set's rows: each finding with its key, the model's probability and
    threshold, and whether the page preselects it (probability at or above the threshold)."""
    scores = suggestion["scores"] if suggestion else {}
    rows = []
    for f in findings:
        p, threshold = scores.get(f.pk, (None, None))
        rows.append({"id": f.pk, "name": f.name, "key": keys.get(f.pk, ""), "color": f.color,
                     "description": f.description, "p": p, "threshold": threshold,
                     "preselected": p is not None and p >= threshold,
                     "gradcam": (reverse("annotator:gradcam", args=[scan.pk]) + f"?class={f.pk}"
                                 if p is not None else None)})
    return rows
