"""Model versions: evaluate on the labeled eval scans, gate against the active version on
the same scans, activate / promote, and store the active classifier's pool predictions.

Activation sends ``ml_backend.signals.model_activated`` (the audit trail records it) and a
published classifier sends ``classifier_published`` (Label Studio follows); the receivers
live in the app that owns them."""

from __future__ import annotations

import logging
import re

import numpy as np
from django.db import transaction
from django.utils import timezone

from annotator.models import LabelClass, Project, Scan
from annotator.selectors import class_label_sets, patient_overlap_words, training_labels
from ml_backend import signals
from ml_backend.errors import AlreadyActive, TrainingError
from ml_backend.models import Evaluation, ModelVersion, Prediction, TrainingRun
from ml_backend.services.artifacts import model_version_files_problem
from ml_backend.services.inference import Predictor, predictor_for, scan_refs
from ml_backend.services.queries import query_round_create

logger = logging.getLogger(__name__)

WRITE_BATCH = 250      # prediction rows per transaction

def model_version_activate(model: ModelVersion, *, reason: str = "", actor=None,
                           rolled_back_from: ModelVersion | None = None) -> bool:
    """Make ``model`` the project's active encoder or classifier; retire the previous one.
    Sends ``model_activated`` (the audit trail records it; ``actor`` None: the gate / the
    system). Returns whether it became active.

    A person's choice stands against the runs already in flight: a choice by hand
    (``actor``) is noted on the project's running runs, under the lock on the project row,
    and a version such a run made is then kept but not activated (``READY``, the reason on
    the version, ``model_not_activated`` for the audit trail). A run started after the
    choice gates against it as usual."""
    field = "active_encoder" if model.kind == ModelVersion.Kind.ENCODER else "active_model"
    with transaction.atomic():
        project = Project.objects.select_for_update(no_key=True).get(pk=model.project_id)
        if actor is None and _chosen_by_hand_while_running(model, field, project, reason):
            return False
        if actor is not None:
            _note_choice_for_runs_in_flight(model, field, actor)
        previous_id = getattr(project, f"{field}_id")
        if previous_id and previous_id != model.pk:
            ModelVersion.objects.filter(pk=previous_id).update(status=ModelVersion.Status.RETIRED)
        model.status = ModelVersion.Status.ACTIVE
        model.status_reason = reason or model.status_reason
        model.promoted_at = timezone.now()
        model.save(update_fields=["status", "status_reason", "promoted_at"])
        setattr(project, field, model)
        project.save(update_fields=[field])
        previous = ModelVersion.objects.filter(pk=previous_id).values_list(
            "version", flat=True).first() if previous_id else None
        # the audit trail records it (annotator's receiver), in this transaction
        signals.model_activated.send(sender=ModelVersion, model=model, project=project,
                                     previous=previous, actor=actor,
                                     rolled_back=rolled_back_from is not None)
    return True


CHOSEN_BY_HAND = "chosen_by_hand"       # TrainingRun.params key: {field: the choice}


def _note_choice_for_runs_in_flight(model: ModelVersion, field: str, actor) -> None:
    """Tell the project's running runs that a person chose ``model`` (caller holds the
    project row's lock, as their activation does when it reads this)."""
    choice = {"version": model.version, "by": actor.get_username(),
              "at": timezone.now().isoformat()}
    for run in TrainingRun.objects.filter(project_id=model.project_id,
                                          status=TrainingRun.Status.RUNNING):
        chosen = {**run.params.get(CHOSEN_BY_HAND, {}), field: choice}
        TrainingRun.objects.filter(pk=run.pk).update(
            params={**run.params, CHOSEN_BY_HAND: chosen})


