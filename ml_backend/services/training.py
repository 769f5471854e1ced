"""The run handlers: pretrain, embed, refit (linear heads), fine-tune, distill.

Each takes a claimed TrainingRun and its reporter; the work itself is the pure core's
(``ml_backend.ssl``, ``ml_backend.active.refit``). A new classifier is evaluated and gated
by ``versions`` before it can become active. torch is imported here (this module runs
models); web requests never import it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from django.conf import settings

from annotator.models import Annotation, LabelClass, Project, Scan
from annotator.selectors import class_label_sets, training_labels
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion, TrainingRun
from ml_backend.services.artifacts import (
    checkpoint_path,
    embeddings_paths,
    hflip_mask,
    images_for,
    new_version,
    save_npy_atomic,
)
from ml_backend.services.inference import (
    Predictor,
    cnn_predictor,
    embedding_table,
    encoder_network,
    head_inputs_for,
)
from ml_backend.services.findings import (
    findings_gate,
    fit_findings_sets,
    save_findings_heads,
)
from ml_backend.services.queries import query_round_create
from ml_backend.services.runs import (
    RunReporter,
    refit_nothing_to_fit,
    refit_refusal,
    retrain_refusal,
)
from ml_backend.services.versions import evaluate, gate, model_version_activate, publish
from ml_backend.ssl import train as ssl

logger = logging.getLogger(__name__)


def _workers() -> int:
    """DataLoader worker processes (settings.ML_DATALOADER_WORKERS; the core reads no
    environment)."""
    return settings.ML_DATALOADER_WORKERS

def starter_encoder(channels: int = 1) -> tuple[Path, dict] | None:
    """The shipped starter encoder and its data card, or None: for a colour project
    (``channels=3``) the colour starter (settings.STARTER_ENCODER_COLOUR) where one is
    shipped, else the greyscale one (settings.STARTER_ENCODER), whose first convolution is
    then spread over the three channels."""
    from ml_backend.ssl.starter import read_card

    candidates = [settings.STARTER_ENCODER]
    if channels == 3:
        candidates.insert(0, getattr(settings, "STARTER_ENCODER_COLOUR", None))
    for candidate in candidates:
        path = Path(candidate) if candidate else None
        card = read_card(path) if path else None
        if card:
            return path, card
    return None


def _starter_for(config, start_from: str, report: RunReporter,
                 channels: int = 1) -> tuple[Path, dict] | None:
    """The starter when ``start_from`` allows it and it fits ``config`` (same architecture
    and stem; the image size may differ). ``start_from="starter"`` insists."""
    if start_from == "scratch":
        return None
    found = starter_encoder(config.channels if config is not None else channels)
    if found is None:
        if start_from == "starter":
            raise TrainingError("no starter encoder is shipped (settings.STARTER_ENCODER): "
                                "build it with `make starter-encoder` or use --from scratch")
        report.log("no starter encoder shipped: pretraining from scratch")
        return None
    path, card = found
    starter_config = ssl.config_from_dict(ssl.PretrainConfig, card["config"])
    if config is None:
        return found
    if (starter_config.arch, starter_config.uses_small_input) != (config.arch,
                                                                 config.uses_small_input):
        why = (f"the starter encoder is a {starter_config.arch} with the "
               f"{'small' if starter_config.uses_small_input else 'standard'} stem; this run asks "
               f"for a {config.arch} with the "
               f"{'small' if config.uses_small_input else 'standard'} stem")
        if start_from == "starter":
            raise TrainingError(f"{why}: use --from scratch")
        report.log(f"{why}: pretraining from scratch")
        return None
    return found


# What a method's head is made of (not run parameters): taken from the starter with its method.
_METHOD_FIELDS = ("method", "momentum", "prototypes", "frozen_prototype_steps", "dino_out_dim",
                  "proj_hidden_dim", "proj_out_dim", "proj_layers")


def _method_to_continue(init, start_from: str, channels: int) -> dict:
    """No method asked for: continuing from the starter continues its method (a DINO starter
    goes on with DINO, its head included); anything else trains SimCLRv2."""
    found = None if init or start_from == "scratch" else starter_encoder(channels)
    if found is None:
        return {"method": "simclr"}
    stored = found[1].get("config") or {}
    return {key: stored[key] for key in _METHOD_FIELDS if key in stored} | {
        "method": stored.get("method", "simclr")}


def _starter_summary(path: Path, card: dict) -> dict:
    return {"file": path.name, "sha256": card.get("file", {}).get("sha256"),
            "built": card.get("built"), "scans": card.get("scans"), "epochs": card.get("epochs")}


def _adopt_starter(run: TrainingRun, report: RunReporter, scans: list[Scan],
                   starter: tuple[Path, dict], activate: bool) -> None:
    """``--epochs 0``: the starter encoder as shipped becomes the project's encoder (no
    training; its scans are embedded)."""
    import shutil

    path, card = starter
    config = ssl.config_from_dict(ssl.PretrainConfig, card["config"])
    channels = run.project.channels
    if channels != config.channels:      # a colour project adopting the greyscale starter
        config = replace(config, channels=channels)
    model = new_version(run, ModelVersion.Kind.ENCODER, parent=None,
                        config={"pretrain": asdict(config), "init_checkpoint": str(path),
                                "start_from": "starter", "starter": _starter_summary(path, card),
                                "num_scans": len(scans)})
    target = checkpoint_path(model, "encoder.pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    if channels != ssl.config_from_dict(ssl.PretrainConfig, card["config"]).channels:
        from ml_backend.ssl.checkpoints import inflate_encoder_checkpoint

        # each colour channel gets a third of the grey filter: a grey scan replicated to RGB
        # gives the starter's features; pretraining on the project's scans learns colour
        inflate_encoder_checkpoint(path, target, channels)
        report.log(f"the greyscale starter's first convolution spread over {channels} "
                   "channels for this colour project; pretrain on its scans to learn colour")
    else:
        tmp = target.with_name(f".tmp-{target.name}")
        try:
            shutil.copyfile(path, tmp)
            tmp.replace(target)
        except OSError as exc:     # a full disk: no partial copy left behind, said in words
            tmp.unlink(missing_ok=True)
            raise TrainingError(f"could not copy the starter encoder into the model storage: "
                                f"{exc.strerror or exc}") from None
    model.metrics = {"pretrain": {"epochs": 0, "history": card.get("history", []),
                                  "note": "the shipped starter encoder, used as is",
                                  "final_loss": card.get("final_loss"), "device": "cpu"}}
    model.status = ModelVersion.Status.READY
    model.save(update_fields=["metrics", "status"])
    report.log(f"{model.version}: the starter encoder as shipped ({card.get('scans')} public "
               f"scans, {card.get('epochs')} epochs, built {card.get('built')}); no training")
    if activate:
        embed_with(run, model, report, full=True)
        model_version_activate(model, reason="starter encoder")


def _pretrain(run: TrainingRun, report: RunReporter) -> None:
    params = dict(run.params)
    init = params.pop("init_checkpoint", None)
    activate = params.pop("activate", True)
    resume_version = params.pop("resume", None)
    start_from = params.pop("start_from", "auto")
    if start_from not in ("auto", "starter", "scratch"):
        raise TrainingError(f"start_from must be auto, starter or scratch, not {start_from!r}")
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
        if not checkpoint_path(model, "encoder.pt").exists():
            raise TrainingError(f"{resume_version} has no checkpoint yet: start a new run")
        config = ssl.config_from_dict(ssl.PretrainConfig, model.config["pretrain"])
        init = None
        model.status = ModelVersion.Status.TRAINING
        model.status_reason = f"resumed by run {run.pk}"
        model.save(update_fields=["status", "status_reason"])
        run.model_version = model
        run.save(update_fields=["model_version"])
    else:
        if params.get("epochs") == 0:
            if init is not None or start_from == "scratch":
                raise TrainingError("--epochs 0 adopts the shipped starter encoder as is; "
                                    "it cannot be combined with --init-checkpoint or --from scratch")
            starter = _starter_for(None, "starter", report, channels=run.project.channels)
            return _adopt_starter(run, report, scans, starter, activate)
        # the project decides greyscale or colour input, not a run parameter
        params["channels"] = run.project.channels
        inferred = params.get("method") is None
        if inferred:
            params.update(_method_to_continue(init, start_from, run.project.channels))
        config = ssl.PretrainConfig(**{k: v for k, v in params.items()
                                       if k in ssl.PretrainConfig.__dataclass_fields__})
        parent = run.project.active_encoder if init == "active" else None
        if init == "active":
            if parent is None:
                raise TrainingError("--init-checkpoint active: the project has no active encoder")
            init = str(checkpoint_path(parent, "encoder.pt"))
        starter = None if init else _starter_for(config, start_from, report)
        if inferred and starter is None and config.method != "simclr":
            # the starter's method was taken for a run that cannot start from it: the default
            config = ssl.PretrainConfig(**{**asdict(config), **{
                key: ssl.PretrainConfig.__dataclass_fields__[key].default
                for key in _METHOD_FIELDS}, "method": "simclr"})
        extra = {}
        if starter is not None:
            init = str(starter[0])
            extra = {"starter": _starter_summary(*starter)}
        model = new_version(run, ModelVersion.Kind.ENCODER, parent=parent,
                             config={"pretrain": asdict(config), "init_checkpoint": init,
                                     "start_from": ("starter" if starter else
                                                    "checkpoint" if init else "scratch"),
                                     "num_scans": len(scans), **extra})
    report.log(f"pretraining {model.version} on {len(scans)} scans: {config.arch}, "
               f"{config.image_size}px, {config.epochs} epochs")
    images = images_for(scans, config.image_size, config.channels)
    metrics = ssl.pretrain(images, config, checkpoint_path=checkpoint_path(model, "encoder.pt"),
                           model_version=model.version, init_checkpoint=init,
                           progress=report, hflip_mask=hflip_mask(scans), workers=_workers())
    model.metrics = {"pretrain": metrics}
    model.status = ModelVersion.Status.READY
    model.save(update_fields=["metrics", "status"])
    report.log(f"final loss {metrics['final_loss']:.4f}; {metrics['note']}".rstrip("; "))
    if activate:
        # Embed before activating: a failure here leaves the previous encoder active.
        embed_with(run, model, report, full=True)
        model_version_activate(model, reason="pretrained")


def _embed(run: TrainingRun, report: RunReporter) -> None:
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    run.params = {**run.params, "encoder": encoder.version}
    run.save(update_fields=["params"])
    embed_with(run, encoder, report, full=bool(run.params.get("full")))


def embed_part(encoder: ModelVersion, scans: list, name: str) -> int:
    """Embed ``scans`` with ``encoder`` into a part file that the next embed of the project
    merges instead of computing them again: each chunk of a large import embeds its own
    scans on its own worker, so the embedding spreads over the workers like the files do.
    Nothing to do before the encoder has embeddings (the first embed builds them all)."""
    from ml_backend.services.inference import embedding_rows, split_rows

    paths = embeddings_paths(encoder)
    if not scans or not paths["ids"].exists():
        return 0
    model, config = encoder_network(encoder)
    vectors, thumbs = split_rows(embedding_rows(
        model, images_for(scans, config.image_size, config.channels), config,
        workers=_workers()), model.encoder.feature_dim)
    paths["parts"].mkdir(exist_ok=True)
    tmp = paths["parts"] / f".tmp-{name}.npz"
    np.savez(tmp, ids=np.array([s.pk for s in scans], np.int64), vectors=vectors,
             thumbs=thumbs)
    os.replace(tmp, paths["parts"] / f"{name}.npz")
    return len(scans)


def _embedded_parts(paths: dict, wanted: set[int]
                    ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[Path]]:
    """``{scan id: (vector, thumbnail)}`` of ``wanted`` scans found in part files, and the
    part files read (a part from before thumbnails is read and computed again)."""
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    read = []
    for part in sorted(paths["parts"].glob("*.npz")) if paths["parts"].is_dir() else []:
        if part.name.startswith(".tmp-"):
            continue
        try:
            with np.load(part) as data:
                if "thumbs" in data.files:
                    for scan_id, vector, thumb in zip(data["ids"].tolist(), data["vectors"],
                                                      data["thumbs"]):
                        if scan_id in wanted:
                            found[scan_id] = (vector, thumb)
        except (OSError, ValueError, KeyError) as exc:   # damaged: computed again instead
            logger.warning("embedding part %s unreadable: %s", part.name, exc)
        read.append(part)
    return found, read


def _thumbs_of(ids: np.ndarray, config) -> np.ndarray:
    """Thumbnails of the scans ``ids`` (in that order) from their previews, a thousand at a
    time; a scan deleted since it was embedded gets zeros (its row is never read)."""
    from ml_backend.active.features import PIXEL_SIDE, thumbnails
    from ml_backend.services.inference import scan_refs

    out = np.zeros((len(ids), PIXEL_SIDE * PIXEL_SIDE * config.channels), np.float32)
    for start in range(0, len(ids), 1000):
        chunk = [int(i) for i in ids[start:start + 1000]]
        refs = {r.pk: r for r in scan_refs(Scan.objects.filter(pk__in=chunk))}
        rows = [k for k, i in enumerate(chunk) if i in refs]
        if rows:
            images = images_for([refs[chunk[k]] for k in rows], config.image_size,
                                config.channels)
            out[start + np.array(rows)] = thumbnails(images, PIXEL_SIDE)
    return out


def embed_with(run: TrainingRun, encoder: ModelVersion, report: RunReporter, *,
               full: bool) -> None:
    """Embed every scan not yet embedded with ``encoder`` (all of them when ``full``) and
    add them to its FAISS index without rebuilding it; each scan's thumbnail is stored with
    its vector (what a refit head reads beside it). Vectors an import chunk already
    computed (``embed_part``) are merged, not computed again. Vectors stored before
    thumbnails existed get theirs from the previews once."""
    from ml_backend.active.features import PIXEL_SIDE
    from ml_backend.index.faiss_index import VectorIndex, build_index
    from ml_backend.services.inference import ScanRef, embedding_rows, scan_refs, split_rows

    paths = embeddings_paths(encoder)
    scans = scan_refs(Scan.objects.filter(project=run.project).order_by("pk"))
    old_ids = np.zeros(0, np.int64)
    old_vectors = old_thumbs = None
    if not full and paths["ids"].exists() and paths["index"].exists():
        old_ids = np.load(paths["ids"])
        old_vectors = np.load(paths["vectors"], mmap_mode="r")
        if paths["thumbs"].exists():
            old_thumbs = np.load(paths["thumbs"], mmap_mode="r")
            if len(old_thumbs) != len(old_ids):
                old_thumbs = None
    known = set(old_ids.tolist())
    todo: list[ScanRef] = [s for s in scans if s.pk not in known]
    if old_vectors is not None and len(known) and old_thumbs is None:   # once per encoder
        report.log(f"thumbnails for the {len(known)} scans embedded before them")
        old_thumbs = _thumbs_of(old_ids, encoder_network(encoder)[1])
        save_npy_atomic(paths["thumbs"], old_thumbs)
        save_npy_atomic(paths["ids"], old_ids)      # written last: readers reload the table
    if not todo and old_vectors is not None and len(known):
        report.log(f"embedding 0 scans with {encoder.version} ({len(known)} already embedded)")
        return            # nothing new: the vectors and the index stay as they are
    model, config = encoder_network(encoder)        # torch and the network: only from here
    ready, parts = _embedded_parts(paths, {s.pk for s in todo}) if not full else ({}, [])
    rest = [s for s in todo if s.pk not in ready]
    report.log(f"embedding {len(rest)} scans with {encoder.version} ({len(known)} already "
               f"embedded" + (f", {len(ready)} by import chunks" if ready else "") + ")")
    started = time.perf_counter()
    dim = model.encoder.feature_dim
    if settings.SPREAD_CHUNK_SIZE and len(rest) > settings.SPREAD_CHUNK_SIZE:
        from ml_backend.services.spread import spread     # every train worker helps

        rows = spread(encoder, "embed", rest, report=report)
    elif rest:
        rows = embedding_rows(model, images_for(rest, config.image_size, config.channels),
                              config, progress=report, workers=_workers())
    else:
        rows = np.zeros((0, dim + PIXEL_SIDE * PIXEL_SIDE * config.channels), np.float32)
    vectors, thumbs = split_rows(rows, dim)
    seconds = time.perf_counter() - started
    if ready:
        vectors = np.concatenate([np.stack([v for v, _ in ready.values()]).astype(np.float32),
                                  vectors])
        thumbs = np.concatenate([np.stack([t for _, t in ready.values()]).astype(np.float32),
                                 thumbs])
    ids = np.array(list(ready) + [s.pk for s in rest], dtype=np.int64)
    if old_vectors is not None and len(known):
        index = VectorIndex.load(paths["index"])
        if len(ids):
            index.add(vectors, ids)
        all_ids, all_vectors = np.concatenate([old_ids, ids]), np.concatenate([old_vectors, vectors])
        all_thumbs = np.concatenate([old_thumbs, thumbs]) if len(ids) else np.asarray(old_thumbs)
    else:
        if not len(ids):
            raise TrainingError("no scans to embed")
        kind = run.params.get("index_kind", "auto")
        index = build_index(vectors, ids, kind=kind)
        all_ids, all_vectors, all_thumbs = ids, vectors, thumbs
    save_npy_atomic(paths["vectors"], all_vectors.astype(np.float32))
    save_npy_atomic(paths["thumbs"], np.asarray(all_thumbs, np.float32))
    save_npy_atomic(paths["ids"], all_ids)
    index.save(paths["index"])
    for part in parts:          # merged: the vectors file holds them now
        part.unlink(missing_ok=True)
    stats = {"embedded": int(len(ids)), "total": int(len(all_ids)), "index_kind": index.kind,
             "from_import_chunks": len(ready),
             "images_per_s": round(len(rest) / seconds, 1) if len(rest) and seconds else None}
    encoder.metrics = {**encoder.metrics, "embeddings": stats}
    encoder.save(update_fields=["metrics"])
    report.log(f"index {index.kind}: {len(all_ids)} vectors")


def _labeled_arrays(project: Project, classes: list[int], size: int, split: str,
                    channels: int = 1):
    scans, class_ids = training_labels(project, split=split)
    keep = [(s, c) for s, c in zip(scans, class_ids) if c in classes]
    if not keep:
        shape = (0, size, size) if channels == 1 else (0, size, size, 3)
        return [], np.zeros(shape, np.uint8), np.zeros(0, np.int64)
    scans = [s for s, _ in keep]
    labels = np.array([classes.index(c) for _, c in keep], dtype=np.int64)
    return scans, images_for(scans, size, channels), labels


def _finetune_findings(run: TrainingRun, report: RunReporter, encoder: ModelVersion) -> None:
    """SimCLRv2 step 2 for a findings set: per-finding sigmoid outputs, masked BCE (the set's
    uncertain-label policy applied), thresholds chosen on the eval split, the findings gate.
    Only in a project whose labels are all findings: the project has one active version, and
    a network version does not carry another set's class heads."""
    from annotator.selectors import findings_targets
    from annotator.models import LabelSet
    from ml_backend.metrics.findings import uncertain_policy
    from ml_backend.ssl.findings import finetune_findings

    label_set = LabelSet.objects.filter(project=run.project, pk=run.params["findings_set"]).first()
    if label_set is None or not label_set.is_multi:
        raise TrainingError("--label-set must name one of the project's findings sets")
    mixed = _has_class_labels(run.project)
    scans, findings, raw = findings_targets(label_set, split="pool")
    targets = uncertain_policy(raw, label_set.uncertain_policy)
    if not scans or not any(np.nansum(targets[:, i] == 1) and np.nansum(targets[:, i] == 0)
                            for i in range(len(findings))):
        raise TrainingError(f"{label_set.name}: no finding seen both present and absent on "
                            "pool scans yet")
    pretrained, pconfig = ssl.load_pretrained(checkpoint_path(encoder, "encoder.pt"))
    config = ssl.FinetuneConfig(**{k: v for k, v in run.params.items()
                                   if k in ssl.FinetuneConfig.__dataclass_fields__})
    entry = {"id": label_set.pk, "name": label_set.name, "net": f"findings-net-{label_set.pk}.pt",
             "findings": [{"id": f.pk, "name": f.name} for f in findings],
             "uncertain_policy": label_set.uncertain_policy, "num_scans": len(scans)}
    net_config = ssl.network_config(pconfig, config.input_scale)
    model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        "kind": "finetuned-findings", "classes": [], "label_sets": [],
        "finetune": asdict(config), "pretrain": asdict(pconfig),
        "input_size": net_config.image_size, "findings_sets": [entry]})
    report.log(f"fine-tuning {model.version} from {encoder.version} on {len(scans)} scans of "
               f"{label_set.name} ({len(findings)} findings, uncertain: "
               f"{label_set.uncertain_policy})")
    network, metrics = finetune_findings(
        pretrained, pconfig, images_for(scans, net_config.image_size, net_config.channels),
        targets, config,
        checkpoint_path=checkpoint_path(model, entry["net"]), model_version=model.version,
        progress=report, workers=_workers())
    if mixed:       # the project's class sets keep their heads beside the network
        _refit(run, report, model=model, networks={label_set.pk: (entry, network, net_config)},
               network_metrics={"finetuned-findings": metrics})
        return
    _finish_findings_network(run, model, entry, label_set, network, net_config, metrics,
                             report)


