"""Django adapter around the pure ML core: runs, model versions, embeddings, similar scans.

Commands and Celery tasks call ``training_run_create`` then ``training_run_execute``; the
work itself lives in ``ml_backend.ssl`` / ``ml_backend.index`` / ``ml_backend.metrics``.
A run is claimed with a conditional update (queued → running) so a duplicate delivery does
nothing; a failed run marks itself failed and never changes the project's active models.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from annotator.models import Annotation, LabelClass, Project, Scan
from annotator.storage import media_path
from ml_backend.data.arrays import load_images
from ml_backend.models import (
    Evaluation,
    ModelVersion,
    Prediction,
    QueryItem,
    QueryRound,
    TrainingRun,
)
from ml_backend.ssl import train as ssl
from ml_backend.ssl.train import TrainingError

logger = logging.getLogger(__name__)

LEASE = timedelta(minutes=30)
Progress = Callable[[dict], None]


# --- runs ------------------------------------------------------------------------------


def training_run_create(*, project: Project, kind: str, params: dict | None = None,
                        requested_by=None, enqueue: bool = False) -> TrainingRun:
    """Record a run; with ``enqueue`` the Celery task is sent once the row is committed."""
    if kind not in TrainingRun.Kind.values:
        raise ValueError(f"unknown run kind {kind!r}")
    run = TrainingRun.objects.create(project=project, kind=kind, params=params or {},
                                     requested_by=requested_by)
    if enqueue:
        from ml_backend.tasks import run_training

        transaction.on_commit(lambda: run_training.delay(run.pk))
    return run


def training_run_claim(run_id: int) -> bool:
    """Claim a queued run for this worker. Exactly one caller gets True."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING, started_at=now, lease_expires_at=now + LEASE,
        claimed_by=f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}",
    )
    return claimed == 1


class _RunReporter:
    """Writes progress and log lines to the run row, at most every few seconds."""

    def __init__(self, run: TrainingRun, echo: Progress | None = None, every: float = 3.0):
        self.run, self.echo, self.every, self.last = run, echo, every, 0.0

    def log(self, line: str) -> None:
        self.run.log += f"{timezone.now():%H:%M:%S} {line}\n"
        self.run.save(update_fields=["log"])

    def __call__(self, event: dict) -> None:
        if self.echo is not None:
            self.echo(event)
        fraction = _fraction(event)
        now = time.monotonic()
        if fraction is not None and (now - self.last >= self.every or fraction >= 1.0):
            self.last = now
            self.run.progress = round(fraction, 4)
            self.run.lease_expires_at = timezone.now() + LEASE
            self.run.save(update_fields=["progress", "lease_expires_at"])


def _fraction(event: dict) -> float | None:
    if "epochs" in event:
        step = event.get("step", event.get("steps", 1))
        steps = max(event.get("steps", 1), 1)
        return min(1.0, (event["epoch"] - 1 + step / steps) / event["epochs"])
    if "total" in event:
        return min(1.0, event["done"] / max(event["total"], 1))
    return None


def training_run_execute(run_id: int, *, progress: Progress | None = None) -> TrainingRun | None:
    """Claim and run one TrainingRun. Returns None when another worker has it."""
    if not training_run_claim(run_id):
        logger.info("training run %s already claimed or finished", run_id)
        return None
    run = TrainingRun.objects.select_related("project").get(pk=run_id)
    reporter = _RunReporter(run, progress)
    handlers = {"pretrain": _pretrain, "embed": _embed, "refit": _refit,
                "retrain": _finetune, "distill": _distill}
    try:
        handlers[run.kind](run, reporter)
        run.status = TrainingRun.Status.SUCCEEDED
        run.progress = 1.0
    except TrainingError as exc:
        run.status, run.last_error = TrainingRun.Status.FAILED, str(exc)
    except Exception as exc:  # the run's boundary: the row must say what happened
        logger.exception("training run %s crashed", run_id)
        run.status = TrainingRun.Status.FAILED
        run.last_error = f"unexpected error: {type(exc).__name__}: {exc}"
    # run.model_version is always the version this run created (embed runs create none).
    if run.status == TrainingRun.Status.FAILED and run.model_version is not None:
        version = run.model_version
        version.status = ModelVersion.Status.FAILED
        version.status_reason = run.last_error[:2000]
        version.save(update_fields=["status", "status_reason"])
    run.finished_at = timezone.now()
    run.lease_expires_at = None
    run.save()
    return run


# --- model versions --------------------------------------------------------------------


def _new_version(run: TrainingRun, kind: str, *, parent: ModelVersion | None,
                 config: dict) -> ModelVersion:
    prefix = "enc" if kind == ModelVersion.Kind.ENCODER else "clf"
    version = base = f"p{run.project_id}-{prefix}-{run.pk}"
    suffix = 1
    # a restored backup may already hold this name (versions keep their names across restores)
    while ModelVersion.objects.filter(version=version).exists() or (
            Path(settings.ARTIFACTS_ROOT) / "models" / version).exists():
        suffix += 1
        version = f"{base}-{suffix}"
    directory = Path(settings.ARTIFACTS_ROOT) / "models" / version
    directory.mkdir(parents=True, exist_ok=True)
    model = ModelVersion.objects.create(project=run.project, kind=kind, version=version,
                                        parent=parent, artifact_dir=str(directory), config=config)
    run.model_version = model
    run.save(update_fields=["model_version"])
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return model