def _chosen_by_hand_while_running(model: ModelVersion, field: str, project: Project,
                                  reason: str) -> bool:
    """Whether a person chose the project's ``field`` while the run that made ``model`` ran
    (caller holds the project row's lock). If so, ``model`` is kept, not activated, and
    says why; the audit trail records it (``model_not_activated``)."""
    run = (TrainingRun.objects.filter(model_version=model, status=TrainingRun.Status.RUNNING)
           .order_by("-pk").first())
    choice = (run.params.get(CHOSEN_BY_HAND) or {}).get(field) if run is not None else None
    if not choice or choice.get("version") == model.version:
        return False
    current = getattr(project, f"{field}_id")
    what = "encoder" if field == "active_encoder" else "classifier"
    verdict = gate_verdict(reason or model.status_reason)[:300]
    model.status = ModelVersion.Status.READY
    model.status_reason = (
        f"not activated: {choice['by']} chose {choice['version']} as the active {what} "
        f"while this {run.kind} (run #{run.pk}) ran, and a person's choice stands; promote "
        f"it by hand if it should replace it"
        + (f" (the gate had said: {verdict})" if verdict and what == "classifier" else ""))
    model.save(update_fields=["status", "status_reason"])
    logger.info("%s not activated: %s chose %s while run %s ran", model.version, choice["by"],
                choice["version"], run.pk)
    signals.model_not_activated.send(
        sender=ModelVersion, model=model, project=project, chosen=choice["version"],
        chosen_by=choice["by"], active=ModelVersion.objects.filter(pk=current).values_list(
            "version", flat=True).first() if current else None)
    return True


_PROMOTED_ANYWAY = re.compile(r"promoted anyway by \S+ \(the gate had said: ")


def gate_verdict(reason: str) -> str:
    """The gate's own verdict in a version's reason: a reason that already says "promoted
    anyway by … (the gate had said: …)" is unwrapped, so promoting a version again keeps
    the verdict once instead of nesting it."""
    reason = reason or ""
    while (match := _PROMOTED_ANYWAY.match(reason)):
        reason = reason[match.end():]
        reason = reason[:-1] if reason.endswith(")") else reason
    return reason


_ANY = object()


def model_version_promote(model: ModelVersion, *, actor, reason: str = "",
                          rolled_back_from: ModelVersion | None = None,
                          expected_active=_ANY) -> str | None:
    """An admin makes a classifier active by hand ("promote anyway", roll back): the same
    consequences as a promotion by the gate — its predictions for the pool, the next
    worklist round and Label Studio follow. Returns a warning in words when the version is
    active but its pool predictions could not be refreshed.

    A version that already is active is left as it is (AlreadyActive: a double click or a
    resubmitted form changes nothing, makes no round, writes no audit event). With
    ``expected_active`` (the active version's id, or None, when the page was shown) a choice
    made on a page the project has since moved past is refused (TrainingError): the gate may
    have promoted a newer version meanwhile, which this click would replace unseen. Both are
    decided under the lock on the project row, so two clicks at once promote once."""
    if model.status in (ModelVersion.Status.FAILED, ModelVersion.Status.TRAINING):
        raise TrainingError(f"{model.version} is {model.status}: it cannot be made active")
    problem = model_version_files_problem(model)   # e.g. restored without its files
    if problem:
        raise TrainingError(f"{problem}; it was not made active")
    field = "active_encoder" if model.kind == ModelVersion.Kind.ENCODER else "active_model"
    with transaction.atomic():
        project = Project.objects.select_for_update(no_key=True).get(pk=model.project_id)
        current = getattr(project, f"{field}_id")
        if current == model.pk:
            raise AlreadyActive(f"{model.version} already is the active "
                                f"{model.kind}: nothing changed")
        if expected_active is not _ANY and current != expected_active:
            now = (ModelVersion.objects.filter(pk=current).values_list("version", flat=True)
                   .first() if current else None)
            raise TrainingError(
                f"the active {model.kind} changed since this page was "
                f"shown (it is now {now or 'none'}): {model.version} was not made active. "
                "Reload the page and choose again.")
        model_version_activate(model,
                               reason=reason or f"promoted by {actor} (bypassing the gate)",
                               actor=actor, rolled_back_from=rolled_back_from)
    if model.kind != ModelVersion.Kind.CLASSIFIER:
        return None
    try:
        predictions_refresh(model)
        query_round_create(project=model.project, created_by=actor)
    except (TrainingError, OSError, KeyError, ValueError) as exc:
        # the version is active (an admin may need to roll back in a hurry); say what is stale
        logger.warning("%s is active but its pool predictions were not refreshed: %s",
                       model.version, exc)
        return (f"{model.version} is active, but its predictions for the pool could not be "
                f"computed ({type(exc).__name__}: {exc}); the worklist keeps the last round")
    finally:
        signals.classifier_published.send(sender=ModelVersion, model=model,
                                          project_id=model.project_id)
    return None