def _has_class_labels(project: Project) -> bool:
    return Annotation.objects.filter(scan__project=project,
                                     outcome=Annotation.Outcome.LABEL).exists()


def _network_fit(label_set, entry: dict, network, pconfig) -> dict:
    """A findings network scored as a refit scores its heads: per-finding thresholds chosen
    on the eval split (F1 or the set's target sensitivity; 0.5 for a finding with too few
    eval positives), the per-finding report, and what the findings gate needs."""
    from annotator.selectors import findings_targets
    from ml_backend.metrics.findings import uncertain_policy
    from ml_backend.services.findings import eval_thresholds
    from ml_backend.ssl.findings import predict_findings

    names = [f["name"] for f in entry["findings"]]
    eval_scans, _, eval_raw = findings_targets(label_set, split="eval")
    eval_targets = uncertain_policy(eval_raw, "ignore")
    result, thresholds = None, np.full(len(names), 0.5)

    def predict(some: list[Scan]) -> np.ndarray:
        return predict_findings(network, images_for(some, pconfig.image_size, pconfig.channels),
                                pconfig)
    if eval_scans:
        thresholds, result = eval_thresholds(label_set, eval_targets, predict(eval_scans), names)
    entry["thresholds"] = {n: float(t) for n, t in zip(names, thresholds)}
    return {"label_set": label_set, "head": None, "predict": predict, "config": entry,
            "eval": (eval_scans, eval_targets), "report": result}


