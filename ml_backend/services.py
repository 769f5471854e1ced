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
from django.db.models import Count
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
        from ml_backend import dispatch

        transaction.on_commit(lambda: dispatch.enqueue_training_run(run.pk))
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


def model_version_promote(model: ModelVersion, *, actor, reason: str = "",
                          rolled_back_from: ModelVersion | None = None) -> str | None:
    """An admin makes a classifier active by hand ("promote anyway", roll back): the same
    consequences as a promotion by the gate — its predictions for the pool, the next
    worklist round and Label Studio follow. Returns a warning in words when the version is
    active but its pool predictions could not be refreshed."""
    if model.status in (ModelVersion.Status.FAILED, ModelVersion.Status.TRAINING):
        raise TrainingError(f"{model.version} is {model.status}: it cannot be made active")
    model_version_activate(model, reason=reason or f"promoted by {actor} (bypassing the gate)",
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
        _label_studio_follow(model.project_id)
    return None


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


NOVELTY_K = 5
NOVELTY_REFERENCE_MAX = 5000
_NOVELTY_CACHE: dict[tuple, dict] = {}


def _novelty_reference(encoder: ModelVersion, label_set_id: int, *,
                       exclude_ids=()) -> dict | None:
    """The scans a novelty score is read against: the label set's embedded scans (a seeded
    sample of at most NOVELTY_REFERENCE_MAX), their vectors and their leave-one-out mean
    cosine distances to their k nearest within that reference. Distances of new scans are
    measured against the same reference, so both sides of the comparison match. Cached per
    embeddings file and set membership; ``exclude_ids`` (e.g. the scans of the import being
    checked) gives an uncached reference without them."""
    from ml_backend.index.novelty import knn_distances

    paths = embeddings_paths(encoder)
    if not paths["ids"].exists():
        return None
    members = Scan.objects.filter(project_id=encoder.project_id, label_set_id=label_set_id)
    if exclude_ids:
        members = members.exclude(pk__in=list(exclude_ids))
    member_ids = set(members.values_list("pk", flat=True))
    key = (str(paths["ids"]), paths["ids"].stat().st_mtime_ns, label_set_id, len(member_ids),
           max(member_ids, default=0))
    if not exclude_ids and key in _NOVELTY_CACHE:
        return _NOVELTY_CACHE[key]
    ids = np.load(paths["ids"])
    rows = np.flatnonzero([int(i) in member_ids for i in ids])
    if len(rows) < 2:
        return None
    if len(rows) > NOVELTY_REFERENCE_MAX:
        rows = np.sort(np.random.default_rng(0).choice(rows, NOVELTY_REFERENCE_MAX,
                                                       replace=False))
    vectors = np.asarray(np.load(paths["vectors"], mmap_mode="r")[rows], np.float32)
    reference = {"ids": ids[rows], "vectors": vectors,
                 "distances": np.sort(knn_distances(vectors, NOVELTY_K))}
    if not exclude_ids:
        while len(_NOVELTY_CACHE) >= 16:
            _NOVELTY_CACHE.pop(next(iter(_NOVELTY_CACHE)))
        _NOVELTY_CACHE[key] = reference
    return reference


def _novelty_verdict(distance: float, reference: np.ndarray, percentile_limit: float,
                     set_name: str) -> dict:
    from ml_backend.index.novelty import NoveltyModel

    model = NoveltyModel(reference_distances=np.sort(reference), k=NOVELTY_K)
    percentile = float(model.percentile(np.array([distance]))[0])
    # at or beyond the limit (inclusive: with a few hundred reference scans the limit's own
    # quantile is one of the reference's outliers), and not a trivially small distance
    ood = bool(percentile >= percentile_limit and distance > model.floor)
    words = (f"Unlike the project's {set_name} scans: farther from its nearest scans than "
             f"{percentile:.0f}% of them are from theirs. The model has not seen scans like "
             "this; do not trust its suggestion." if ood else
             f"Typical of the project's {set_name} scans ({percentile:.0f}th percentile of "
             "distance to the nearest scans).")
    return {"distance": round(float(distance), 4), "percentile": round(percentile, 1),
            "ood": ood, "message": words, "reference_size": int(len(reference))}


def novelty_of_vectors(encoder: ModelVersion, vectors: np.ndarray, *, label_set,
                       project: Project, exclude_ids=()) -> list[dict | None]:
    """How unlike the project's scans of ``label_set`` each vector is: its mean cosine
    distance to the k nearest of them, as a percentile of those scans' own leave-one-out
    distances (ml_backend/index/novelty.py)."""
    from ml_backend.index.novelty import knn_distances

    reference = _novelty_reference(encoder, label_set.pk, exclude_ids=exclude_ids)
    if reference is None:
        return [None] * len(vectors)
    distances = knn_distances(np.asarray(vectors, np.float32), NOVELTY_K,
                              reference=reference["vectors"], exclude_self=False)
    return [_novelty_verdict(float(d), reference["distances"], project.novelty_percentile,
                             label_set.name) for d in distances]


def import_novelty_check(job) -> dict | None:
    """After an import into a project that has an encoder: embed the new scans and count
    those unlike the scans their label set held before this import (so a whole site of
    mislabeled scans cannot vouch for itself). Returns a summary (None when there is
    nothing to check); the import report shows it."""
    encoder = Project.objects.get(pk=job.project_id).active_encoder
    if encoder is None or not embeddings_paths(encoder)["index"].exists():
        return None
    scans = list(job.scans.select_related("label_set", "project").exclude(label_set=None))
    if not scans:
        return None
    run = training_run_create(project=job.project, kind=TrainingRun.Kind.EMBED,
                              params={"import_job": job.pk})
    training_run_execute(run.pk)
    run.refresh_from_db()
    if run.status != TrainingRun.Status.SUCCEEDED:
        return {"error": f"the new scans could not be embedded: {run.last_error[:300]}"}
    new_ids = [s.pk for s in scans]
    unlike, checked = [], 0
    for label_set in {s.label_set for s in scans}:
        mine = [s for s in scans if s.label_set_id == label_set.pk]
        verdicts = novelty_of_vectors(encoder, _vectors_for(encoder, mine), label_set=label_set,
                                      project=job.project, exclude_ids=new_ids)
        checked += sum(v is not None for v in verdicts)
        unlike += [s.pk for s, v in zip(mine, verdicts) if v and v["ood"]]
    return {"checked": checked, "unlike": len(unlike), "scan_ids": sorted(unlike)[:50],
            "percentile": job.project.novelty_percentile}


def scan_novelty(scan: Scan) -> dict | None:
    """The novelty verdict of an embedded scan among the other scans of its label set (None
    when the project has no encoder or the scan is not embedded yet)."""
    encoder = scan.project.active_encoder
    if encoder is None or scan.label_set_id is None:
        return None
    try:
        reference = _novelty_reference(encoder, scan.label_set_id)
        if reference is None:
            return None
        vector = _vectors_for(encoder, [scan])
    except (TrainingError, OSError):
        return None
    from ml_backend.index.novelty import knn_distances

    others = reference["vectors"][reference["ids"] != scan.pk]
    if len(others) < 1:
        return None
    distance = float(knn_distances(vector, NOVELTY_K, reference=others, exclude_self=False)[0])
    return _novelty_verdict(distance, reference["distances"], scan.project.novelty_percentile,
                            scan.label_set.name)


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
    scans = list(Scan.objects.filter(project=run.project).order_by("pk"))
    old_ids = np.zeros(0, np.int64)
    old_vectors = None
    if not full and paths["ids"].exists() and paths["index"].exists():
        old_ids = np.load(paths["ids"])
        old_vectors = np.load(paths["vectors"], mmap_mode="r")
    known = set(old_ids.tolist())
    todo = [s for s in scans if s.pk not in known]
    if not todo and old_vectors is not None and len(known):
        report.log(f"embedding 0 scans with {encoder.version} ({len(known)} already embedded)")
        return            # nothing new: the vectors and the index stay as they are
    model, config = _cached_load(_checkpoint(encoder, "encoder.pt"), ssl.load_pretrained)
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


def similar_scans(*, scan: Scan, k: int = 8, labeled_only: bool = False,
                  same_label_set: bool = False) -> list[tuple[Scan, float]]:
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
        labeled = Annotation.objects.filter(scan__project=scan.project,
                                            outcome=Annotation.Outcome.LABEL)
        if same_label_set:
            labeled = labeled.filter(scan__label_set_id=scan.label_set_id)
        allowed = list(labeled.values_list("scan_id", flat=True).distinct())
        if not allowed:
            return []
    elif same_label_set:
        allowed = list(Scan.objects.filter(project=scan.project, label_set_id=scan.label_set_id)
                       .values_list("pk", flat=True))
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
    _finish_classifier(run, model, _cnn_predictor(classifier, pconfig, classes), classes,
                       len(labels), metrics, report, calibrate=True)


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
    _finish_classifier(run, model, _cnn_predictor(student, pconfig, classes), classes,
                       len(labels), metrics, report, calibrate=True)


Predictor = Callable[[list[Scan]], np.ndarray]


def _allowed_classes(scans: list[Scan], classes: list[int]) -> list[set[int]]:
    """For each scan, the model's classes that apply to it (its label set's)."""
    class_set = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "label_set_id"))
    return [{c for c in classes if class_set.get(c) == s.label_set_id} for s in scans]