def publish(model: ModelVersion, *, predict: Predictor, classes: list[int]) -> None:
    """The gate promoted ``model``: store its pool predictions, make it active, and tell
    the predictions' consumers (``classifier_published``).

    The predictions are written *before* activation: readers only read the active model's,
    so they never see a half-written set, and the rows can go in short transactions that
    let a reader's answer write between them (on SQLite one long transaction held the
    database's write lock for the whole pool while answers waited)."""
    try:
        predictions_refresh(model, predict=predict, classes=classes)
    finally:
        # not activated when a person chose another version while its run ran
        if model_version_activate(model, reason=model.status_reason):
            signals.classifier_published.send(sender=ModelVersion, model=model,
                                              project_id=model.project_id)
    predictions_prune(model.project_id)


def predictions_prune(project_id: int) -> int:
    """Keep the pool predictions of the active classifier and of the one before it (what a
    rollback or a comparison reads first); older versions' go. Every refit writes one row
    per pool scan: kept, a 100,000-scan project would gain 100,000 rows a refit (issue 21).
    Promoting an old version by hand computes its predictions again."""
    keep = list(ModelVersion.objects.filter(project_id=project_id, kind=ModelVersion.Kind.CLASSIFIER)
                .exclude(promoted_at=None).order_by("-promoted_at", "-pk")
                .values_list("pk", flat=True)[:2])
    stale = list(ModelVersion.objects.filter(project_id=project_id,
                                             kind=ModelVersion.Kind.CLASSIFIER)
                 .exclude(pk__in=keep).values_list("pk", flat=True))
    if not stale:
        return 0
    deleted, _ = Prediction.objects.filter(model_version_id__in=stale).delete()
    return deleted


def eval_set(project: Project):
    """The labeled eval scans with a label set: (scans, class ids)."""
    scans, class_ids = training_labels(project, split="eval")
    keep = [(s, c) for s, c in zip(scans, class_ids) if s.label_set_id is not None]
    return [s for s, _ in keep], [c for _, c in keep]


def evaluate(model: ModelVersion, *, predict: Predictor, classes: list[int],
             uncalibrated: Predictor | None = None):
    """Score the model on EVERY labeled eval scan (a class the model does not know yet counts
    as missed, so versions are measured on the same scans and the learning curve is honest);
    store an Evaluation with the per-class report, one report per label set, and the ECE
    before temperature scaling when an uncalibrated predictor is given.

    Each scan is scored over its own label set's classes only. A scan of a label set the
    model has no head for gets no probability at all: it is *no prediction* (the report's
    ``no_prediction`` column, ``ml_backend.metrics.reports``), a miss for its class's recall
    and for accuracy in the overall, per-set and per-site figures alike, never a class of
    another set."""
    from ml_backend.metrics.reports import (
        classification_report,
        expected_calibration_error,
    )

    scans, class_ids = eval_set(model.project)
    if not scans:
        return None
    all_classes = list(classes) + sorted(set(class_ids) - set(classes))
    names_by_id = dict(LabelClass.objects.filter(pk__in=all_classes).values_list("pk", "name"))
    for g in deleted_classes(all_classes, names_by_id, model):    # deleted during its run
        names_by_id[g["id"]] = f"{g['name'] or 'class id ' + str(g['id'])} (deleted)"
    names = [names_by_id[c] for c in all_classes]
    labels = np.array([all_classes.index(c) for c in class_ids])
    class_set = class_label_sets(model.project)
    own_set = np.array([[class_set.get(c) == s.label_set_id for c in all_classes]
                        for s in scans])
    proba = np.where(own_set, _widen(predict(scans), len(all_classes)), 0.0)
    datasets = dict(Scan.objects.filter(pk__in=[s.pk for s in scans])
                    .values_list("pk", "dataset__name"))
    groups = np.array([datasets[s.pk] for s in scans])
    report = classification_report(labels, proba, names, groups=groups, applies=own_set)
    report["known_classes"] = [names_by_id[c] for c in classes]
    report["unknown_classes"] = [names_by_id[c] for c in all_classes[len(classes):]]
    per_set = {}
    for label_set in model.project.label_sets.all():
        cols = [i for i, c in enumerate(all_classes) if class_set.get(c) == label_set.pk]
        rows = np.flatnonzero([s.label_set_id == label_set.pk and labels[i] in cols
                               for i, s in enumerate(scans)])
        if not len(rows) or len(cols) < 2:
            continue
        y = np.searchsorted(cols, labels[rows])
        sub = proba[np.ix_(rows, cols)]
        per_set[label_set.name] = classification_report(y, sub, [names[c] for c in cols])
        per_set[label_set.name]["num_eval"] = int(len(rows))
    report["per_set"] = per_set
    if uncalibrated is not None:
        known = np.flatnonzero(labels < len(classes))
        if len(known):
            raw = _widen(uncalibrated([scans[i] for i in known]), len(all_classes))
            report["ece_before_scaling"] = float(expected_calibration_error(labels[known], raw))
        report["temperature"] = model.config.get("temperature")
        if report["temperature"] is None and model.config.get("label_sets"):
            report["temperature"] = {c["name"]: c["temperature"]
                                     for c in model.config["label_sets"]}
    return Evaluation.objects.create(
        model_version=model, num_labels=model.num_labels, num_eval=len(scans),
        accuracy=report.get("accuracy"), macro_f1=report.get("macro_f1"),
        macro_auc=report.get("macro_auc"), cohen_kappa=report.get("cohen_kappa"),
        ece=report.get("ece"), report=report)