def _carried_networks(project: Project, fitted: list[dict], report, *, fresh=frozenset()
                      ) -> tuple[list[dict], dict]:
    """The active version's findings networks, where they still score their set better than
    the refit's new heads (macro AUC on the same eval scans) — so a refit for new labels
    neither drops a fine-tuned network nor is held back by it. A network whose set gained or
    lost a finding since is not carried. Returns the fits to use and ``{set id: source
    file}`` for the carried networks."""
    from annotator.models import LabelSet
    from annotator.selectors import findings_for_set

    active = project.active_model
    entries = [e for e in ((active.config or {}).get("findings_sets") or [])
               if "net" in e and e["id"] not in fresh] if active is not None else []
    if not entries:
        return fitted, {}
    by_set = {f["label_set"].pk: f for f in fitted}
    sources = {}
    for entry in entries:
        label_set = LabelSet.objects.filter(pk=entry["id"], project=project).first()
        source = Path(checkpoint_path(active, entry["net"]))
        if label_set is None or not source.exists():
            continue
        if [f.pk for f in findings_for_set(label_set)] != [f["id"] for f in entry["findings"]]:
            report.log(f"{label_set.name}: the findings changed since {active.version}'s "
                       "network: refit heads only (fine-tune again to use a network)")
            continue
        network, pconfig = ssl.load_classifier(source)
        carried = _network_fit(label_set, {**entry}, network, pconfig)
        head = by_set.get(label_set.pk)
        head_auc = ((head or {}).get("report") or {}).get("macro_auc")
        net_auc = (carried["report"] or {}).get("macro_auc")
        if head is not None and head_auc is not None and (net_auc is None or head_auc > net_auc):
            report.log(f"{label_set.name}: the refit heads (macro AUC {head_auc:.3f}) replace "
                       f"{active.version}'s network ({_f3(net_auc)})")
            continue
        report.log(f"{label_set.name}: keeping {active.version}'s network (macro AUC "
                   f"{_f3(net_auc)}; heads {_f3(head_auc)})")
        by_set[label_set.pk] = carried
        sources[label_set.pk] = source
    return [by_set[k] for k in sorted(by_set)], sources


