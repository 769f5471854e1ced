"""Export a classifier version: one network per label set (``ml_backend/ssl/export.py``),
checked against PyTorch on the project's own scans (onnxruntime for ONNX), and a model card
(Markdown and JSON) saying what it is, what it saw, how well it does and what it is not for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from annotator.models import LabelClass, LabelSet, Scan
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion
from ml_backend.services.artifacts import images_for
from ml_backend.services.inference import classifier_network, encoder_network, version_heads

CHECK_SCANS = 16          # real scans each exported file is checked on
TOLERANCE = 1e-4


def model_export(model: ModelVersion, *, fmt: str, out: Path) -> dict:
    """Write ``out/<version>-<label set>.<onnx|pt>`` per label set and ``out/model-card.md``
    / ``.json``. Returns the card. Raises TrainingError with the reason when the version
    cannot be exported (an encoder, a findings network, a prototype head, a check that
    fails)."""
    from ml_backend.ssl import export as core

    if model.kind != ModelVersion.Kind.CLASSIFIER:
        raise TrainingError(f"{model.version} is an encoder: export a classifier version")
    kind = model.config.get("kind")
    if kind in ("finetuned-findings", "distilled-findings") or model.config.get("findings_sets"):
        raise TrainingError(f"{model.version} scores findings: the export covers single-label "
                            "classifiers for now")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} is not empty: export into a new folder")
    ext = {"onnx": "onnx", "torchscript": "pt"}.get(fmt)
    if ext is None:
        raise TrainingError(f"unknown format {fmt!r}: use onnx or torchscript")
    names = dict(LabelClass.objects.filter(project=model.project).values_list("pk", "name"))
    class_ids = [c["id"] for c in model.config["classes"]]
    networks = []                        # (label set or None, class ids, network, config)
    if kind == "head":
        simclr, config = encoder_network(model.parent)
        heads = version_heads(model)
        for set_id, head in heads.heads.items():
            try:
                network = core.head_network(simclr.encoder, head, config)
            except core.ExportError as exc:
                raise TrainingError(str(exc)) from None
            networks.append((LabelSet.objects.filter(pk=set_id).first(),
                             [int(c) for c in head.class_ids], network, config))
    else:
        classifier, config = classifier_network(model)
        network = core.cnn_network(classifier, config, model.config.get("temperature") or 1.0)
        networks.append((None, class_ids, network, config))
    files = []
    for label_set, ids, network, config in networks:
        stem = f"{model.version}-{_slug(label_set.name) if label_set else 'all'}"
        path = core.write(network, out / f"{stem}.{ext}", fmt=fmt, size=config.image_size,
                          channels=config.channels)
        scans = list(Scan.objects.filter(project=model.project, quarantined=False, **(
            {"label_set": label_set} if label_set else {})).order_by("pk")[:CHECK_SCANS])
        difference = None
        if scans:
            images = images_for(scans, config.image_size, config.channels).astype(np.float32)
            images = images / 255.0
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            difference = core.check(network, path, images, fmt=fmt)
            if difference > TOLERANCE:
                raise TrainingError(f"{path.name} differs from PyTorch by {difference:.2e} "
                                    f"(above {TOLERANCE}) on the project's scans")
        files.append({"file": path.name, "label_set": label_set.name if label_set else None,
                      "classes": [names.get(c, str(c)) for c in ids],
                      "checked_on_scans": len(scans), "max_difference": difference,
                      "input": {"name": "image", "shape": ["N", config.channels,
                                                           config.image_size, config.image_size],
                                "dtype": "float32", "range": [0, 1]},
                      "output": {"name": "probabilities", "shape": ["N", len(ids)]}})
    card = _card(model, fmt, files)
    (out / "model-card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "model-card.md").write_text(_card_markdown(card))
    return card


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in name).strip("-") or "set"


def _lineage(model: ModelVersion) -> list[dict]:
    chain, node = [], model
    while node is not None and len(chain) < 20:
        chain.append({"version": node.version, "kind": node.kind, "status": node.status,
                      "created": node.created_at.isoformat(timespec="seconds")})
        node = node.parent
    return chain


def _card(model: ModelVersion, fmt: str, files: list[dict]) -> dict:
    evaluation = model.evaluations.order_by("-created_at").first()
    report = (evaluation.report if evaluation else None) or {}
    encoder = model.parent
    pretrain = (encoder.config or {}).get("pretrain") if encoder else None
    return {
        "model": model.version, "project": model.project.name, "format": fmt,
        "exported": time.strftime("%Y-%m-%d %H:%M"), "files": files,
        "kind": model.config.get("kind"), "status": model.status,
        "status_reason": model.status_reason, "lineage": _lineage(model),
        "training": {"labels": model.num_labels, "config": {
            k: v for k, v in (model.config or {}).items()
            if k not in ("classes", "label_sets", "findings_sets")},
            "encoder": encoder.version if encoder else None, "pretrain": pretrain,
            "encoder_started_from": (encoder.config or {}).get("start_from") if encoder else None},
        "evaluation": None if evaluation is None else {
            "eval_scans": evaluation.num_eval, "accuracy": evaluation.accuracy,
            "macro_f1": evaluation.macro_f1, "macro_auc": evaluation.macro_auc,
            "cohen_kappa": evaluation.cohen_kappa, "ece": evaluation.ece,
            "ece_before_scaling": report.get("ece_before_scaling"),
            "per_class": report.get("per_class"), "per_set": report.get("per_set"),
            "per_site": report.get("per_group")},
        "preprocessing": "the scan's 8-bit preview as the site shows it (a DICOM windowed by "
                         "its default window), padded to a square with black, resized to the "
                         "input size (bilinear), divided by 255; greyscale has 1 channel, "
                         "colour 3 (RGB). The network normalises itself.",
        "intended_use": "Research and annotation support: ranking scans for expert reading "
                        "and suggesting a label a qualified reader confirms or corrects.",
        "limitations": [
            "Not a medical device; not validated for diagnosis or triage.",
            "Evaluated only on this project's labeled eval scans (numbers above); performance "
            "on other sites, scanners or populations is unknown and often lower.",
            "Each file scores only its label set's classes: give it scans of that anatomy "
            "and modality only.",
            "Probabilities are calibrated by temperature on this project's labels; "
            "recalibrate before relying on them elsewhere."],
    }


def _card_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['model']} ({card['project']})", "",
             f"Exported {card['exported']} as {card['format']}; status **{card['status']}** "
             f"({card['status_reason'] or 'no reason recorded'}).", "",
             "## Files", "", "| file | label set | classes | input | checked on | max diff |",
             "|---|---|---|---|---:|---:|"]
    for f in card["files"]:
        shape = "×".join(str(x) for x in f["input"]["shape"])
        diff = "—" if f["max_difference"] is None else f"{f['max_difference']:.1e}"
        lines.append(f"| `{f['file']}` | {f['label_set'] or 'all'} | {', '.join(f['classes'])} "
                     f"| `image` {shape} in [0, 1] | {f['checked_on_scans']} scans | {diff} |")
    lines += ["", "Output `probabilities`: one row per image over the classes in the order "
              "listed.", "", "## Preprocessing", "", card["preprocessing"], "",
              "## Training", "", f"- Labels: {card['training']['labels']}",
              f"- Encoder: {card['training']['encoder']} (started from "
              f"{card['training']['encoder_started_from']})",
              f"- Lineage: {' ← '.join(n['version'] for n in card['lineage'])}", ""]
    evaluation = card["evaluation"]
    lines += ["## Evaluation (this project's eval split)", ""]
    if evaluation is None:
        lines.append("No evaluation: the project had no labeled eval scans.")
    else:
        lines.append(f"{evaluation['eval_scans']} eval scans: accuracy {_f(evaluation['accuracy'])}, "
                     f"macro-F1 {_f(evaluation['macro_f1'])}, macro-AUC "
                     f"{_f(evaluation['macro_auc'])}, ECE {_f(evaluation['ece'])} (before "
                     f"temperature scaling {_f(evaluation['ece_before_scaling'])}).")
        per_class = evaluation.get("per_class") or {}
        if per_class:
            lines += ["", "| class | precision | recall | F1 | AUC | support |",
                      "|---|---:|---:|---:|---:|---:|"]
            for name, m in per_class.items():
                lines.append(f"| {name} | {_f(m.get('precision'))} | {_f(m.get('recall'))} | "
                             f"{_f(m.get('f1'))} | {_f(m.get('auc'))} | {m.get('support', '')} |")
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "—" if value is None else f"{value:.3f}"
