"""Export a classifier version: one network per label set (``ml_backend/ssl/export.py``),
checked against PyTorch on the project's own scans (onnxruntime for ONNX), and a model card
(Markdown and JSON) saying what it is, what it saw, how well it does and what it is not for."""

from __future__ import annotations

import html
import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from django.conf import settings
from django.utils import timezone

from annotator.models import LabelClass, LabelSet, Scan
from medsite.locks import LockBusy, file_lock
from ml_backend.errors import TrainingError
from ml_backend.models import ModelVersion
from ml_backend.services.artifacts import images_for
from ml_backend.services.inference import classifier_network, encoder_network, version_heads
from ml_backend.ssl import export as core

CHECK_SCANS = 16          # real scans each exported file is checked on
TOLERANCE = 1e-4


def model_export(model: ModelVersion, *, fmt: str, out: Path) -> dict:
    """Write ``out/<version>-<label set>.<onnx|pt>`` per label set (classes and findings
    sets alike) and ``out/model-card.md`` / ``.json``. Returns the card. Raises
    TrainingError with the reason when the version cannot be exported (an encoder, a
    prototype head, a check that fails)."""
    if model.kind != ModelVersion.Kind.CLASSIFIER:
        raise TrainingError(f"{model.version} is an encoder: export a classifier version")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"{out} is not empty: export into a new folder")
    ext = {"onnx": "onnx", "torchscript": "pt"}.get(fmt)
    if ext is None:
        raise TrainingError(f"unknown format {fmt!r}: use onnx or torchscript")
    names = dict(LabelClass.objects.filter(project=model.project).values_list("pk", "name"))
    networks = _class_networks(model) + _findings_networks(model)
    if not networks:
        raise TrainingError(f"{model.version} holds no classifier or findings network")
    files = []
    for net in networks:
        label_set, config = net["label_set"], net["config"]
        stem = f"{model.version}-{_slug(label_set.name) if label_set else 'all'}"
        try:
            path = core.write(net["network"], out / f"{stem}.{ext}", fmt=fmt,
                              size=config.image_size, channels=config.channels)
        except core.ExportError as exc:
            raise TrainingError(f"{model.version}: {exc}") from None
        scans = list(Scan.objects.filter(project=model.project, quarantined=False, **(
            {"label_set": label_set} if label_set else {})).order_by("pk")[:CHECK_SCANS])
        difference = None
        if scans:
            images = images_for(scans, config.image_size, config.channels).astype(np.float32)
            images = images / 255.0
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            try:
                difference = core.check(net["network"], path, images, fmt=fmt)
            except (RuntimeError, ValueError) as exc:   # the written file does not run
                raise TrainingError(f"{path.name} was written but does not run "
                                    f"({type(exc).__name__}: {str(exc)[:200]})") from None
            if difference > TOLERANCE:
                raise TrainingError(f"{path.name} differs from PyTorch by {difference:.2e} "
                                    f"(above {TOLERANCE}) on the project's scans")
        labels = [names.get(c, str(c)) for c in net["ids"]]
        entry = {"file": path.name, "label_set": label_set.name if label_set else None,
                 "kind": net["kind"], "classes": labels,
                 "checked_on_scans": len(scans), "max_difference": difference,
                 "input": {"name": "image", "shape": ["N", config.channels,
                                                      config.image_size, config.image_size],
                           "dtype": "float32", "range": [0, 1]},
                 "output": {"name": "probabilities", "shape": ["N", len(net["ids"])],
                            "meaning": "one probability per finding, independent (a scan may "
                                       "show several); present at or above its threshold"
                            if net["kind"] == "findings" else
                            "class probabilities (they sum to one)"}}
        if net["kind"] == "findings":
            entry["thresholds"] = {n: float(net["thresholds"].get(n, 0.5)) for n in labels}
            entry["threshold_rule"] = net.get("threshold_rule") or ""
        files.append(entry)
    card = _card(model, fmt, files)
    (out / "model-card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "model-card.md").write_text(_card_markdown(card))
    return card


class ExportBusy(TrainingError):
    """Another request (any thread or process) is exporting this version in this format
    right now and did not finish within the wait; ``str(exc)`` says to try again."""


EXPORT_WAIT_SECONDS = 60.0   # how long a second request for the same export waits for it


def model_export_archive(model: ModelVersion, *, fmt: str, wait: float | None = None) -> Path:
    """The version exported as one zip (networks + model card), made once per version,
    format and status (a version never changes; its status may) and kept in its artifact
    folder; written under a temporary name and renamed, so a reader never sees half a file.

    One export of a version and format at a time, across threads and processes: a lock file
    in the version's export folder (``flock``). A second request waits up to ``wait``
    seconds (default ``EXPORT_WAIT_SECONDS``) for the first and then serves the file it
    made; past that it raises ``ExportBusy``. Raises TrainingError with the reason when the
    version cannot be exported."""
    if fmt not in ("onnx", "torchscript"):
        raise TrainingError(f"unknown format {fmt!r}: use onnx or torchscript")
    if not model.artifact_dir:
        raise TrainingError(f"{model.version} has no files (no artifact folder): nothing to "
                            "export")
    folder = Path(model.artifact_dir) / "exports"
    target = folder / f"{model.version}-{fmt}-{model.status}.zip"
    if target.exists():
        return target
    if model.kind != ModelVersion.Kind.CLASSIFIER:      # before making any folder
        raise TrainingError(f"{model.version} is an encoder: export a classifier version")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _export_lock(folder / f".{model.version}-{fmt}.lock",
                          wait=EXPORT_WAIT_SECONDS if wait is None else wait,
                          what=f"{model.version} ({fmt})"):
            if target.exists():         # the request we waited for made it
                return target
            _export_zip(model, fmt=fmt, folder=folder, target=target)
    except OSError as exc:              # disk full, a read-only folder: said, not a 500
        raise TrainingError(f"{model.version} could not be exported: {exc.strerror or exc} "
                            f"({folder})") from None
    return target


def _export_zip(model: ModelVersion, *, fmt: str, folder: Path, target: Path) -> None:
    import os
    import shutil
    import tempfile
    import zipfile

    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        model_export(model, fmt=fmt, out=work / "files")
        partial = work / "archive.zip"
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted((work / "files").iterdir()):
                archive.write(path, f"{model.version}/{path.name}")
        os.replace(partial, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _export_lock(path: Path, *, wait: float, what: str):
    """``medsite.locks.file_lock`` on ``path``; a second export of the same version and format
    that waits longer than ``wait`` gets ``ExportBusy``."""
    try:
        with file_lock(path, wait=wait):
            yield
    except LockBusy:
        raise ExportBusy(f"{what} is being exported by another request right now: try again "
                         "in a moment") from None


def _class_networks(model: ModelVersion) -> list[dict]:
    """The version's single-label networks: one per label set for refit heads, one for a
    fine-tuned or distilled classifier."""
    kind = model.config.get("kind")
    class_ids = [c["id"] for c in model.config.get("classes") or []]
    if not class_ids:
        return []
    if kind == "head":
        simclr, config = encoder_network(model.parent)
        sets = {s.pk: s for s in LabelSet.objects.filter(project=model.project)}
        found = []
        for set_id, head in version_heads(model).heads.items():
            try:
                network = core.head_network(simclr.encoder, head, config,
                                            (model.config.get("pixels") or {}).get("side"))
            except core.ExportError as exc:
                raise TrainingError(str(exc)) from None
            found.append({"label_set": sets.get(set_id), "kind": "classes", "config": config,
                          "ids": [int(c) for c in head.class_ids], "network": network})
        return found
    classifier, config = classifier_network(model)
    return [{"label_set": None, "kind": "classes", "config": config, "ids": class_ids,
             "network": core.cnn_network(classifier, config,
                                         model.config.get("temperature") or 1.0)}]


def _findings_networks(model: ModelVersion) -> list[dict]:
    """The version's findings sets: refit heads over its encoder, or a fine-tuned /
    distilled findings network; each with the thresholds the product uses."""
    from ml_backend.services.artifacts import checkpoint_path
    from ml_backend.services.findings import findings_head
    from ml_backend.ssl.train import load_classifier

    found = []
    for entry in model.config.get("findings_sets") or []:
        label_set = LabelSet.objects.filter(pk=entry["id"], project=model.project).first()
        ids = [int(f["id"]) for f in entry["findings"]]
        common = {"label_set": label_set, "kind": "findings",
                  "thresholds": entry.get("thresholds") or {},
                  "threshold_rule": entry.get("threshold_rule")}
        if "net" in entry:
            path = Path(checkpoint_path(model, entry["net"]))
            if not path.exists():
                raise TrainingError(f"{model.version}: the {entry['name']} network's file is "
                                    "missing")
            classifier, config = load_classifier(path)
            found.append({**common, "config": config, "ids": ids,
                          "network": core.findings_cnn_network(classifier, config)})
            continue
        head = findings_head(model, entry["id"])
        if head is None:
            raise TrainingError(f"{model.version}: the {entry['name']} findings head's file "
                                "is missing")
        simclr, config = encoder_network(model.parent)
        found.append({**common, "config": config,
                      "ids": [int(i) for i in head.finding_ids],
                      "network": core.findings_head_network(simclr.encoder, head, config)})
    return found


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in name).strip("-") or "set"


def _lineage(model: ModelVersion) -> list[dict]:
    chain, node = [], model
    while node is not None and len(chain) < 20:
        chain.append({"version": node.version, "kind": node.kind, "status": node.status,
                      "created": node.created_at.isoformat(timespec="seconds")})
        node = node.parent
    return chain


# What a consumer must do to a scan to get the product's own numbers (the tenth probe found
# "bilinear" here while the product enlarges with bicubic: up to 0.1 apart in probability).
_PREPROCESSING = (
    "Input: the scan's 8-bit preview as the site shows it (the file behind its preview URL; "
    "to make one from a raw scan: a greyscale DICOM goes through its modality LUT and its "
    "first VOI window, or the 0.5-99.5 percentile window when it has none, then MONOCHROME1 "
    "is inverted; a 16-bit PNG or TIFF takes the same percentile window; the result is "
    "scaled to 0-255 and, where its longest side is above {side} px, shrunk to {side} with "
    "Pillow's Lanczos filter). Then: padded to a square with black (the image centred), "
    "resized to the input size with Pillow's BICUBIC filter when enlarging and BILINEAR when "
    "shrinking, as float32 divided by 255, shape (N, C, S, S): greyscale has 1 channel, "
    "colour 3 (RGB). The network normalises itself.")


def _card(model: ModelVersion, fmt: str, files: list[dict]) -> dict:
    evaluation = model.evaluations.order_by("-created_at").first()
    report = (evaluation.report if evaluation else None) or {}
    encoder = model.parent
    pretrain = (encoder.config or {}).get("pretrain") if encoder else None
    return {
        "model": model.version, "project": model.project.name, "format": fmt,
        "exported": timezone.now().isoformat(timespec="seconds"), "files": files,
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
        "findings_evaluation": _findings_evaluation(model, files),
        "preprocessing": _PREPROCESSING.format(side=settings.PREVIEW_MAX_SIDE),
        "intended_use": "Research and annotation support: ranking scans for expert reading "
                        "and suggesting a label a qualified reader confirms or corrects.",
        "limitations": [
            "Not a medical device; not validated for diagnosis or triage.",
            "Evaluated only on this project's labeled eval scans (numbers above); performance "
            "on other sites, scanners or populations is unknown and often lower.",
            "Each file scores only its label set's classes: give it scans of that anatomy "
            "and modality only.",
            "Probabilities are calibrated on this project's labels (temperature scaling "
            "for classes, Platt scaling per finding for refit findings heads; a fine-tuned "
            "findings network's sigmoids are not recalibrated), and findings thresholds "
            "were chosen on its eval split: recalibrate and rechoose them before relying on "
            "them elsewhere."],
    }


def _findings_evaluation(model: ModelVersion, files: list[dict]) -> dict | None:
    """Per findings set: the eval split's per-finding report the version was gated on (AUC,
    AP, sensitivity / specificity / PPV at the threshold, ECE), without the chart bins."""
    sets = [f["label_set"] for f in files if f["kind"] == "findings"]
    if not sets:
        return None
    reports = ((model.metrics or {}).get("training") or {}).get("findings") or {}
    out = {}
    for name in sets:
        report = reports.get(name) or {}
        out[name] = {
            "eval_scans": report.get("num_scans"),
            "macro_auc": report.get("macro_auc"),
            "per_finding": {finding: {k: v for k, v in (row or {}).items()
                                      if k != "reliability"}
                            for finding, row in (report.get("per_finding") or {}).items()},
        } if report else None
    return out


def _md(text) -> str:
    """A name (project, class, finding, label set) as Markdown text that stays text: one
    line, HTML escaped (a viewer that renders HTML runs none), and the characters that
    would split a table cell or start a link, code or emphasis escaped."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*\[\]|])", r"\\\1", text)


def _card_markdown(card: dict) -> str:
    lines = [f"# Model card: {_md(card['model'])} ({_md(card['project'])})", "",
             f"Exported {card['exported']} as {card['format']}; status **{card['status']}** "
             f"({_md(card['status_reason'] or 'no reason recorded')}).", "",
             "## Files", "", "| file | label set | classes | input | checked on | max diff |",
             "|---|---|---:|---|---:|---:|"]
    for f in card["files"]:
        shape = "×".join(str(x) for x in f["input"]["shape"])
        diff = "—" if f["max_difference"] is None else f"{f['max_difference']:.1e}"
        lines.append(f"| `{f['file']}` | {_md(f['label_set'] or 'all')} | {len(f['classes'])} "
                     f"| `image` {shape} in [0, 1] | {f['checked_on_scans']} scans | {diff} |")
    lines += ["", "Output `probabilities`: one row per image, one column per class in the "
              "order below (column 0 first; `model-card.json` lists the same names). For a "
              "single-label set they sum to one; for a findings set each is that finding's "
              "own probability (a scan may show several), and the product calls a finding "
              "present at or above its threshold."]
    for f in card["files"]:
        lines += ["", f"`{f['file']}` ({_md(f['label_set'] or 'all')}):", ""]
        thresholds = (f.get("thresholds") or {}) if f["kind"] == "findings" else {}
        for column, name in enumerate(f["classes"]):
            cut = thresholds.get(name)
            lines.append(f"- column {column}: {_md(name)}"
                         + ("" if cut is None else f" ≥ {cut:.3f}"))
        if f["kind"] == "findings" and f.get("threshold_rule"):
            lines += ["", f"Thresholds: {_md(f['threshold_rule'])}."]
    lines += ["", "## Preprocessing", "", card["preprocessing"], "",
              "## Training", "", f"- Labels: {card['training']['labels']}",
              f"- Encoder: {card['training']['encoder']} (started from "
              f"{card['training']['encoder_started_from']})",
              f"- Lineage: {' ← '.join(n['version'] for n in card['lineage'])}", ""]
    evaluation = card["evaluation"]
    lines += ["## Evaluation (this project's eval split)", ""]
    if not any(f["kind"] == "classes" for f in card["files"]):
        pass                             # findings only: their sections follow
    elif evaluation is None:
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
                lines.append(f"| {_md(name)} | {_f(m.get('precision'))} | {_f(m.get('recall'))} | "
                             f"{_f(m.get('f1'))} | {_f(m.get('auc'))} | {m.get('support', '')} |")
    for set_name, report in (card.get("findings_evaluation") or {}).items():
        lines += ["", f"### Findings: {_md(set_name)}", ""]
        if not report:
            lines.append("No per-finding evaluation: the set had no labeled eval scans.")
            continue
        lines += [f"Macro AUC {_f(report['macro_auc'])}.", "",
                  "| finding | prevalence | AUC | AP | threshold | sensitivity | specificity "
                  "| PPV | positives |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in report["per_finding"].items():
            lines.append(f"| {_md(name)} | {_f(m.get('prevalence'))} | {_f(m.get('auc'))} | "
                         f"{_f(m.get('ap'))} | {_f(m.get('threshold'))} | "
                         f"{_f(m.get('sensitivity'))} | {_f(m.get('specificity'))} | "
                         f"{_f(m.get('ppv'))} | {m.get('positives', '')} |")
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"


def _f(value) -> str:
    return "—" if value is None else f"{value:.3f}"