def _f3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _finish_findings_network(run, model, entry, label_set, network, pconfig, metrics,
                             report) -> None:
    """Thresholds and per-finding report on the eval split, the findings gate, promotion."""
    fitted = [_network_fit(label_set, entry, network, pconfig)]
    model.config = {**model.config, "findings_sets": [entry]}
    model.save(update_fields=["config"])
    (Path(model.artifact_dir) / "config.json").write_text(json.dumps(model.config, indent=2,
                                                                     default=str))
    result = fitted[0]["report"]
    verdict = findings_gate(model, fitted, run.project.active_model)
    _finish_findings_only(run, model, verdict, {label_set.name: result}, report)
    model.metrics = {**model.metrics, model.config["kind"]: metrics}
    model.save(update_fields=["metrics"])


# A class network (`finetune`, the scheduled `retrain`) reads scans at twice its encoder's
# size unless the run says otherwise: +0.03-0.04 macro-F1 on brain MRI (docs/benchmarks.md,
# "Fine-tuning at twice the size"), at about 4x the compute. Findings networks keep the
# encoder's size (FinetuneConfig's default, 1): not measured at two sizes.
CLASS_NETWORK_INPUT_SCALE = 2


def _finetune(run: TrainingRun, report: RunReporter) -> None:
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    if run.params.get("findings_set"):
        _finetune_findings(run, report, encoder)
        return
    refusal = retrain_refusal(run.project, run.params)   # the check the endpoints answer 409 by
    if refusal:
        raise TrainingError(refusal)
    pretrained, pconfig = ssl.load_pretrained(checkpoint_path(encoder, "encoder.pt"))
    train_scans, class_ids = training_labels(run.project, split="pool")
    classes = sorted(set(class_ids))
    config = ssl.FinetuneConfig(**{"input_scale": CLASS_NETWORK_INPUT_SCALE,
                                   **{k: v for k, v in run.params.items()
                                      if k in ssl.FinetuneConfig.__dataclass_fields__}})
    names = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "name"))
    network = ssl.network_config(pconfig, config.input_scale)
    model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        "finetune": asdict(config), "pretrain": asdict(pconfig), "kind": "finetuned",
        "input_size": network.image_size,
        "classes": [{"id": c, "name": names[c]} for c in classes]})
    _, images, labels = _labeled_arrays(run.project, classes, network.image_size, "pool",
                                           network.channels)
    report.log(f"fine-tuning {model.version} from {encoder.version} on {len(labels)} labels, "
               f"{len(classes)} classes, from head layer {config.from_head_layer}, scans read "
               f"at {network.image_size} px")
    classifier, metrics = ssl.finetune(pretrained, pconfig, images, labels, len(classes), config,
                                       checkpoint_path=checkpoint_path(model, "classifier.pt"),
                                       model_version=model.version, progress=report,
                                       workers=_workers())
    _finish_classifier(run, model, cnn_predictor(classifier, network, classes, model=model),
                       classes, len(labels), metrics, report, calibrate=True)


