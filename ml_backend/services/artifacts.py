"""Where a model version's files live, and the scans' images as training arrays.

A version owns one folder under ``ARTIFACTS_ROOT/models/<version>/``: ``config.json`` (the
explicit config saved with every checkpoint), its checkpoint(s) or heads, and for an
encoder the embeddings (``embeddings.npy``, ``scan_ids.npy``) and the FAISS index."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from django.conf import settings

from annotator.models import Scan
from annotator.storage import media_path
from ml_backend.data.arrays import load_images
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion, TrainingRun


def checkpoint_path(model: ModelVersion, name: str) -> Path:
    return Path(model.artifact_dir) / name


def embeddings_paths(model: ModelVersion) -> dict[str, Path]:
    base = Path(model.artifact_dir)
    return {"vectors": base / "embeddings.npy", "ids": base / "scan_ids.npy",
            "index": base / "index.faiss",
            # each scan's thumbnail (float32, ``features.PIXEL_SIDE`` squared x channels), the
            # same rows as the vectors: what a refit head reads beside them
            "thumbs": base / "thumbs.npy",
            # vectors computed elsewhere (an import chunk on any worker) for the next embed
            # to merge: ``<name>.npz`` with ``ids`` and ``vectors``
            "parts": base / "parts"}


def images_for(scans: list[Scan], size: int, channels: int = 1) -> np.ndarray:
    """The scans' display previews at ``size`` with ``channels`` (1: greyscale ``(N, S, S)``,
    3: RGB ``(N, S, S, 3)``; see ml_backend/data/arrays.py)."""
    missing = [s.pk for s in scans if not media_path(s.preview.name).exists()]
    if missing:
        raise TrainingError(f"preview files missing for scans {missing[:10]}; re-import them")
    return load_images([media_path(s.preview.name) for s in scans], size, channels)


def hflip_mask(scans: list[Scan]) -> np.ndarray:
    return np.array([s.dataset.hflip_allowed for s in scans], dtype=bool)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Whole or not at all; a write that fails (a full disk) leaves no partial temp file to
    keep the disk full, and says why in words."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"could not write {path.name} to the model storage: "
                            f"{exc.strerror or exc}") from None


def model_artifacts_remove(model: ModelVersion) -> None:
    """Delete a version's files (used by admins cleaning up failed versions)."""
    if model.artifact_dir and Path(model.artifact_dir).is_dir():
        shutil.rmtree(model.artifact_dir)


def new_version(run: TrainingRun, kind: str, *, parent: ModelVersion | None,
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
    if kind == ModelVersion.Kind.ENCODER:
        # the sizes it embeds scans at and the stages it pools, fixed for its life: its
        # vectors and every head fit on them depend on them (inference.encoder_network)
        config = {**config,
                  "embed_scales": config.get("embed_scales", list(settings.EMBED_SCALES)),
                  "embed_layers": config.get("embed_layers", list(settings.EMBED_LAYERS))}
    model = ModelVersion.objects.create(project=run.project, kind=kind, version=version,
                                        parent=parent, artifact_dir=str(directory), config=config)
    run.model_version = model
    run.save(update_fields=["model_version"])
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return model


def model_version_files_problem(model: ModelVersion) -> str | None:
    """Why ``model`` cannot be put in use (None when it can), from its config and the files
    it needs, without loading any of them: an encoder its ``encoder.pt``; a classifier its
    classes (or findings sets) and, by kind, its heads with its encoder's checkpoint, its
    network, its findings heads or networks. A version restored without its files, or a
    record that is not a usable classifier, is refused in words before it is active."""
    if not model.artifact_dir or not Path(model.artifact_dir).is_dir():
        return (f"{model.version} has no files here (its folder {model.artifact_dir or '—'} "
                "is missing): restore them or train a new version")
    missing = []
    config = model.config if isinstance(model.config, dict) else {}
    if model.kind == ModelVersion.Kind.ENCODER:
        if not checkpoint_path(model, "encoder.pt").is_file():
            missing.append("encoder.pt")
    else:
        classes = config.get("classes")
        findings = config.get("findings_sets") or []
        if not isinstance(classes, list) or not isinstance(findings, list) or (
                not classes and not findings):
            return (f"{model.version} is not a usable classifier: its config names no "
                    "classes or findings sets")
        if config.get("kind") == "head":         # heads read its encoder's embeddings
            encoder = model.parent
            if encoder is None or encoder.kind != ModelVersion.Kind.ENCODER:
                return (f"{model.version} is a head on an encoder, but its encoder is gone: "
                        "train a new version")
            if not encoder.artifact_dir or not checkpoint_path(encoder,
                                                               "encoder.pt").is_file():
                missing.append(f"its encoder {encoder.version}'s encoder.pt")
            if classes:
                sets = config.get("label_sets")
                names = (["head.npz"] if sets is None else
                         [entry.get("head", "") if isinstance(entry, dict) else ""
                          for entry in sets])
                missing += [n or "a head" for n in names
                            if not n or not checkpoint_path(model, n).is_file()]
        elif classes and not checkpoint_path(model, "classifier.pt").is_file():
            missing.append("classifier.pt")
        for entry in findings:
            name = (entry.get("net") or entry.get("head")) if isinstance(entry, dict) else None
            if not name or not checkpoint_path(model, name).is_file():
                missing.append(name or "a findings head")
    if missing:
        return (f"{model.version} is missing {', '.join(missing[:5])}: restore its files or "
                "train a new version")
    return None