def _cnn_predictor(classifier, pconfig, classes: list[int], temperature: float = 1.0
                   ) -> Predictor:
    """A network with one softmax over every class, restricted to each scan's label set."""
    from ml_backend.active.refit import restrict_to_sets

    def predict(scans: list[Scan], *, calibrated: bool = True) -> np.ndarray:
        proba = ssl.predict_proba(classifier, _images_for(scans, pconfig.image_size), pconfig,
                                  temperature=temperature if calibrated else 1.0)
        return restrict_to_sets(proba, classes, _allowed_classes(scans, classes))
    return predict


def version_heads(model: ModelVersion):
    """The per-label-set heads of a 'head' version (a version from before label sets has
    one head for all its classes, in ``head.npz``)."""
    from ml_backend.active.refit import LinearHead, SetHeads

    classes = [c["id"] for c in model.config["classes"]]
    configs = model.config.get("label_sets")
    if configs is None:  # one head, saved before label sets existed
        head = _cached_load(_checkpoint(model, "head.npz"), LinearHead.load)
        set_ids = set(LabelClass.objects.filter(pk__in=classes)
                      .values_list("label_set_id", flat=True))
        return SetHeads(heads={set_id: head for set_id in set_ids}, class_ids=classes)
    return SetHeads(heads={c["id"]: _cached_load(_checkpoint(model, c["head"]), LinearHead.load)
                           for c in configs}, class_ids=classes)