def _distill_findings(run: TrainingRun, report: RunReporter, teacher_version: ModelVersion,
                      encoder: ModelVersion) -> None:
    """SimCLRv2 step 3 for a findings network: the student matches the teacher's per-finding
    probabilities on every pool scan of the set, plus the masked BCE on its answers."""
    from annotator.selectors import findings_targets
    from annotator.models import LabelSet
    from ml_backend.metrics.findings import uncertain_policy
    from ml_backend.ssl.findings import distill_findings

    networks = [e for e in teacher_version.config["findings_sets"] if "net" in e]
    wanted = run.params.get("findings_set")
    source = next((e for e in networks if not wanted or e["id"] == wanted), None)
    if source is None:
        raise TrainingError(f"{teacher_version.version} has no findings network for that set: "
                            "fine-tune one first")
    label_set = LabelSet.objects.get(pk=source["id"])
    teacher, pconfig = ssl.load_classifier(checkpoint_path(teacher_version, source["net"]))
    pretrained, _ = ssl.load_pretrained(checkpoint_path(encoder, "encoder.pt"))
    config = ssl.DistillConfig(**{k: v for k, v in run.params.items()
                                  if k in ssl.DistillConfig.__dataclass_fields__})
    scans, findings, raw = findings_targets(label_set, split="pool")
    known_ids = [f["id"] for f in source["findings"]]
    if [f.pk for f in findings] != known_ids:
        raise TrainingError(f"{label_set.name}'s findings changed since "
                            f"{teacher_version.version}: fine-tune a new teacher first")
    pool = list(Scan.objects.filter(project=run.project, split="pool", label_set=label_set,
                                    quarantined=False).order_by("pk"))
    entry = {**source, "num_scans": len(scans)}
    model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        **teacher_version.config, "kind": "distilled-findings", "distill": asdict(config),
        "teacher": teacher_version.version, "findings_sets": [entry]})
    report.log(f"distilling {teacher_version.version} into {model.version} on {len(pool)} pool "
               f"scans of {label_set.name} (+{len(scans)} answered)")
    student, metrics = distill_findings(
        teacher, pretrained, pconfig, images_for(pool, pconfig.image_size, pconfig.channels), config,
        labeled=images_for(scans, pconfig.image_size, pconfig.channels) if scans else None,
        targets=uncertain_policy(raw, label_set.uncertain_policy) if scans else None,
        checkpoint_path=checkpoint_path(model, entry["net"]), model_version=model.version,
        progress=report, workers=_workers())
    if _has_class_labels(run.project):   # a mixed project: class heads beside the student
        _refit(run, report, model=model, networks={label_set.pk: (entry, student, pconfig)},
               network_metrics={"distilled-findings": metrics})
        return
    _finish_findings_network(run, model, entry, label_set, student, pconfig, metrics, report)