def model_version_activate(model: ModelVersion, *, reason: str = "", actor=None,
                           rolled_back_from: ModelVersion | None = None) -> None:
    """Make ``model`` the project's active encoder or classifier; retire the previous one.
    Recorded in the audit trail (``actor`` None: the gate / the system)."""
    field = "active_encoder" if model.kind == ModelVersion.Kind.ENCODER else "active_model"
    with transaction.atomic():
        project = Project.objects.select_for_update().get(pk=model.project_id)
        previous_id = getattr(project, f"{field}_id")
        if previous_id and previous_id != model.pk:
            ModelVersion.objects.filter(pk=previous_id).update(status=ModelVersion.Status.RETIRED)
        model.status = ModelVersion.Status.ACTIVE
        model.status_reason = reason or model.status_reason
        model.promoted_at = timezone.now()
        model.save(update_fields=["status", "status_reason", "promoted_at"])
        setattr(project, field, model)
        project.save(update_fields=[field])
        from annotator import audit
        from annotator.models import AuditEvent

        previous = ModelVersion.objects.filter(pk=previous_id).values_list(
            "version", flat=True).first() if previous_id else None
        audit.record(
            action=AuditEvent.Action.MODEL_ROLLED_BACK if rolled_back_from is not None
            else AuditEvent.Action.MODEL_PROMOTED, obj_type="model_version", obj_id=model.pk,
            project=project, actor=actor, model_version=model.version,
            details={"kind": model.kind, "previous": previous, "reason": model.status_reason,
                     "num_labels": model.num_labels})


def _checkpoint(model: ModelVersion, name: str) -> Path:
    return Path(model.artifact_dir) / name


# --- images ----------------------------------------------------------------------------


def _images_for(scans: list[Scan], size: int) -> np.ndarray:
    """The scans' display previews at ``size`` (see ml_backend/data/arrays.py)."""
    missing = [s.pk for s in scans if not media_path(s.preview.name).exists()]
    if missing:
        raise TrainingError(f"preview files missing for scans {missing[:10]}; re-import them")
    return load_images([media_path(s.preview.name) for s in scans], size)


def _hflip_mask(scans: list[Scan]) -> np.ndarray:
    return np.array([s.dataset.hflip_allowed for s in scans], dtype=bool)


# --- pretrain --------------------------------------------------------------------------


def _pretrain(run: TrainingRun, report: _RunReporter) -> None:
    params = dict(run.params)
    init = params.pop("init_checkpoint", None)
    activate = params.pop("activate", True)
    resume_version = params.pop("resume", None)
    scans = list(Scan.objects.filter(project=run.project).select_related("dataset").order_by("pk"))
    if len(scans) < 2:
        raise TrainingError("pretraining needs at least 2 scans in the project")
    if resume_version:
        model = ModelVersion.objects.filter(project=run.project, version=resume_version,
                                            kind=ModelVersion.Kind.ENCODER).first()
        if model is None:
            raise TrainingError(f"no encoder {resume_version!r} in this project to resume")
        if model.status not in (ModelVersion.Status.TRAINING, ModelVersion.Status.FAILED):
            raise TrainingError(f"{resume_version} is {model.status}: only an unfinished or "
                                "failed pretraining can be resumed")
        if not _checkpoint(model, "encoder.pt").exists():
            raise TrainingError(f"{resume_version} has no checkpoint yet: start a new run")
        config = ssl.config_from_dict(ssl.PretrainConfig, model.config["pretrain"])
        init = None
        model.status = ModelVersion.Status.TRAINING
        model.status_reason = f"resumed by run {run.pk}"
        model.save(update_fields=["status", "status_reason"])
        run.model_version = model
        run.save(update_fields=["model_version"])
    else:
        config = ssl.PretrainConfig(**{k: v for k, v in params.items()
                                       if k in ssl.PretrainConfig.__dataclass_fields__})
        parent = run.project.active_encoder if init == "active" else None
        if init == "active":
            if parent is None:
                raise TrainingError("--init-checkpoint active: the project has no active encoder")
            init = str(_checkpoint(parent, "encoder.pt"))
        model = _new_version(run, ModelVersion.Kind.ENCODER, parent=parent,
                             config={"pretrain": asdict(config), "init_checkpoint": init,
                                     "num_scans": len(scans)})
    report.log(f"pretraining {model.version} on {len(scans)} scans: {config.arch}, "
               f"{config.image_size}px, {config.epochs} epochs")
    images = _images_for(scans, config.image_size)
    metrics = ssl.pretrain(images, config, checkpoint_path=_checkpoint(model, "encoder.pt"),
                           model_version=model.version, init_checkpoint=init,
                           progress=report, hflip_mask=_hflip_mask(scans))
    model.metrics = {"pretrain": metrics}
    model.status = ModelVersion.Status.READY
    model.save(update_fields=["metrics", "status"])
    report.log(f"final loss {metrics['final_loss']:.4f}; {metrics['note']}".rstrip("; "))
    if activate:
        # Embed before activating: a failure here leaves the previous encoder active.
        _embed_with(run, model, report, full=True)
        model_version_activate(model, reason="pretrained")


# --- embeddings + index ----------------------------------------------------------------


def embeddings_paths(model: ModelVersion) -> dict[str, Path]:
    base = Path(model.artifact_dir)
    return {"vectors": base / "embeddings.npy", "ids": base / "scan_ids.npy",
            "index": base / "index.faiss"}


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    np.save(tmp, array)
    os.replace(tmp, path)