def _widen(proba: np.ndarray, width: int) -> np.ndarray:
    """Pad probability columns with zeros for classes the model does not know."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape[1] >= width:
        return proba
    return np.concatenate([proba, np.zeros((len(proba), width - proba.shape[1]))], axis=1)


def gate(model: ModelVersion, evaluation: Evaluation | None, *,
         predict: Predictor | None = None) -> tuple[bool, str, dict]:
    """Compare the candidate with the active classifier on the SAME labeled eval scans.

    Classes only the candidate knows are reported as newly learned; a regression is a drop
    on the shared classes that a paired bootstrap says is beyond the project's tolerance
    (``ml_backend.metrics.gate``), not noise. Returns (promote?, the reason in words, the
    comparison)."""
    from ml_backend.metrics.gate import compare_models, describe

    project = Project.objects.select_related("active_model").get(pk=model.project_id)
    active = project.active_model
    if active is None:
        return True, "promoted: the first classifier of this project", {}
    if evaluation is None:
        return False, ("held back: the project has no labeled eval scans to compare it with "
                       f"{active.version} (label some eval scans, or promote it by hand)"), {}
    scans, class_ids = eval_set(project)
    candidate_classes = [c["id"] for c in model.config["classes"]]
    active_classes = [c["id"] for c in active.config["classes"]]
    known = sorted(set(candidate_classes) | set(active_classes))
    names_by_id = dict(LabelClass.objects.filter(pk__in=known).values_list("pk", "name"))
    # a class a version learned that was deleted since (behind the admin's back: it refuses
    # that) is left out of the comparison, in words, never a KeyError
    gone = deleted_classes(known, names_by_id, model, active)
    space = [c for c in known if c in names_by_id]
    keep = [i for i, c in enumerate(class_ids) if c in space]
    if not keep:
        return True, (f"promoted: none of the eval scans is of a class {active.version} or "
                      "this version knows" + (f". {deleted_classes_words(gone, model, active)}"
                                              if gone else "")), {}
    scans = [scans[i] for i in keep]
    y = np.array([space.index(class_ids[i]) for i in keep])
    try:
        active_proba = predictor_for(active)(scans)
    except (TrainingError, OSError, ValueError) as exc:
        return True, (f"promoted: the active model {active.version} cannot be scored any more "
                      f"({exc})"), {}
    predict = predict or predictor_for(model)

    def existing(proba, columns: list[int]) -> np.ndarray:
        """The probabilities of the classes that still exist (a deleted one's column: 0)."""
        alive = np.array([c in names_by_id for c in columns], bool)
        return np.where(alive[None, :], np.asarray(proba, np.float64), 0.0)

    def predicted(proba: np.ndarray, known: list[int]) -> np.ndarray:
        best = np.asarray(proba).argmax(axis=1)
        none = np.asarray(proba).max(axis=1) <= 0            # no head for the scan's set
        return np.where(none, len(space), np.array(
            [space.index(known[b]) if known[b] in names_by_id else len(space) for b in best],
            dtype=np.int64))

    active_proba = existing(active_proba, active_classes)
    candidate_proba = existing(predict(scans), candidate_classes)
    # Forgetting is judged on the classes both know, with the candidate's answer among those
    # classes (a scan the candidate now calls by a new class is that class's business: its
    # recall and precision are reported as newly learned, from the unrestricted answers).
    old = np.array([c in active_classes for c in candidate_classes])
    restricted = np.where(old[None, :], candidate_proba, 0.0)
    arguments = dict(class_names=[names_by_id[c] for c in space] + ["(no prediction)"],
                     candidate_classes={space.index(c) for c in candidate_classes
                                        if c in names_by_id},
                     active_classes={space.index(c) for c in active_classes
                                     if c in names_by_id},
                     tolerance=project.gate_tolerance)
    active_pred = predicted(active_proba, active_classes)
    comparison = compare_models(y, predicted(restricted, candidate_classes), active_pred,
                                **arguments)
    if not old.all():
        full = compare_models(y, predicted(candidate_proba, candidate_classes), active_pred,
                              **arguments)
        comparison["new_classes"] = full["new_classes"]
        comparison["with_new_classes"] = {"macro_f1": full["macro_f1"],
                                          "per_class": full["per_class"]}
    comparison["active_version"] = active.version
    reason = describe(comparison, candidate=model.version, active=active.version)
    if gone:
        comparison["deleted_classes"] = gone
        reason = f"{reason} {deleted_classes_words(gone, model, active)}"
    overlap = patient_overlap_words(project)
    if overlap:
        comparison["patient_overlap"] = overlap
        reason = f"{reason} {overlap}"
    return not comparison["regression"], reason, comparison


def deleted_classes(ids, names_by_id: dict, *versions: ModelVersion) -> list[dict]:
    """The classes of ``ids`` that no longer exist (not in ``names_by_id``), each with the
    name it had in the ``versions`` that learned it: ``{"id", "name", "learned_by"}``."""
    gone = []
    for class_id in ids:
        if class_id in names_by_id:
            continue
        learned = [v for v in versions
                   if any(c.get("id") == class_id for c in v.config.get("classes") or [])]
        name = next((c.get("name") for v in learned for c in v.config["classes"]
                     if c.get("id") == class_id and c.get("name")), None)
        gone.append({"id": class_id, "name": name,
                     "learned_by": [v.version for v in learned]})
    return gone


def deleted_classes_words(gone: list[dict], model: ModelVersion, active: ModelVersion) -> str:
    """What the gate says of classes a version learned that were deleted since."""
    said = "; ".join(
        (f"{g['name']!r} (class id {g['id']})" if g["name"] else f"class id {g['id']}")
        + (f", learned by {' and '.join(g['learned_by'])}" if g["learned_by"] else "")
        for g in gone)
    return (f"Left out of the comparison, no longer a class of this project: {said}; "
            f"{model.version} and {active.version} were compared on the classes both know "
            "that still exist.")


def predictions_refresh(model: ModelVersion, *, predict: Predictor | None = None,
                        classes: list[int] | None = None) -> int:
    """Store the model's class probabilities for every pool scan it can score (one row per
    scan, over the classes of the scan's label set), in transactions of ``WRITE_BATCH`` rows
    (see ``publish``).

    A findings-only version has no class probabilities to store: it stores none (0 rows,
    and no array file) instead of failing on an ``(N, 0)`` array; its findings are scored
    from its heads when a round is made (``queries._findings_contexts``) or a page shown."""
    classes = classes or [c["id"] for c in (model.config or {}).get("classes") or []]
    if not classes:
        Prediction.objects.filter(model_version=model).delete()
        return 0
    predict = predict or predictor_for(model)
    scans = scan_refs(Scan.objects.filter(project=model.project, split="pool").order_by("pk"))
    if not scans:
        return 0
    # which of the model's classes apply to each scan: its label set's (a mask per set)
    class_set = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "label_set_id"))
    masks: dict = {}
    ids, proba_parts, mask_parts = [], [], []
    for start in range(0, len(scans), 4096):
        chunk = scans[start:start + 4096]
        proba = np.asarray(predict(chunk), np.float64)
        mask = np.array([masks.setdefault(s.label_set_id, [class_set.get(c) == s.label_set_id
                                                           for c in classes]) for s in chunk],
                        bool).reshape(len(chunk), len(classes))
        # a scan whose set has no head yet (or no class of the model) gets no row
        scored = mask.any(axis=1) & (proba.max(axis=1) > 0)
        ids.extend(s.pk for s, keep in zip(chunk, scored) if keep)
        proba_parts.append(np.round(proba[scored], 6))
        mask_parts.append(mask[scored])
    ids = np.array(ids, np.int64)
    proba = (np.concatenate(proba_parts) if proba_parts else np.zeros((0, len(classes))))
    mask = (np.concatenate(mask_parts) if mask_parts else np.zeros((0, len(classes)), bool))
    Prediction.objects.filter(model_version=model).delete()
    _write_predictions(model, classes, ids, proba, mask)
    # the classes of the scan's set keep a non-zero column even when rounded to 0
    save_pool_predictions(model, ids, np.where(mask, np.maximum(proba, 1e-9), 0.0)
                          .astype(np.float32))
    return int(len(ids))