def _distill(run: TrainingRun, report: RunReporter) -> None:
    teacher_version = (ModelVersion.objects.get(pk=run.params["teacher"])
                       if run.params.get("teacher") else run.project.active_model)
    if teacher_version is None:
        raise TrainingError("distillation needs a fine-tuned teacher: run `manage.py finetune`")
    encoder = teacher_version.parent
    if encoder is None:
        raise TrainingError(f"{teacher_version.version} has no parent encoder")
    kind = teacher_version.config.get("kind")
    networks = [e for e in teacher_version.config.get("findings_sets") or [] if "net" in e]
    if kind in ("finetuned-findings", "distilled-findings") or networks:
        _distill_findings(run, report, teacher_version, encoder)
        return
    if kind == "head":
        raise TrainingError(f"{teacher_version.version} is a refit (linear heads on the "
                            "encoder): distil a fine-tuned network — run `manage.py "
                            "finetune` first, or name one with --teacher")
    teacher, pconfig = ssl.load_classifier(checkpoint_path(teacher_version, "classifier.pt"))
    pretrained, _ = ssl.load_pretrained(checkpoint_path(encoder, "encoder.pt"))
    classes = [c["id"] for c in teacher_version.config["classes"]]
    config = ssl.DistillConfig(**{k: v for k, v in run.params.items()
                                  if k in ssl.DistillConfig.__dataclass_fields__})
    model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config={
        **teacher_version.config, "kind": "distilled", "distill": asdict(config),
        "teacher": teacher_version.version})
    pool = list(Scan.objects.filter(project=run.project, split="pool").order_by("pk"))
    _, labeled, labels = _labeled_arrays(run.project, classes, pconfig.image_size, "pool",
                                           pconfig.channels)
    report.log(f"distilling {teacher_version.version} into {model.version} on {len(pool)} "
               f"pool scans (+{len(labels)} labels)")
    student, metrics = ssl.distill(teacher, pretrained, pconfig,
                                   images_for(pool, pconfig.image_size, pconfig.channels), config,
                                   labeled=labeled, labels=labels,
                                   checkpoint_path=checkpoint_path(model, "classifier.pt"),
                                   model_version=model.version, progress=report,
                                   workers=_workers())
    _finish_classifier(run, model, cnn_predictor(student, pconfig, classes, model=model),
                       classes, len(labels), metrics, report, calibrate=True)