def _embed(run: TrainingRun, report: _RunReporter) -> None:
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    run.params = {**run.params, "encoder": encoder.version}
    run.save(update_fields=["params"])
    _embed_with(run, encoder, report, full=bool(run.params.get("full")))


def _embed_with(run: TrainingRun, encoder: ModelVersion, report: _RunReporter, *,
                full: bool) -> None:
    """Embed every scan not yet embedded with ``encoder`` (all of them when ``full``) and
    add them to its FAISS index without rebuilding it."""
    from ml_backend.index.faiss_index import VectorIndex, build_index

    paths = embeddings_paths(encoder)
    model, config = ssl.load_pretrained(_checkpoint(encoder, "encoder.pt"))
    scans = list(Scan.objects.filter(project=run.project).order_by("pk"))
    old_ids = np.zeros(0, np.int64)
    old_vectors = None
    if not full and paths["ids"].exists() and paths["index"].exists():
        old_ids = np.load(paths["ids"])
        old_vectors = np.load(paths["vectors"])
    known = set(old_ids.tolist())
    todo = [s for s in scans if s.pk not in known]
    report.log(f"embedding {len(todo)} scans with {encoder.version} "
               f"({len(known)} already embedded)")
    started = time.perf_counter()
    vectors = ssl.embed(model.encoder, _images_for(todo, config.image_size), config,
                        progress=report) if todo else np.zeros((0, model.encoder.feature_dim),
                                                               np.float32)
    seconds = time.perf_counter() - started
    ids = np.array([s.pk for s in todo], dtype=np.int64)
    if old_vectors is not None and len(known):
        index = VectorIndex.load(paths["index"])
        if len(ids):
            index.add(vectors, ids)
        all_ids, all_vectors = np.concatenate([old_ids, ids]), np.concatenate([old_vectors, vectors])
    else:
        if not len(ids):
            raise TrainingError("no scans to embed")
        kind = run.params.get("index_kind", "auto")
        index = build_index(vectors, ids, kind=kind)
        all_ids, all_vectors = ids, vectors
    _save_npy_atomic(paths["vectors"], all_vectors.astype(np.float32))
    _save_npy_atomic(paths["ids"], all_ids)
    index.save(paths["index"])
    _INDEX_CACHE.pop(str(paths["index"]), None)
    stats = {"embedded": int(len(ids)), "total": int(len(all_ids)), "index_kind": index.kind,
             "images_per_s": round(len(ids) / seconds, 1) if len(ids) and seconds else None}
    encoder.metrics = {**encoder.metrics, "embeddings": stats}
    encoder.save(update_fields=["metrics"])
    report.log(f"index {index.kind}: {len(all_ids)} vectors")


_INDEX_CACHE: dict[str, tuple[float, object]] = {}


def _load_index(path: Path):
    from ml_backend.index.faiss_index import VectorIndex

    mtime = path.stat().st_mtime
    cached = _INDEX_CACHE.get(str(path))
    if cached is None or cached[0] != mtime:
        cached = (mtime, VectorIndex.load(path))
        _INDEX_CACHE[str(path)] = cached
    return cached[1]


def similar_scans(*, scan: Scan, k: int = 8, labeled_only: bool = False) -> list[tuple[Scan, float]]:
    """The ``k`` scans most similar to ``scan`` (cosine on SimCLRv2 embeddings), best first.

    With ``labeled_only`` only scans that have a label are returned. Raises TrainingError
    when the project has no embeddings yet.
    """
    encoder = scan.project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    paths = embeddings_paths(encoder)
    if not paths["index"].exists():
        raise TrainingError("no embeddings yet: run `manage.py embed`")
    index = _load_index(paths["index"])
    ids = np.load(paths["ids"])
    position = np.flatnonzero(ids == scan.pk)
    if len(position):
        query = np.load(paths["vectors"], mmap_mode="r")[position[0]][None].astype(np.float32)
    else:  # a scan imported after the last embed: embed it on the fly
        model, config = ssl.load_pretrained(_checkpoint(encoder, "encoder.pt"))
        query = ssl.embed(model.encoder, _images_for([scan], config.image_size), config)
    allowed = None
    if labeled_only:
        allowed = list(Annotation.objects.filter(
            scan__project=scan.project, outcome=Annotation.Outcome.LABEL
        ).values_list("scan_id", flat=True).distinct())
        if not allowed:
            return []
    hits = index.search(query, k, allowed_ids=allowed, exclude_ids=[scan.pk])[0]
    by_id = Scan.objects.in_bulk([scan_id for scan_id, _ in hits])
    return [(by_id[scan_id], float(score)) for scan_id, score in hits if scan_id in by_id]


# --- labels ----------------------------------------------------------------------------


def training_labels(project: Project, *, split: str) -> tuple[list[Scan], list[int]]:
    """One label per scan: an adjudication if any, else the most common label (latest wins
    ties). Returns the scans and their LabelClass ids."""
    annotations = (Annotation.objects
                   .filter(scan__project=project, scan__split=split,
                           outcome=Annotation.Outcome.LABEL)
                   .order_by("created_at", "pk")
                   .values_list("scan_id", "label_class_id", "source"))
    votes: dict[int, list[tuple[int, str]]] = {}
    for scan_id, class_id, source in annotations:
        votes.setdefault(scan_id, []).append((class_id, source))
    chosen = {}
    for scan_id, items in votes.items():
        adjudicated = [c for c, source in items if source == Annotation.Source.ADJUDICATION]
        if adjudicated:
            chosen[scan_id] = adjudicated[-1]
            continue
        counts = Counter(c for c, _ in items)
        best = max(counts.values())
        chosen[scan_id] = next(c for c, _ in reversed(items) if counts[c] == best)
    scans = Scan.objects.in_bulk(list(chosen))
    ordered = sorted(chosen)
    return [scans[i] for i in ordered], [chosen[i] for i in ordered]