def predictor_for(model: ModelVersion) -> Predictor:
    """Rebuild a classifier version's predict function from its (cached) artifacts."""
    classes = [c["id"] for c in model.config["classes"]]
    if model.config.get("kind") == "head":
        heads, encoder = version_heads(model), model.parent
        return lambda scans, calibrated=True: heads.predict_proba(
            _vectors_for(encoder, scans), [s.label_set_id for s in scans], calibrated=calibrated)
    classifier, pconfig = _cached_load(_checkpoint(model, "classifier.pt"), ssl.load_classifier)
    return _cnn_predictor(classifier, pconfig, classes, model.config.get("temperature") or 1.0)


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


def _class_sets(project: Project) -> dict[int, int]:
    """{class id: label set id} for the project's classes."""
    return dict(LabelClass.objects.filter(project=project).values_list("pk", "label_set_id"))


def _refit(run: TrainingRun, report: _RunReporter) -> None:
    """The fast loop: one calibrated linear head per label set on frozen embeddings
    (seconds). A set with labels of fewer than two classes gets no head yet."""
    from ml_backend.active.refit import SetHeads, fit_head

    started = time.perf_counter()
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    _embed_with(run, encoder, report, full=False)          # new scans since the last embed
    scans, class_ids = training_labels(run.project, split="pool")
    class_set = _class_sets(run.project)
    sets = {s.pk: s for s in run.project.label_sets.all()}
    by_set: dict[int, list[int]] = {}
    for row, class_id in enumerate(class_ids):
        by_set.setdefault(class_set[class_id], []).append(row)
    vectors = _vectors_for(encoder, scans) if scans else None
    heads, set_configs, skipped = {}, [], []
    for set_id in sorted(by_set):
        rows = by_set[set_id]
        labels = np.array([class_ids[r] for r in rows])
        if len(set(labels.tolist())) < 2:
            skipped.append(f"{sets[set_id].name}: labels of 1 class so far")
            continue
        head, info = fit_head(vectors[rows], labels, seed=run.params.get("seed", 0))
        heads[set_id] = head
        set_configs.append({"id": set_id, "name": sets[set_id].name,
                            "classes": [int(c) for c in head.class_ids],
                            "head": f"head-{set_id}.npz", "num_labels": len(rows),
                            "temperature": info["temperature"],
                            "calibrated_on": info["calibrated_on"]})
    if not heads:
        raise TrainingError(f"a refit needs labeled pool scans of at least 2 classes in one "
                            f"label set (have {len(scans)} labels; "
                            + "; ".join(skipped or ["no labels yet"]) + ")")
    classes = [c for config in set_configs for c in config["classes"]]
    names = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "name"))
    model = _new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        "kind": "head", "label_sets": set_configs,
        "classes": [{"id": c, "name": names[c], "label_set": class_set[c]} for c in classes],
        "temperature": set_configs[0]["temperature"] if len(set_configs) == 1 else None,
        "calibrated_on": sum(c["calibrated_on"] for c in set_configs)})
    for set_id, head in heads.items():
        head.save(_checkpoint(model, f"head-{set_id}.npz"))
    report.log(f"refit {model.version}: linear heads on {encoder.version} embeddings, "
               f"{len(scans)} labels; " + "; ".join(
                   f"{c['name']}: {len(c['classes'])} classes, T={c['temperature']:.2f}"
                   for c in set_configs) + ("; skipped " + "; ".join(skipped) if skipped else ""))
    multi = SetHeads(heads=heads, class_ids=classes)

    def predict(scans: list[Scan], *, calibrated: bool = True) -> np.ndarray:
        return multi.predict_proba(_vectors_for(encoder, scans),
                                   [s.label_set_id for s in scans], calibrated=calibrated)

    _finish_classifier(run, model, predict, classes, len(scans),
                       {"fit": set_configs, "skipped_sets": skipped}, report,
                       uncalibrated=lambda scans: predict(scans, calibrated=False))
    if run.params.get("query", True) and model.status == ModelVersion.Status.ACTIVE:
        query_round = query_round_create(project=run.project)
        report.log(f"query round {query_round.pk}: {query_round.size} scans "
                   f"({query_round.strategy})")
    report.log(f"refit took {time.perf_counter() - started:.1f}s")