def _refit(run: TrainingRun, report: RunReporter, *, model: ModelVersion | None = None,
           networks: dict | None = None, network_metrics: dict | None = None) -> None:
    """The fast loop: one calibrated linear head per label set on frozen embeddings
    (seconds). A set with labels of fewer than two classes gets no head yet.

    ``networks`` (``{findings set id: (entry, network, PretrainConfig)}``): findings networks
    just fine-tuned or distilled into ``model`` (already created), which score their sets in
    this version instead of heads; the project's other sets get their heads as in any
    refit. The active version's own findings networks are carried over where they still
    beat the new heads (``_carried_networks``)."""
    from ml_backend.active.features import PIXEL_SIDE, block_weights
    from ml_backend.active.refit import (
        PRODUCT_PROTOTYPE_N0,
        SetHeads,
        fit_head,
        fit_head_choosing_block,
    )

    started = time.perf_counter()
    encoder = run.project.active_encoder
    if encoder is None:
        raise TrainingError("the project has no active encoder: run `manage.py pretrain` first")
    refusal = None if networks else refit_refusal(run.project)   # as the endpoints answer 409
    if refusal:
        raise TrainingError(refusal)
    embed_with(run, encoder, report, full=False)          # new scans since the last embed
    timings = {"embed_new_s": time.perf_counter() - started}
    scans, class_ids = training_labels(run.project, split="pool")
    class_set = class_label_sets(run.project)
    sets = {s.pk: s for s in run.project.label_sets.all()}
    by_set: dict[int, list[int]] = {}
    for row, class_id in enumerate(class_ids):
        by_set.setdefault(class_set[class_id], []).append(row)
    # the heads read the embedding and, unless MEDLABEL_REFIT_PIXEL_WEIGHT is 0, each scan's
    # thumbnail beside it (ml_backend/active/features.py); each set's head keeps the
    # thumbnail only where it predicts the set's own labels better out of fold
    weight = settings.REFIT_PIXEL_WEIGHT
    pixels = {"side": PIXEL_SIDE, "weight": weight} if weight > 0 else None
    vectors = head_inputs_for(encoder, scans, pixels) if scans else None
    feature_weights = dim = None
    if vectors is not None and pixels:
        dim = embedding_table(encoder).vectors.shape[1]
        feature_weights = block_weights(dim, vectors.shape[1] - dim, weight)
    heads, set_configs, skipped = {}, [], []
    for set_id in sorted(by_set):
        rows = by_set[set_id]
        labels = np.array([class_ids[r] for r in rows])
        if len(set(labels.tolist())) < 2:
            skipped.append(f"{sets[set_id].name}: labels of 1 class so far")
            continue
        options = {"seed": run.params.get("seed", 0), "prototype_n0": PRODUCT_PROTOTYPE_N0,
                   "balance": settings.REFIT_BALANCE}
        if feature_weights is None:
            head, info = fit_head(vectors[rows], labels, **options)
        else:
            head, info = fit_head_choosing_block(vectors[rows], labels, embedding_dim=dim,
                                                 feature_weights=feature_weights,
                                                 always=settings.REFIT_PIXELS == "always",
                                                 **options)
        heads[set_id] = head
        set_configs.append({"id": set_id, "name": sets[set_id].name,
                            "classes": [int(c) for c in head.class_ids],
                            "head": f"head-{set_id}.npz", "num_labels": len(rows),
                            "temperature": info["temperature"],
                            "calibrated_on": info["calibrated_on"],
                            "softened_on": info.get("softened_on", 0),
                            "balance": info["balance"], "bias": info["bias"],
                            "pixels": info.get("pixels", False),
                            "out_of_fold_nll": {k: info.get(f"out_of_fold_nll_{k}") for k in
                                                ("alone", "pixels")}})
    networks = networks or {}
    findings_fits = fit_findings_sets(run.project, encoder, seed=run.params.get("seed", 0),
                                      report=report, skip=set(networks))
    for set_id, (entry, network, pconfig) in networks.items():
        findings_fits.append(_network_fit(run.project.label_sets.get(pk=set_id), entry,
                                          network, pconfig))
    findings_fits, carried = _carried_networks(run.project, findings_fits, report,
                                               fresh=set(networks))
    if not heads and not findings_fits:
        raise TrainingError(refit_nothing_to_fit(len(scans), skipped))
    classes = [c for config in set_configs for c in config["classes"]]
    names = dict(LabelClass.objects.filter(pk__in=classes).values_list("pk", "name"))
    config = {
        "kind": "head", "label_sets": set_configs, "pixels": pixels,
        "classes": [{"id": c, "name": names[c], "label_set": class_set[c]} for c in classes],
        "temperature": set_configs[0]["temperature"] if len(set_configs) == 1 else None,
        "calibrated_on": sum(c["calibrated_on"] for c in set_configs),
        "findings_sets": [entry["config"] for entry in findings_fits]}
    if model is None:
        model = new_version(run, ModelVersion.Kind.CLASSIFIER, parent=encoder, config=config)
    else:            # a findings network's run: its training config stays beside the heads
        model.config = {**{k: v for k, v in model.config.items() if k in (
            "finetune", "distill", "pretrain", "teacher")}, **config,
            "findings_networks": sorted(e["config"]["name"] for e in findings_fits
                                        if e.get("head") is None)}
        model.save(update_fields=["config"])
        (Path(model.artifact_dir) / "config.json").write_text(
            json.dumps(model.config, indent=2, default=str))
    for set_id, head in heads.items():
        head.save(checkpoint_path(model, f"head-{set_id}.npz"))
    save_findings_heads(model, findings_fits)
    for set_id, source in carried.items():
        target = Path(checkpoint_path(model, source.name))
        try:
            os.link(source, target)          # a version never changes: one file, two names
        except OSError:
            shutil.copy2(source, target)
    findings_verdict = findings_gate(model, findings_fits, run.project.active_model)
    findings_metrics = {entry["label_set"].name: entry["report"] for entry in findings_fits}
    if not heads:            # a findings-only project: the findings gate decides
        _finish_findings_only(run, model, findings_verdict, findings_metrics, report)
        if network_metrics:
            model.metrics = {**model.metrics, **network_metrics}
            model.save(update_fields=["metrics"])
        report.log(f"refit took {time.perf_counter() - started:.1f}s")
        return
    report.log(f"refit {model.version}: linear heads on {encoder.version} embeddings"
               + (f" and {PIXEL_SIDE} px thumbnails (weight {weight:g}) where they help" if pixels
                  else "") + ", "
               f"{len(scans)} labels; " + "; ".join(
                   f"{c['name']}: {len(c['classes'])} classes, T={c['temperature']:.2f}"
                   + (", with the thumbnail" if c["pixels"] else "")
                   for c in set_configs) + ("; skipped " + "; ".join(skipped) if skipped else ""))
    multi = SetHeads(heads=heads, class_ids=classes)
    timings["fit_s"] = time.perf_counter() - started - sum(timings.values())

    def predict(scans: list[Scan], *, calibrated: bool = True) -> np.ndarray:
        return multi.predict_proba(head_inputs_for(encoder, scans, pixels),
                                   [s.label_set_id for s in scans], calibrated=calibrated)

    _finish_classifier(run, model, predict, classes, len(scans),
                       {"fit": set_configs, "skipped_sets": skipped,
                        **({"findings": findings_metrics} if findings_metrics else {})}, report,
                       uncalibrated=lambda scans: predict(scans, calibrated=False),
                       findings=findings_verdict if findings_fits else None, timings=timings)
    if run.params.get("query", True) and model.status == ModelVersion.Status.ACTIVE:
        mark = time.perf_counter()
        _next_round(run, report)
        timings["query_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    model.metrics = {**model.metrics, **(network_metrics or {}),
                     "timings": {k: round(v, 3) for k, v in timings.items()}}
    model.save(update_fields=["metrics"])
    report.log(f"refit took {timings['total_s']:.1f}s (" + ", ".join(
        f"{k[:-2]} {v:.2f}" for k, v in timings.items() if k != "total_s") + ")")