# --- fine-tune and distill -------------------------------------------------------------


def _labeled_arrays(project: Project, classes: list[int], size: int, split: str):
    scans, class_ids = training_labels(project, split=split)
    keep = [(s, c) for s, c in zip(scans, class_ids) if c in classes]
    if not keep:
        return [], np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64)
    scans = [s for s, _ in keep]
    labels = np.array([classes.index(c) for _, c in keep], dtype=np.int64)
    return scans, _images_for(scans, size), labels


def _finetune(run: TrainingRun, report: _RunReporter) -> None:
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    pretrained, pconfig = ssl.load_pretrained(_checkpoint(encoder, "encoder.pt"))
    train_scans, class_ids = training_labels(run.project, split="pool")
    classes = sorted(set(class_ids))
    if len(classes) < 2:
        raise TrainingError(f"fine-tuning needs labeled pool scans of at least 2 classes "
                            f"(have {len(train_scans)} labels in {len(classes)} class(es))")
    config = ssl.FinetuneConfig(**{k: v for k, v in run.params.items()
                                   if k in ssl.FinetuneConfig.__dataclass_fields__})
    names = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "name"))
    model = _new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        "finetune": asdict(config), "pretrain": asdict(pconfig), "kind": "finetuned",
        "classes": [{"id": c, "name": names[c]} for c in classes]})
    _, images, labels = _labeled_arrays(run.project, classes, pconfig.image_size, "pool")
    report.log(f"fine-tuning {model.version} from {encoder.version} on {len(labels)} labels, "
               f"{len(classes)} classes, from head layer {config.from_head_layer}")
    classifier, metrics = ssl.finetune(pretrained, pconfig, images, labels, len(classes), config,
                                       checkpoint_path=_checkpoint(model, "classifier.pt"),
                                       model_version=model.version, progress=report)
    _finish_classifier(run, model, _cnn_predictor(classifier, pconfig), classes, len(labels),
                       metrics, report)


def _distill(run: TrainingRun, report: _RunReporter) -> None:
    teacher_version = (ModelVersion.objects.get(pk=run.params["teacher"])
                       if run.params.get("teacher") else run.project.active_model)
    if teacher_version is None:
        raise TrainingError("distillation needs a fine-tuned teacher: run `manage.py finetune`")
    encoder = teacher_version.parent
    if encoder is None:
        raise TrainingError(f"{teacher_version.version} has no parent encoder")
    teacher, pconfig = ssl.load_classifier(_checkpoint(teacher_version, "classifier.pt"))
    pretrained, _ = ssl.load_pretrained(_checkpoint(encoder, "encoder.pt"))
    classes = [c["id"] for c in teacher_version.config["classes"]]
    config = ssl.DistillConfig(**{k: v for k, v in run.params.items()
                                  if k in ssl.DistillConfig.__dataclass_fields__})
    model = _new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        **teacher_version.config, "kind": "distilled", "distill": asdict(config),
        "teacher": teacher_version.version})
    pool = list(Scan.objects.filter(project=run.project, split="pool").order_by("pk"))
    _, labeled, labels = _labeled_arrays(run.project, classes, pconfig.image_size, "pool")
    report.log(f"distilling {teacher_version.version} into {model.version} on {len(pool)} "
               f"pool scans (+{len(labels)} labels)")
    student, metrics = ssl.distill(teacher, pretrained, pconfig,
                                   _images_for(pool, pconfig.image_size), config,
                                   labeled=labeled, labels=labels,
                                   checkpoint_path=_checkpoint(model, "classifier.pt"),
                                   model_version=model.version, progress=report)
    _finish_classifier(run, model, _cnn_predictor(student, pconfig), classes, len(labels),
                       metrics, report)


Predictor = Callable[[list[Scan]], np.ndarray]


def _cnn_predictor(classifier, pconfig) -> Predictor:
    return lambda scans: ssl.predict_proba(classifier, _images_for(scans, pconfig.image_size),
                                           pconfig)


def _head_predictor(head, encoder: ModelVersion) -> Predictor:
    return lambda scans: head.predict_proba(_vectors_for(encoder, scans))


def predictor_for(model: ModelVersion) -> Predictor:
    """Rebuild a classifier version's predict function from its artifacts."""
    if model.config.get("kind") == "head":
        from ml_backend.active.refit import LinearHead

        return _head_predictor(LinearHead.load(_checkpoint(model, "head.npz")), model.parent)
    classifier, pconfig = ssl.load_classifier(_checkpoint(model, "classifier.pt"))
    return _cnn_predictor(classifier, pconfig)


def _vectors_for(encoder: ModelVersion, scans: list[Scan]) -> np.ndarray:
    paths = embeddings_paths(encoder)
    if not paths["ids"].exists():
        raise TrainingError(f"{encoder.version} has no embeddings: run `manage.py embed`")
    ids = np.load(paths["ids"])
    vectors = np.load(paths["vectors"], mmap_mode="r")
    row = {int(scan_id): i for i, scan_id in enumerate(ids)}
    missing = [s.pk for s in scans if s.pk not in row]
    if missing:
        raise TrainingError(f"scans {missing[:10]} are not embedded yet: run `manage.py embed`")
    return np.asarray(vectors[[row[s.pk] for s in scans]], dtype=np.float32)