def _finish_classifier(run, model, predict: Predictor, classes, num_labels, metrics, report, *,
                       uncalibrated: Predictor | None = None, calibrate: bool = False):
    """Evaluate a new classifier on the eval split, compare it with the active one on the
    same scans, and promote it (predictions, next round, Label Studio) or hold it back."""
    model.num_labels = num_labels
    model.metrics = {"training": metrics}
    model.save(update_fields=["num_labels", "metrics"])   # still "training" until gated
    if calibrate:
        predict, uncalibrated = _calibrate_network(model, predict, classes, report)
    evaluation = evaluate(model, predict=predict, classes=classes, uncalibrated=uncalibrated)
    if evaluation is not None:
        report.log(f"eval: accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}"
                   f" on {evaluation.num_eval} scans")
    promoted, reason, comparison = gate(model, evaluation, predict=predict)
    model.metrics = {**model.metrics, "gate": comparison}
    model.status, model.status_reason = ModelVersion.Status.READY, reason
    model.save(update_fields=["metrics", "status", "status_reason"])
    report.log(reason)
    if promoted:
        model_version_activate(model, reason=reason)
        predictions_refresh(model, predict=predict, classes=classes)
        _label_studio_follow(model.project_id)


def _calibrate_network(model: ModelVersion, predict: Predictor, classes: list[int],
                       report) -> tuple[Predictor, Predictor]:
    """Temperature scaling for a fine-tuned or distilled network, as the linear heads get:
    the temperature is fit on the labeled eval split (it changes no predicted class, so
    accuracy, F1 and the gate are unaffected); the ECE reported after scaling is
    cross-fitted (temperature from one half of the eval scans, ECE on the other) so it is
    not measured on the scans the temperature was fit on."""
    from ml_backend.metrics.reports import fit_temperature

    scans, class_ids = training_labels(model.project, split="eval")
    keep = [(s, classes.index(c)) for s, c in zip(scans, class_ids) if c in classes]
    if len(keep) < 8:
        model.config = {**model.config, "temperature": 1.0, "calibrated_on": 0}
        model.save(update_fields=["config"])
        report.log("not calibrated: fewer than 8 labeled eval scans of its classes")
        return predict, predict
    y = np.array([c for _, c in keep])
    raw = predict([s for s, _ in keep], calibrated=False)
    logits = np.log(np.clip(raw, 1e-12, 1.0))
    temperature = float(fit_temperature(logits, y))
    halves = np.random.default_rng(0).permutation(len(y)) % 2
    cross = {}
    for half in (0, 1):
        fit, test = halves != half, halves == half
        t = float(fit_temperature(logits[fit], y[fit])) if len(set(y[fit].tolist())) > 1 else 1.0
        cross[half] = (t, test)
    model.config = {**model.config, "temperature": temperature, "calibrated_on": len(y),
                    "cross_fitted_temperatures": [cross[0][0], cross[1][0]]}
    (Path(model.artifact_dir) / "config.json").write_text(json.dumps(model.config, indent=2,
                                                                     default=str))
    model.save(update_fields=["config"])
    report.log(f"temperature scaling: T={temperature:.2f} on {len(y)} eval scans")
    row_of = {s.pk: i for i, (s, _) in enumerate(keep)}

    def calibrated(scans: list[Scan], *, calibrated: bool = True) -> np.ndarray:
        p = predict(scans, calibrated=False)
        if not calibrated:
            return p
        # eval scans get the temperature fit on the other half (honest ECE); others all
        temps = np.array([cross[halves[row_of[s.pk]]][0] if s.pk in row_of else temperature
                          for s in scans])
        return _scale(p, temps)
    return calibrated, (lambda scans, calibrated=False: predict(scans, calibrated=False))