def _finish_findings_only(run, model, verdict, findings_metrics: dict, report) -> None:
    """Gate and promote a version that holds findings heads only, with a class version's
    consequences (``_finish_classifier`` then the refit's round): ``publish`` (its pool
    predictions — none for classes: its findings are scored by the round — activation,
    ``classifier_published``, pruning) and, unless the run says ``query=False``, the next
    worklist round ranked by it."""
    promote, reason, comparison = verdict
    active = run.project.active_model
    model.num_labels = sum(e["num_scans"] for e in model.config["findings_sets"])
    model.metrics = {"training": {"findings": findings_metrics}, "findings_gate": comparison}
    if promote:
        reason = ("promoted: the first classifier of this project" if active is None else
                  "promoted: neither the macro AUC nor any finding's AUC is confidently "
                  f"below {active.version}'s beyond the tolerance (paired bootstrap on the "
                  "eval scans)")
    model.status, model.status_reason = ModelVersion.Status.READY, reason
    model.save(update_fields=["num_labels", "metrics", "status", "status_reason"])
    report.log(reason)
    if not promote:
        return
    publish(model, predict=None, classes=[])
    model.refresh_from_db(fields=["status", "status_reason"])
    if model.status != ModelVersion.Status.ACTIVE:
        report.log(model.status_reason)      # a person chose another version meanwhile
        return
    if run.params.get("query", True):
        _next_round(run, report)


def _next_round(run, report) -> None:
    """The round of scans to label after a new model; none when there is no scan left to
    choose (every pool scan labeled: an empty round was stored and shown as the worklist)."""
    try:
        query_round = query_round_create(project=run.project, refuse_empty=True)
    except TrainingError as exc:
        report.log(f"no new query round: {exc}")
        return
    report.log(f"query round {query_round.pk}: {query_round.size} scans "
               f"({query_round.strategy})")


def _finish_classifier(run, model, predict: Predictor, classes, num_labels, metrics, report, *,
                       uncalibrated: Predictor | None = None, calibrate: bool = False,
                       findings: tuple[bool, str, dict] | None = None,
                       timings: dict | None = None):
    """Evaluate a new classifier on the eval split, compare it with the active one on the
    same scans, and promote it (predictions, next round, Label Studio) or hold it back."""
    model.num_labels = num_labels
    model.metrics = {"training": metrics}
    model.save(update_fields=["num_labels", "metrics"])   # still "training" until gated
    if calibrate:
        predict, uncalibrated = _calibrate_network(model, predict, classes, report)
    timings = {} if timings is None else timings
    mark = time.perf_counter()
    evaluation = evaluate(model, predict=predict, classes=classes, uncalibrated=uncalibrated)
    timings["evaluate_s"] = time.perf_counter() - mark
    if evaluation is not None:
        report.log(f"eval: accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}"
                   f" on {evaluation.num_eval} scans")
    mark = time.perf_counter()
    promoted, reason, comparison = gate(model, evaluation, predict=predict)
    timings["gate_s"] = time.perf_counter() - mark
    if findings is not None:         # the project's findings sets are gated too
        model.metrics = {**model.metrics, "findings_gate": findings[2]}
        if promoted and not findings[0]:
            promoted, reason = False, f"{findings[1]} (classes: {reason})"
    model.metrics = {**model.metrics, "gate": comparison}
    model.status, model.status_reason = ModelVersion.Status.READY, reason
    model.save(update_fields=["metrics", "status", "status_reason"])
    report.log(reason)
    if promoted:
        mark = time.perf_counter()
        publish(model, predict=predict, classes=classes)
        timings["publish_s"] = time.perf_counter() - mark
        if model.status != ModelVersion.Status.ACTIVE:   # a person chose another meanwhile
            report.log(model.status_reason)


def _calibrate_network(model: ModelVersion, predict: Predictor, classes: list[int],
                       report) -> tuple[Predictor, Predictor]:
    """Temperature scaling for a fine-tuned or distilled network, as the linear heads get:
    the temperature is fit on the labeled eval split (it changes no predicted class, so
    accuracy, F1 and the gate are unaffected); the ECE reported after scaling is
    cross-fitted (temperature from one half of the eval scans, ECE on the other) so it is
    not measured on the scans the temperature was fit on."""
    from ml_backend.metrics.reports import fit_temperature, retemper

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
        return retemper(p, temps)
    return calibrated, (lambda scans, calibrated=False: predict(scans, calibrated=False))


# The handler of each run kind (``runs.training_run_execute`` looks them up when a run
# executes, so creating or claiming a run never imports torch).
HANDLERS = {"pretrain": _pretrain, "embed": _embed, "refit": _refit, "retrain": _finetune,
            "distill": _distill}