def _refit(run: TrainingRun, report: _RunReporter) -> None:
    """The fast loop: a calibrated linear head on frozen embeddings (seconds)."""
    from ml_backend.active.refit import fit_head

    started = time.perf_counter()
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    _embed_with(run, encoder, report, full=False)          # new scans since the last embed
    scans, class_ids = training_labels(run.project, split="pool")
    if len(set(class_ids)) < 2:
        raise TrainingError(f"a refit needs labeled pool scans of at least 2 classes "
                            f"(have {len(scans)} labels in {len(set(class_ids))} class(es))")
    head, info = fit_head(_vectors_for(encoder, scans), np.array(class_ids),
                          seed=run.params.get("seed", 0))
    classes = [int(c) for c in head.class_ids]
    names = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "name"))
    model = _new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        "kind": "head", "classes": [{"id": c, "name": names[c]} for c in classes],
        "temperature": info["temperature"], "calibrated_on": info["calibrated_on"]})
    head.save(_checkpoint(model, "head.npz"))
    report.log(f"refit {model.version}: linear head on {encoder.version} embeddings, "
               f"{len(scans)} labels, {len(classes)} classes, T={info['temperature']:.2f}")
    uncalibrated = lambda scans: head.predict_proba(_vectors_for(encoder, scans), calibrated=False)
    _finish_classifier(run, model, _head_predictor(head, encoder), classes, len(scans),
                       {"fit": info}, report, uncalibrated=uncalibrated)
    if run.params.get("query", True) and model.status == ModelVersion.Status.ACTIVE:
        query_round = query_round_create(project=run.project)
        report.log(f"query round {query_round.pk}: {query_round.size} scans "
                   f"({query_round.strategy})")
    report.log(f"refit took {time.perf_counter() - started:.1f}s")


def _finish_classifier(run, model, predict: Predictor, classes, num_labels, metrics, report, *,
                       uncalibrated: Predictor | None = None):
    model.num_labels = num_labels
    model.metrics = {"training": metrics}
    model.status = ModelVersion.Status.READY
    model.save(update_fields=["num_labels", "metrics", "status"])
    evaluation = evaluate(model, predict=predict, classes=classes, uncalibrated=uncalibrated)
    if evaluation is not None:
        report.log(f"eval: accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}"
                   f" on {evaluation.num_eval} scans")
    promoted, reason = gate(model, evaluation)
    report.log(reason)
    if promoted:
        model_version_activate(model, reason=reason)
        predictions_refresh(model, predict=predict, classes=classes)
        _label_studio_follow(model.project_id)
    else:
        model.status_reason = reason
        model.save(update_fields=["status_reason"])