def _scale(proba: np.ndarray, temperature) -> np.ndarray:
    """Re-temper probabilities: softmax(log p / T) over each row's non-zero classes."""
    proba = np.asarray(proba, dtype=np.float64)
    temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (len(proba),))[:, None]
    with np.errstate(divide="ignore"):
        z = np.where(proba > 0, np.log(np.clip(proba, 1e-300, 1.0)) / temps, -np.inf)
    z -= np.where(np.isfinite(z.max(axis=1, keepdims=True)), z.max(axis=1, keepdims=True), 0)
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0).astype(np.float32)


def _label_studio_follow(project_id: int) -> None:
    """A linked Label Studio project gets the new predictions and model_version (its
    least-confident ordering counts only predictions of the project's model_version)."""
    if not settings.LABEL_STUDIO_URL or not Project.objects.filter(
            pk=project_id, label_studio_project_id__isnull=False).exists():
        return
    from annotator.tasks import label_studio_push

    transaction.on_commit(lambda: label_studio_push.delay(project_id))


def _eval_set(project: Project):
    """The labeled eval scans with a label set: (scans, class ids)."""
    scans, class_ids = training_labels(project, split="eval")
    keep = [(s, c) for s, c in zip(scans, class_ids) if s.label_set_id is not None]
    return [s for s, _ in keep], [c for _, c in keep]