POOL_PREDICTIONS = "pool_predictions.npz"


def save_pool_predictions(model: ModelVersion, ids: np.ndarray, proba: np.ndarray) -> None:
    """The version's pool predictions as one array file beside its heads (sorted scan ids,
    probabilities over ``config["classes"]``): a query round reads 100,000 rows of it in
    milliseconds, where decoding as many JSON rows takes seconds. The rows stay for what
    the pages ask about one scan or a page of scans."""
    import os

    from ml_backend.services.artifacts import checkpoint_path

    path = checkpoint_path(model, POOL_PREDICTIONS)
    if not model.artifact_dir or not path.parent.is_dir():
        return
    order = np.argsort(ids, kind="stable")
    tmp = path.with_name(f".tmp-{path.name}")
    np.savez(tmp, ids=ids[order], proba=proba[order])
    os.replace(tmp, path)


def _write_predictions(model: ModelVersion, classes: list[int], ids: np.ndarray,
                       proba: np.ndarray, mask: np.ndarray) -> None:
    """Store one row per scan (``ids``): its class, confidence and the probabilities of its
    set's classes (``mask``), for a version that is not active yet. PostgreSQL: one COPY of
    text rows (100,000 rows in about a second; issue 21); elsewhere (SQLite) short
    transactions of ``WRITE_BATCH`` rows, so a reader's answer can write between them."""
    from django.db import connection

    masked = np.where(mask, proba, -1.0)
    best = masked.argmax(axis=1)
    confidence = masked[np.arange(len(ids)), best] if len(ids) else np.zeros(0)
    keys = [str(c) for c in classes]
    probabilities = [{keys[j]: v for j, (v, m) in enumerate(zip(p, k)) if m}
                     for p, k in zip(proba.tolist(), mask.tolist())]
    best_class = [classes[b] for b in best.tolist()]
    if connection.vendor == "postgresql":
        import io
        import json

        now = timezone.now().isoformat()
        text = io.StringIO()
        for scan_id, class_id, row, conf in zip(ids.tolist(), best_class, probabilities,
                                                confidence.tolist()):
            # text COPY: the JSON of numbers and digit keys holds no tab, newline or backslash
            text.write(f"{scan_id}\t{model.pk}\t{class_id}\t{json.dumps(row)}\t{conf!r}\t"
                       f"{1.0 - conf!r}\t{now}\n")
        table = Prediction._meta.db_table
        with transaction.atomic(), connection.cursor() as cursor:
            with cursor.cursor.copy(
                    f"COPY {table} (scan_id, model_version_id, predicted_class_id, "
                    "probabilities, confidence, uncertainty, created_at) FROM STDIN") as copy:
                copy.write(text.getvalue())
        return
    objects = [Prediction(scan_id=scan_id, model_version=model, predicted_class_id=class_id,
                          probabilities=row, confidence=conf, uncertainty=1.0 - conf)
               for scan_id, class_id, row, conf in zip(ids.tolist(), best_class, probabilities,
                                                       confidence.tolist())]
    for start in range(0, len(objects), WRITE_BATCH):
        with transaction.atomic():
            Prediction.objects.bulk_create(objects[start:start + WRITE_BATCH])