def _label_studio_follow(project_id: int) -> None:
    """A linked Label Studio project gets the new predictions and model_version (its
    least-confident ordering counts only predictions of the project's model_version)."""
    if not settings.LABEL_STUDIO_URL or not Project.objects.filter(
            pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    from annotator.tasks import label_studio_push

    transaction.on_commit(lambda: label_studio_push.delay(project_id))


def evaluate(model: ModelVersion, *, predict: Predictor, classes: list[int],
             uncalibrated: Predictor | None = None):
    """Score the eval split; store an Evaluation with the per-class report (and the ECE
    before temperature scaling when an uncalibrated predictor is given)."""
    from ml_backend.metrics.reports import classification_report, expected_calibration_error

    scans, class_ids = training_labels(model.project, split="eval")
    keep = [(s, classes.index(c)) for s, c in zip(scans, class_ids) if c in classes]
    if not keep:
        return None
    scans = [s for s, _ in keep]
    labels = np.array([y for _, y in keep])
    proba = predict(scans)
    names = [c["name"] for c in model.config["classes"]]
    datasets = dict(Scan.objects.filter(pk__in=[s.pk for s in scans])
                    .values_list("pk", "dataset__name"))
    groups = np.array([datasets[s.pk] for s in scans])
    report = classification_report(labels, proba, names, groups=groups)
    if uncalibrated is not None:
        report["ece_before_scaling"] = float(expected_calibration_error(labels, uncalibrated(scans)))
        report["temperature"] = model.config.get("temperature")
    return Evaluation.objects.create(
        model_version=model, num_labels=model.num_labels, num_eval=len(scans),
        accuracy=report.get("accuracy"), macro_f1=report.get("macro_f1"),
        macro_auc=report.get("macro_auc"), cohen_kappa=report.get("cohen_kappa"),
        ece=report.get("ece"), report=report)


def gate(model: ModelVersion, evaluation: Evaluation | None) -> tuple[bool, str]:
    """Promote only if no class's F1 drops by more than the project's tolerance."""
    project = model.project
    active = project.active_model
    if active is None:
        return True, "first classifier: promoted"
    if evaluation is None:
        return False, "not promoted: the project has no labeled eval scans to compare on"
    previous = active.evaluations.order_by("-created_at").first()
    if previous is None:
        return True, f"promoted: {active.version} has no evaluation to compare with"
    tolerance = project.gate_tolerance
    drops = []
    for name, stats in previous.report.get("per_class", {}).items():
        new = evaluation.report.get("per_class", {}).get(name)
        if new is None or stats.get("f1") is None or new.get("f1") is None:
            continue
        if new["f1"] < stats["f1"] - tolerance:
            drops.append(f"{name} F1 {stats['f1']:.3f} → {new['f1']:.3f}")
    if drops:
        return False, (f"not promoted: F1 dropped by more than {tolerance:.2f} against "
                       f"{active.version} for " + "; ".join(drops))
    return True, f"promoted: no class F1 dropped by more than {tolerance:.2f} against {active.version}"


def predictions_refresh(model: ModelVersion, *, predict: Predictor | None = None,
                        classes: list[int] | None = None) -> int:
    """Store the model's class probabilities for every pool scan (one row per scan)."""
    predict = predict or predictor_for(model)
    classes = classes or [c["id"] for c in model.config["classes"]]
    scans = list(Scan.objects.filter(project=model.project, split="pool").order_by("pk"))
    if not scans:
        return 0
    proba = predict(scans)
    rows = []
    for scan, p in zip(scans, proba):
        best = int(p.argmax())
        rows.append(Prediction(
            scan=scan, model_version=model, predicted_class_id=classes[best],
            probabilities={str(c): round(float(v), 6) for c, v in zip(classes, p)},
            confidence=float(p[best]), uncertainty=float(1.0 - p[best])))
    with transaction.atomic():
        Prediction.objects.filter(model_version=model).delete()
        Prediction.objects.bulk_create(rows, batch_size=500)
    return len(rows)


# --- query rounds ----------------------------------------------------------------------


def query_round_create(*, project: Project, n: int | None = None, strategy: str | None = None,
                       created_by=None, neighbours: int = 3) -> QueryRound:
    """Choose the next scans to label: unlabeled pool scans only (never eval), ranked by the
    strategy, each with its score and reason (uncertainty, cluster, nearest labeled scans)."""
    from ml_backend.active.strategies import QueryContext, query

    project = Project.objects.select_related("active_model", "active_encoder").get(pk=project.pk)
    strategy = strategy or project.query_strategy
    n = n or project.query_batch_size
    labeled_ids = set(Annotation.objects.filter(
        scan__project=project, outcome=Annotation.Outcome.LABEL).values_list("scan_id", flat=True))
    candidates = [s for s in Scan.objects.filter(project=project, split="pool",
                                                 quarantined=False).order_by("pk")
                  if s.pk not in labeled_ids]
    model, encoder = project.active_model, project.active_encoder
    proba, class_names = None, []
    if model is not None:
        classes = [c["id"] for c in model.config["classes"]]
        class_names = [c["name"] for c in model.config["classes"]]
        stored = dict(Prediction.objects.filter(model_version=model, scan__in=candidates)
                      .values_list("scan_id", "probabilities"))
        if candidates and len(stored) == len(candidates):
            proba = np.array([[stored[s.pk][str(c)] for c in classes] for s in candidates])
    embeddings = labeled = None
    if encoder is not None and embeddings_paths(encoder)["ids"].exists():
        try:
            embeddings = _vectors_for(encoder, candidates)
            labeled_scans = list(Scan.objects.filter(pk__in=labeled_ids).order_by("pk"))
            labeled = _vectors_for(encoder, labeled_scans) if labeled_scans else None
        except TrainingError:
            embeddings = labeled = None  # some scans not embedded yet: uncertainty only
    context = QueryContext(proba=proba, embeddings=embeddings, labeled_embeddings=labeled,
                           groups=np.array([s.patient_key for s in candidates]),
                           class_names=class_names)
    selection = query(strategy, context, n) if candidates else None
    with transaction.atomic():
        query_round = QueryRound.objects.create(
            project=project, model_version=model, strategy=strategy, created_by=created_by,
            size=0 if selection is None else len(selection.indices))
        items = []
        if selection is not None:
            for rank, (index, score, reason) in enumerate(
                    zip(selection.indices, selection.scores, selection.reasons), start=1):
                scan = candidates[int(index)]
                reason = dict(reason)
                if labeled_ids and encoder is not None and neighbours:
                    reason["neighbours"] = _labeled_neighbours(scan, neighbours)
                items.append(QueryItem(query_round=query_round, scan=scan, rank=rank,
                                       score=float(score), reason=reason))
        QueryItem.objects.bulk_create(items)
    return query_round


def _labeled_neighbours(scan: Scan, k: int) -> list[dict]:
    try:
        hits = similar_scans(scan=scan, k=k, labeled_only=True)
    except TrainingError:
        return []
    labels = {}
    for scan_id, name in (Annotation.objects.filter(scan_id__in=[s.pk for s, _ in hits],
                                                    outcome=Annotation.Outcome.LABEL)
                          .values_list("scan_id", "label_class__name")):
        labels.setdefault(scan_id, name)
    return [{"scan": s.pk, "label": labels.get(s.pk), "similarity": round(score, 4)}
            for s, score in hits]


def model_artifacts_remove(model: ModelVersion) -> None:
    """Delete a version's files (used by admins cleaning up failed versions)."""
    if model.artifact_dir and Path(model.artifact_dir).is_dir():
        shutil.rmtree(model.artifact_dir)


# --- scheduled retrain -----------------------------------------------------------------


class RetrainSkipped(Exception):
    """A retrain was not started (one is running, or too few new labels); the message says why."""


def runs_abandon_expired(*, project: Project | None = None) -> int:
    """Mark running runs whose worker lease expired (a killed worker) as abandoned."""
    runs = TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING,
                                      lease_expires_at__lt=timezone.now())
    if project is not None:
        runs = runs.filter(project=project)
    count = 0
    for run in runs:
        run.status = TrainingRun.Status.ABANDONED
        run.last_error = (f"worker {run.claimed_by or '?'} stopped renewing its lease "
                          f"(expired {run.lease_expires_at:%Y-%m-%d %H:%M:%S})")
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "last_error", "finished_at"])
        if run.model_version_id:
            ModelVersion.objects.filter(pk=run.model_version_id).exclude(
                status=ModelVersion.Status.ACTIVE).update(status=ModelVersion.Status.FAILED,
                                                         status_reason=run.last_error)
        count += 1
    return count