def evaluate(model: ModelVersion, *, predict: Predictor, classes: list[int],
             uncalibrated: Predictor | None = None):
    """Score the model on EVERY labeled eval scan (a class the model does not know yet counts
    as missed, so versions are measured on the same scans and the learning curve is honest);
    store an Evaluation with the per-class report, one report per label set, and the ECE
    before temperature scaling when an uncalibrated predictor is given."""
    from ml_backend.metrics.reports import classification_report, expected_calibration_error

    scans, class_ids = _eval_set(model.project)
    if not scans:
        return None
    all_classes = list(classes) + sorted(set(class_ids) - set(classes))
    names_by_id = dict(LabelClass.objects.filter(pk__in=all_classes).values_list("pk", "name"))
    names = [names_by_id[c] for c in all_classes]
    labels = np.array([all_classes.index(c) for c in class_ids])
    proba = _widen(predict(scans), len(all_classes))
    datasets = dict(Scan.objects.filter(pk__in=[s.pk for s in scans])
                    .values_list("pk", "dataset__name"))
    groups = np.array([datasets[s.pk] for s in scans])
    report = classification_report(labels, proba, names, groups=groups)
    report["known_classes"] = [names_by_id[c] for c in classes]
    report["unknown_classes"] = [names_by_id[c] for c in all_classes[len(classes):]]
    class_set = _class_sets(model.project)
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
    scans, class_ids = _eval_set(project)
    candidate_classes = [c["id"] for c in model.config["classes"]]
    active_classes = [c["id"] for c in active.config["classes"]]
    space = sorted(set(candidate_classes) | set(active_classes))
    keep = [i for i, c in enumerate(class_ids) if c in space]
    if not keep:
        return True, (f"promoted: none of the eval scans is of a class {active.version} or "
                      "this version knows"), {}
    scans = [scans[i] for i in keep]
    y = np.array([space.index(class_ids[i]) for i in keep])
    try:
        active_proba = predictor_for(active)(scans)
    except (TrainingError, OSError, ValueError) as exc:
        return True, (f"promoted: the active model {active.version} cannot be scored any more "
                      f"({exc})"), {}
    predict = predict or predictor_for(model)

    def predicted(proba: np.ndarray, known: list[int]) -> np.ndarray:
        best = np.asarray(proba).argmax(axis=1)
        none = np.asarray(proba).max(axis=1) <= 0            # no head for the scan's set
        return np.where(none, len(space), np.array([space.index(known[b]) for b in best]))

    names_by_id = dict(LabelClass.objects.filter(pk__in=space).values_list("pk", "name"))
    candidate_proba = np.asarray(predict(scans))
    # Forgetting is judged on the classes both know, with the candidate's answer among those
    # classes (a scan the candidate now calls by a new class is that class's business: its
    # recall and precision are reported as newly learned, from the unrestricted answers).
    old = np.array([c in active_classes for c in candidate_classes])
    restricted = np.where(old[None, :], candidate_proba, 0.0)
    arguments = dict(class_names=[names_by_id[c] for c in space] + ["(no prediction)"],
                     candidate_classes={space.index(c) for c in candidate_classes},
                     active_classes={space.index(c) for c in active_classes},
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
    return not comparison["regression"], reason, comparison


def predictions_refresh(model: ModelVersion, *, predict: Predictor | None = None,
                        classes: list[int] | None = None) -> int:
    """Store the model's class probabilities for every pool scan it can score (one row per
    scan, over the classes of the scan's label set)."""
    predict = predict or predictor_for(model)
    classes = classes or [c["id"] for c in model.config["classes"]]
    scans = list(Scan.objects.filter(project=model.project, split="pool").order_by("pk"))
    if not scans:
        return 0
    allowed = _allowed_classes(scans, classes)
    rows = []
    for start in range(0, len(scans), 4096):
        chunk = scans[start:start + 4096]
        proba = predict(chunk)
        for offset, (scan, p) in enumerate(zip(chunk, proba)):
            mine = allowed[start + offset]
            if not mine or float(p.max()) <= 0:
                continue                       # no head for this scan's label set yet
            best = int(p.argmax())
            rows.append(Prediction(
                scan=scan, model_version=model, predicted_class_id=classes[best],
                probabilities={str(c): round(float(v), 6) for c, v in zip(classes, p)
                               if c in mine},
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
    # a scan can only be labeled with its label set's classes: none, nothing to ask
    sets_with_classes = set(LabelClass.objects.filter(project=project)
                            .values_list("label_set_id", flat=True))
    candidates = [s for s in candidates if s.label_set_id is not None and (
        s.label_set_id in sets_with_classes or not sets_with_classes)]
    model, encoder = project.active_model, project.active_encoder
    proba, class_names = None, []
    if model is not None:
        classes = [c["id"] for c in model.config["classes"]]
        class_names = [c["name"] for c in model.config["classes"]]
        stored = dict(Prediction.objects.filter(model_version=model, scan__in=candidates)
                      .values_list("scan_id", "probabilities"))
        if candidates and stored:
            # a scan the model cannot score yet (its set has no head) is maximally uncertain
            uniform = np.full(len(classes), 1.0 / len(classes))
            # a class of the scan's set keeps a non-zero column even when its stored
            # probability rounded to 0 (the strategies count a row's classes by them)
            proba = np.array([[max(stored[s.pk][str(c)], 1e-9) if str(c) in stored[s.pk]
                               else 0.0 for c in classes]
                              if s.pk in stored else uniform for s in candidates])
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
    selection = _query_per_label_set(strategy, context, n, candidates) if candidates else None
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


def _query_per_label_set(strategy: str, context, n: int, candidates: list[Scan]):
    """One strategy run per label set, each given a share of the round in proportion to its
    number of classes (at least one pick each), interleaved by rank: with several label sets
    how many labels each anatomy gets is a decision, not a side effect of the score (an easy
    2-class set would otherwise take the round from a hard 4-class one, or the reverse).
    With one set this is exactly ``query(strategy, context, n)``."""
    from dataclasses import replace

    from ml_backend.active.strategies import Selection, query

    set_ids = np.array([s.label_set_id for s in candidates])
    present = sorted(set(set_ids.tolist()))
    if len(present) < 2:
        return query(strategy, context, n)
    weight = dict(LabelClass.objects.filter(label_set_id__in=present).values("label_set_id")
                  .annotate(k=Count("pk")).values_list("label_set_id", "k"))
    weights = np.array([max(weight.get(i, 0), 1) for i in present], dtype=float)
    available = np.array([(set_ids == i).sum() for i in present])
    shares = np.minimum(np.maximum(1, np.floor(n * weights / weights.sum())).astype(int),
                        available)
    while shares.sum() < min(n, available.sum()):        # hand out what rounding left
        room = np.flatnonzero(shares < available)
        shares[room[np.argmax(weights[room] / (shares[room] + 1))]] += 1
    picks = []
    for set_id, share in zip(present, shares):
        rows = np.flatnonzero(set_ids == set_id)
        sub = replace(context,
                      proba=None if context.proba is None else context.proba[rows],
                      embeddings=None if context.embeddings is None else context.embeddings[rows],
                      groups=None if context.groups is None else context.groups[rows])
        chosen = query(strategy, sub, int(share))
        picks.append([(int(rows[i]), float(score), reason) for i, score, reason in
                      zip(chosen.indices, chosen.scores, chosen.reasons)])
    merged = [pick for position in range(max(map(len, picks)))
              for per_set in picks if position < len(per_set) for pick in [per_set[position]]]
    return Selection(indices=np.array([p[0] for p in merged], dtype=np.int64),
                     scores=np.array([p[1] for p in merged]), reasons=[p[2] for p in merged])


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
    """Scans to show a clinician for a class (e.g. one just added): unlabeled pool scans of
    the class's label set only, as FAISS neighbours of its labeled examples, and novelty
    candidates (the set's scans farthest from every labeled scan)."""
    project = label_class.project
    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    paths = embeddings_paths(encoder)
    if not paths["index"].exists():
        raise TrainingError("no embeddings yet: run `manage.py embed`")
    ids = np.load(paths["ids"])
    labeled = set(Annotation.objects.filter(scan__project=project,
                                            outcome=Annotation.Outcome.LABEL)
                  .values_list("scan_id", flat=True))
    in_set = set(Scan.objects.filter(project=project, label_set_id=label_class.label_set_id,
                                     quarantined=False, split="pool")
                 .values_list("pk", flat=True))
    unlabeled = [int(i) for i in ids if int(i) in in_set and int(i) not in labeled]
    result = {"neighbours": [], "novel": []}
    if not unlabeled:
        return result
    index = _load_index(paths["index"])
    vectors = np.load(paths["vectors"], mmap_mode="r")
    row = {int(scan_id): i for i, scan_id in enumerate(ids)}
    examples = [s for s in Annotation.objects.filter(label_class=label_class,
                                                     outcome=Annotation.Outcome.LABEL)
                .values_list("scan_id", flat=True).distinct() if s in row]
    if examples:
        queries = np.asarray(vectors[[row[s] for s in examples]], np.float32)
        best: dict[int, tuple[float, int]] = {}
        for example, hits in zip(examples, index.search(queries, k, allowed_ids=unlabeled)):
            for scan_id, score in hits:
                if scan_id not in best or score > best[scan_id][0]:
                    best[scan_id] = (float(score), example)
        for scan_id, (score, like) in sorted(best.items(), key=lambda kv: -kv[1][0])[:k]:
            result["neighbours"].append({"scan": int(scan_id), "similarity": round(score, 4),
                                         "like": int(like)})
    labeled_in_set = [s for s in Scan.objects.filter(
        pk__in=labeled, label_set_id=label_class.label_set_id).values_list("pk", flat=True)
        if s in row]
    if labeled_in_set:
        from ml_backend.index.novelty import knn_distances

        distance = knn_distances(np.asarray(vectors[[row[s] for s in unlabeled]], np.float32),
                                 1, reference=np.asarray(vectors[[row[s] for s in labeled_in_set]],
                                                         np.float32), exclude_self=False)
        for position in np.argsort(-distance)[:k]:
            result["novel"].append({"scan": unlabeled[position],
                                    "nearest_labeled_similarity":
                                        round(1.0 - float(distance[position]), 4)})
    return result


def label_quality_check(*, project: Project, created_by=None) -> QueryRound:
    """Flag likely label errors among pool labels and queue them for re-review as a round.

    Run per label set, on the classes with at least two labels (a class with fewer cannot be
    cross-validated); ``round.skipped`` lists what was left out and why."""
    from ml_backend.active.quality import find_label_issues, out_of_fold_proba

    encoder = project.active_encoder
    if encoder is None:
        raise TrainingError("no active encoder for this project yet")
    scans, class_ids = training_labels(project, split="pool")
    class_set = _class_sets(project)
    names = dict(LabelClass.objects.filter(project=project).values_list("pk", "name"))
    counts = Counter(class_ids)
    skipped = [f"{names[c]} ({n} label)" for c, n in sorted(counts.items()) if n < 2]
    found, checked_sets = [], 0
    for set_id in sorted(set(class_set.values())):
        rows = [i for i, c in enumerate(class_ids) if class_set[c] == set_id and counts[c] >= 2]
        if len({class_ids[i] for i in rows}) < 2:
            continue
        labels = np.array([class_ids[i] for i in rows])
        try:
            proba, classes = out_of_fold_proba(_vectors_for(encoder, [scans[i] for i in rows]),
                                               labels)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        checked_sets += 1
        for issue in find_label_issues(proba, np.searchsorted(classes, labels)):
            found.append((scans[rows[issue["index"]]], issue,
                          names[int(classes[issue["given"]])],
                          names[int(classes[issue["suggested"]])]))
    if not checked_sets:
        raise TrainingError("a label-quality check needs at least 2 labels in each of 2 classes "
                            "of one label set" + (f" (too few: {', '.join(skipped)})"
                                                  if skipped else ""))
    found.sort(key=lambda row: row[1]["self_confidence"])
    with transaction.atomic():
        review = QueryRound.objects.create(project=project, model_version=project.active_model,
                                           strategy="label_review", size=len(found),
                                           created_by=created_by)
        QueryItem.objects.bulk_create([
            QueryItem(query_round=review, scan=scan, rank=rank,
                      score=1.0 - issue["self_confidence"],
                      reason={"why": "likely label error", "given": given,
                              "suggested": suggested,
                              "self_confidence": round(issue["self_confidence"], 4),
                              "suggested_confidence": round(issue["suggested_confidence"], 4)})
            for rank, (scan, issue, given, suggested) in enumerate(found, start=1)])
    review.skipped = skipped
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
        self.class_ids = [c["id"] for c in model.config["classes"]]
        self.model = model
        if model.config.get("kind") == "head":
            self.heads = version_heads(model)
            simclr, self.config = _cached_load(_checkpoint(model.parent, "encoder.pt"),
                                               ssl.load_pretrained)
            self.encoder = simclr.encoder
        else:
            self.heads = None
            classifier, self.config = _cached_load(_checkpoint(model, "classifier.pt"),
                                                   ssl.load_classifier)
            self.classifier = classifier
            self.encoder = classifier.encoder
            self.temperature = model.config.get("temperature") or 1.0

    def classes_of(self, label_set_id: int) -> list[int]:
        class_set = _class_sets(self.model.project)
        return [c for c in self.class_ids if class_set.get(c) == label_set_id]

    def proba(self, images: np.ndarray, label_set_id: int) -> np.ndarray:
        """Calibrated probabilities over the model's classes, restricted to one label set,
        exactly as the stored predictions are computed."""
        from ml_backend.active.refit import restrict_to_sets

        if self.heads is not None:
            return self.heads.predict_proba(ssl.embed(self.encoder, images, self.config),
                                            [label_set_id] * len(images))
        proba = ssl.predict_proba(self.classifier, images, self.config,
                                  temperature=self.temperature)
        allowed = set(self.classes_of(label_set_id))
        return restrict_to_sets(proba, self.class_ids, [allowed] * len(images))

    def cam(self, image: np.ndarray, class_id: int) -> np.ndarray:
        from ml_backend.explain import gradcam, head_score

        if class_id not in self.class_ids:
            raise TrainingError(f"class {class_id} is not one this model predicts")
        if self.heads is not None:
            head = next((h for h in self.heads.heads.values()
                         if class_id in [int(c) for c in h.class_ids]), None)
            if head is None:
                raise TrainingError(f"class {class_id} has no head in {self.model.version}")
            score = head_score(head.mean, head.scale, head.coef, head.intercept)
            index = [int(c) for c in head.class_ids].index(class_id)
        else:
            classifier = self.classifier
            score = lambda pooled: classifier.fc(  # noqa: E731
                classifier.head(pooled, upto=classifier.from_head_layer))
            index = self.class_ids.index(class_id)
        return gradcam(self.encoder, image, self.config.augment_config(), score, index)


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


def classify_image(*, project: Project, preview_png: bytes, label_set=None, k: int = 6) -> dict:
    """Score one decoded image (its display PNG) with the project's active classifier on the
    classes of ``label_set`` (the project's first set by default): probability for every
    class of the set (0 for one the model has not learned yet), how unlike the project's
    scans of that set it is (novelty), the Grad-CAM overlay of the predicted class, and the
    ``k`` most similar labeled scans of the set. Nothing is stored."""
    from PIL import Image

    from annotator.models import LabelSet
    from ml_backend.explain import overlay_png

    project = Project.objects.select_related("active_model", "active_encoder").get(pk=project.pk)
    label_set = label_set or project.label_sets.order_by("order", "pk").first()
    model = project.active_model
    if model is None:
        raise TrainingError("this project has no classifier yet: label some scans first")
    if not isinstance(label_set, LabelSet) or label_set.project_id != project.pk:
        raise TrainingError("choose one of this project's label sets")
    explainer = _Explainer(model)
    set_classes = list(label_set.classes.order_by("order", "name"))
    known = set(explainer.classes_of(label_set.pk))
    if not known:
        raise TrainingError(f"the model has not learned the label set {label_set.name!r} yet: "
                            "label scans of at least two of its classes")
    image = load_images([preview_png], explainer.config.image_size)
    proba = explainer.proba(image, label_set.pk)[0]
    p_of = {cid: float(p) for cid, p in zip(explainer.class_ids, proba.tolist())}
    ranked = sorted(((c.pk, c.name, p_of.get(c.pk, 0.0), c.pk in known) for c in set_classes),
                    key=lambda row: -row[2])
    best_id, best_name, best_p, _ = ranked[0]
    with Image.open(io.BytesIO(preview_png)) as preview:
        width, height = preview.size
    overlay = overlay_png(explainer.cam(image[0], best_id), width, height)
    similar, novelty = [], None
    encoder = project.active_encoder
    if encoder is not None and embeddings_paths(encoder)["index"].exists():
        simclr, config = _cached_load(_checkpoint(encoder, "encoder.pt"), ssl.load_pretrained)
        vector = ssl.embed(simclr.encoder, load_images([preview_png], config.image_size), config)
        novelty = novelty_of_vectors(encoder, vector, label_set=label_set, project=project)[0]
        labeled = list(Annotation.objects.filter(
            scan__project=project, scan__label_set=label_set, outcome=Annotation.Outcome.LABEL)
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
    return {"model": model, "label_set": label_set,
            "predicted": {"class_id": best_id, "name": best_name, "confidence": best_p},
            "probabilities": [{"class_id": cid, "name": name, "p": p, "learned": learned}
                              for cid, name, p, learned in ranked],
            "overlay_png": overlay, "similar": similar, "novelty": novelty,
            "calibrated": bool(model.config.get("temperature")) or model.config.get(
                "kind") == "head"}