def retrain_start(*, project: Project, if_new_labels: int = 0, params: dict | None = None,
                  enqueue: bool = False) -> TrainingRun:
    """Create a retrain run unless one is queued or running (a lock on the project row makes
    two cron invocations agree), or fewer than ``if_new_labels`` labels arrived since the last
    successful retrain. Raises RetrainSkipped with the reason."""
    runs_abandon_expired(project=project)
    with transaction.atomic():
        Project.objects.select_for_update().get(pk=project.pk)
        busy = TrainingRun.objects.filter(
            project=project, kind=TrainingRun.Kind.RETRAIN,
            status__in=[TrainingRun.Status.QUEUED, TrainingRun.Status.RUNNING]).first()
        if busy is not None:
            raise RetrainSkipped(f"retrain run #{busy.pk} is already {busy.status} "
                                 f"(since {busy.started_at or busy.created_at:%Y-%m-%d %H:%M})")
        if if_new_labels:
            last = TrainingRun.objects.filter(project=project, kind=TrainingRun.Kind.RETRAIN,
                                              status=TrainingRun.Status.SUCCEEDED
                                              ).order_by("-created_at").first()
            labels = Annotation.objects.filter(scan__project=project, scan__split="pool",
                                               outcome=Annotation.Outcome.LABEL)
            if last is not None:
                labels = labels.filter(created_at__gt=last.created_at)
            if labels.count() < if_new_labels:
                raise RetrainSkipped(f"{labels.count()} new labels since the last retrain; "
                                     f"waiting for {if_new_labels}")
        return training_run_create(project=project, kind=TrainingRun.Kind.RETRAIN,
                                   params=params or {}, enqueue=enqueue)


# --- new classes and label quality ----------------------------------------------------


def class_candidates(*, label_class: LabelClass, k: int = 20) -> dict[str, list[dict]]:
    """Scans to show a clinician for a new class: FAISS neighbours of its first examples
    among unlabeled pool scans, and novelty candidates (far from every labeled scan)."""
    project = label_class.project
    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    paths = embeddings_paths(encoder)
    ids = np.load(paths["ids"])
    vectors = np.load(paths["vectors"])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    labeled = set(Annotation.objects.filter(scan__project=project,
                                            outcome=Annotation.Outcome.LABEL)
                  .values_list("scan_id", flat=True))
    pool = set(Scan.objects.filter(project=project, split="pool").values_list("pk", flat=True))
    unlabeled = np.array([i for i, scan_id in enumerate(ids) if scan_id in pool - labeled])
    examples = set(Annotation.objects.filter(label_class=label_class,
                                             outcome=Annotation.Outcome.LABEL)
                   .values_list("scan_id", flat=True))
    example_rows = np.array([i for i, scan_id in enumerate(ids) if scan_id in examples])
    labeled_rows = np.array([i for i, scan_id in enumerate(ids) if scan_id in labeled])
    result = {"neighbours": [], "novel": []}
    if len(unlabeled) == 0:
        return result
    if len(example_rows):
        similarity = unit[unlabeled] @ unit[example_rows].T          # (U, E)
        best = similarity.max(axis=1)
        source = example_rows[similarity.argmax(axis=1)]
        for position in np.argsort(-best)[:k]:
            result["neighbours"].append({"scan": int(ids[unlabeled[position]]),
                                         "similarity": round(float(best[position]), 4),
                                         "like": int(ids[source[position]])})
    if len(labeled_rows):
        nearest = (unit[unlabeled] @ unit[labeled_rows].T).max(axis=1)
        for position in np.argsort(nearest)[:k]:
            result["novel"].append({"scan": int(ids[unlabeled[position]]),
                                    "nearest_labeled_similarity": round(float(nearest[position]), 4)})
    return result


def label_quality_check(*, project: Project, created_by=None) -> QueryRound:
    """Flag likely label errors among pool labels and queue them for re-review as a round."""
    from ml_backend.active.quality import find_label_issues, out_of_fold_proba

    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    scans, class_ids = training_labels(project, split="pool")
    if len(set(class_ids)) < 2:
        raise TrainingError("a label-quality check needs labels of at least 2 classes")
    labels = np.array(class_ids)
    try:
        proba, classes = out_of_fold_proba(_vectors_for(encoder, scans), labels)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    y = np.searchsorted(classes, labels)
    names = dict(LabelClass.objects.filter(pk__in=classes.tolist()).values_list("pk", "name"))
    issues = find_label_issues(proba, y)
    with transaction.atomic():
        review = QueryRound.objects.create(project=project, model_version=project.active_model,
                                           strategy="label_review", size=len(issues),
                                           created_by=created_by)
        QueryItem.objects.bulk_create([
            QueryItem(query_round=review, scan=scans[issue["index"]], rank=rank,
                      score=1.0 - issue["self_confidence"],
                      reason={"why": "likely label error",
                              "given": names[int(classes[issue["given"]])],
                              "suggested": names[int(classes[issue["suggested"]])],
                              "self_confidence": round(issue["self_confidence"], 4),
                              "suggested_confidence": round(issue["suggested_confidence"], 4)})
            for rank, issue in enumerate(issues, start=1)])
    return review


# --- one scan at a time: Grad-CAM and classifying an uploaded image (the clinician UI) ---

_MODEL_CACHE: dict[str, tuple[float, object]] = {}
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 6


def _cached_load(path: Path, load):
    """Load a checkpoint once per process (re-read when the file changes)."""
    key, mtime = str(path), path.stat().st_mtime
    with _MODEL_CACHE_LOCK:
        hit = _MODEL_CACHE.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    value = load(path)
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE[key] = (mtime, value)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return value


class _Explainer:
    """What one classifier version needs to score and explain single images."""

    def __init__(self, model: ModelVersion):
        from ml_backend.explain import head_score

        self.class_ids = [c["id"] for c in model.config["classes"]]
        if model.config.get("kind") == "head":
            from ml_backend.active.refit import LinearHead

            self.head = _cached_load(_checkpoint(model, "head.npz"), LinearHead.load)
            simclr, self.config = _cached_load(_checkpoint(model.parent, "encoder.pt"),
                                               ssl.load_pretrained)
            self.encoder = simclr.encoder
            self.score = head_score(self.head.mean, self.head.scale, self.head.coef,
                                    self.head.intercept)
        else:
            self.head = None
            classifier, self.config = _cached_load(_checkpoint(model, "classifier.pt"),
                                                   ssl.load_classifier)
            self.classifier = classifier
            self.encoder = classifier.encoder
            self.score = lambda pooled: classifier.fc(
                classifier.head(pooled, upto=classifier.from_head_layer))

    def proba(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, exactly as the stored predictions are computed."""
        if self.head is not None:
            return self.head.predict_proba(ssl.embed(self.encoder, images, self.config))
        return ssl.predict_proba(self.classifier, images, self.config)

    def cam(self, image: np.ndarray, class_id: int) -> np.ndarray:
        from ml_backend.explain import gradcam

        if class_id not in self.class_ids:
            raise TrainingError(f"class {class_id} is not one this model predicts")
        return gradcam(self.encoder, image, self.config.augment_config(), self.score,
                       self.class_ids.index(class_id))


def scan_gradcam(*, scan: Scan, class_id: int, model: ModelVersion | None = None) -> bytes:
    """An RGBA overlay PNG (the preview's size) of where ``model`` sees ``class_id`` in
    ``scan``. Raises TrainingError when there is no model or the class is not one of its."""
    from PIL import Image

    from ml_backend.explain import overlay_png

    model = model or scan.project.active_model
    if model is None:
        raise TrainingError("no classifier yet: label some scans first")
    explainer = _Explainer(model)
    image = _images_for([scan], explainer.config.image_size)[0]
    with Image.open(media_path(scan.preview.name)) as preview:
        width, height = preview.size
    return overlay_png(explainer.cam(image, class_id), width, height)


def classify_image(*, project: Project, preview_png: bytes, k: int = 6) -> dict:
    """Score one decoded image (its display PNG) with the project's active classifier:
    probability for every class, the Grad-CAM overlay of the predicted class, and the
    ``k`` most similar labeled scans (FAISS, active encoder). Nothing is stored."""
    from PIL import Image

    from ml_backend.explain import overlay_png

    project = Project.objects.select_related("active_model", "active_encoder").get(pk=project.pk)
    model = project.active_model
    if model is None:
        raise TrainingError("this project has no classifier yet: label some scans first")
    explainer = _Explainer(model)
    image = load_images([preview_png], explainer.config.image_size)
    proba = explainer.proba(image)[0]
    names = {c["id"]: c["name"] for c in model.config["classes"]}
    ranked = sorted(zip(explainer.class_ids, proba.tolist()), key=lambda kv: -kv[1])
    best = ranked[0][0]
    with Image.open(io.BytesIO(preview_png)) as preview:
        width, height = preview.size
    overlay = overlay_png(explainer.cam(image[0], best), width, height)
    similar = []
    encoder = project.active_encoder
    if encoder is not None and embeddings_paths(encoder)["index"].exists():
        simclr, config = _cached_load(_checkpoint(encoder, "encoder.pt"), ssl.load_pretrained)
        vector = ssl.embed(simclr.encoder, load_images([preview_png], config.image_size), config)
        labeled = list(Annotation.objects.filter(
            scan__project=project, outcome=Annotation.Outcome.LABEL)
            .values_list("scan_id", flat=True).distinct())
        if labeled:
            hits = _load_index(embeddings_paths(encoder)["index"]).search(
                vector, k, allowed_ids=labeled)[0]
            by_id = Scan.objects.in_bulk([scan_id for scan_id, _ in hits])
            label_names: dict[int, str] = {}
            for scan_id, name in (Annotation.objects.filter(
                    scan_id__in=list(by_id), outcome=Annotation.Outcome.LABEL)
                    .order_by("-created_at").values_list("scan_id", "label_class__name")):
                label_names.setdefault(scan_id, name)
            similar = [{"scan": by_id[i], "similarity": float(s), "label": label_names.get(i)}
                       for i, s in hits if i in by_id and not by_id[i].quarantined]
    return {"model": model, "predicted": {"class_id": best, "name": names[best],
                                          "confidence": float(ranked[0][1])},
            "probabilities": [{"class_id": cid, "name": names[cid], "p": float(p)}
                              for cid, p in ranked],
            "overlay_png": overlay, "similar": similar,
            "calibrated": model.config.get("kind") == "head"}
