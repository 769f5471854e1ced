"""Labels leave the building: one row per scan with its final label (or findings), every
reader's answer, their agreement, and what each reader was shown (model version and score).

Formats: ``csv`` and ``jsonl`` (``label_rows``), and ``imagefolder`` — one folder per split
and class with each scan's de-identified preview PNG, which torchvision's ``ImageFolder`` or
timm read as they are. Quarantined scans are never exported. Reads only: no row changes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

from annotator.models import Annotation, FindingAnswer, LabelClass, Project, Scan
from annotator.selectors import findings_targets, training_labels
from annotator.spreadsheet import csv_cell

FORMATS = ("csv", "jsonl", "imagefolder")
CSV_FIELDS = ["scan", "split", "dataset", "label_set", "kind", "label", "findings",
              "adjudicated", "readers", "agreement", "answers", "patient_key", "study_key",
              "modality", "width", "height", "sha256"]


class ExportError(Exception):
    """The export cannot be made as asked; ``str(exc)`` says why."""


def label_rows(project: Project, *, split: str = "all", adjudicated_only: bool = False
               ) -> list[dict]:
    """One dict per scan with a final result (the training label / the findings the models
    train on, the same rules as training), in scan order."""
    if split not in ("all", "pool", "eval"):
        raise ExportError("split must be all, pool or eval")
    splits = ("pool", "eval") if split == "all" else (split,)
    final: dict[int, dict] = {}
    for part in splits:
        scans, class_ids = training_labels(project, split=part)
        names = dict(LabelClass.objects.filter(project=project).values_list("pk", "name"))
        for scan, class_id in zip(scans, class_ids):
            final[scan.pk] = {"kind": "class", "label": names.get(class_id), "findings": None}
        for label_set in project.label_sets.filter(kind="multi"):
            set_scans, findings, targets = findings_targets(label_set, split=part)
            for scan, row in zip(set_scans, targets):
                states = {f.name: ("present" if v == 1 else "absent" if v == 0 else "uncertain")
                          for f, v in zip(findings, row) if v == v}      # NaN: unread
                if states:
                    final[scan.pk] = {"kind": "findings", "label": None, "findings": states}
    adjudicated = set(Annotation.objects.filter(
        scan__project=project, source=Annotation.Source.ADJUDICATION).values_list(
        "scan_id", flat=True))
    if adjudicated_only:
        final = {k: v for k, v in final.items() if k in adjudicated}
    scans = Scan.objects.filter(pk__in=list(final), quarantined=False).select_related(
        "dataset", "label_set").order_by("pk")
    answers: dict[int, list[dict]] = {}
    annotations = (Annotation.objects.filter(scan_id__in=list(final))
                   .select_related("reader", "label_class", "shown_model_version",
                                   "shown_suggestion").order_by("created_at", "pk"))
    finding_states: dict[int, dict] = {}
    for annotation_id, name, state in FindingAnswer.objects.filter(
            annotation__scan_id__in=list(final)).values_list(
            "annotation_id", "finding__name", "state"):
        finding_states.setdefault(annotation_id, {})[name] = state
    # who gave each answer: a reader counts once per outcome on a scan, with their latest
    # answer (``selectors.latest_of_each_reader``: two tabs, a changed mind); an answer with
    # no reader (an import) counts alone
    givers: dict[int, list[tuple]] = {}
    for a in annotations:
        givers.setdefault(a.scan_id, []).append(
            (a.reader_id, a.outcome) if a.reader_id else ("answer", a.pk))
        answers.setdefault(a.scan_id, []).append({
            "reader": a.reader.username if a.reader_id else a.source,
            "source": a.source, "outcome": a.outcome,
            "label": a.label_class.name if a.label_class_id else None,
            "findings": finding_states.get(a.pk),
            "at": a.created_at.isoformat(timespec="seconds"),
            "duration_ms": a.duration_ms,
            "shown_model_version": a.shown_model_version.version if a.shown_model_version_id
            else None,
            "shown_suggestion": a.shown_suggestion.name if a.shown_suggestion_id else None,
            "shown_confidence": a.shown_confidence})
    rows = []
    for scan in scans:
        result = final[scan.pk]
        latest = {giver: x for giver, x in zip(givers.get(scan.pk, []),
                                                answers.get(scan.pk, []))
                  if x["outcome"] in ("label", "findings")
                  and x["source"] != Annotation.Source.ADJUDICATION}
        given = list(latest.values())            # in time order: a later answer replaces
        if result["kind"] == "class":
            agreeing = sum(x["label"] == result["label"] for x in given)
        else:
            agreeing = sum(x["findings"] is not None and all(
                x["findings"].get(name, "absent") == state
                for name, state in result["findings"].items()) for x in given)
        rows.append({
            "scan": scan.pk, "split": scan.split, "dataset": scan.dataset.name,
            "label_set": scan.label_set.name if scan.label_set_id else None,
            "kind": result["kind"], "label": result["label"], "findings": result["findings"],
            "adjudicated": scan.pk in adjudicated, "readers": len(given),
            "agreement": round(agreeing / len(given), 4) if given else None,
            "answers": answers.get(scan.pk, []), "patient_key": scan.patient_key,
            "study_key": scan.study_key, "modality": scan.modality, "width": scan.width,
            "height": scan.height, "sha256": scan.sha256, "_preview": scan.preview.name})
    return rows


def as_csv(rows: list[dict]) -> str:
    """CSV: nested fields (findings, answers) as JSON in their cell; text that a spreadsheet
    would run as a formula (a class or data set named ``=HYPERLINK(...)``) is neutralised
    with a leading ``'`` (``annotator.spreadsheet``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        cells = {**row, "findings": json.dumps(row["findings"]) if row["findings"] else "",
                 "answers": json.dumps(row["answers"])}
        writer.writerow({field: csv_cell(cells.get(field)) for field in CSV_FIELDS})
    return out.getvalue()


def as_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n"
                   for row in rows)


def label_download(project: Project, *, fmt: str, split: str = "all",
                   adjudicated_only: bool = False) -> tuple[str, str, str]:
    """The labels as one file to download (the reports page and the API): ``(body, content
    type, file name)`` for ``fmt`` csv or jsonl. Raises ExportError with what to ask."""
    if fmt not in ("csv", "jsonl"):
        raise ExportError("format must be csv or jsonl (the image folder is made by "
                          "`manage.py export_labels --format imagefolder`)")
    rows = label_rows(project, split=split, adjudicated_only=adjudicated_only)
    if fmt == "csv":
        return as_csv(rows), "text/csv", f"labels-project-{project.pk}.csv"
    return as_jsonl(rows), "application/x-ndjson", f"labels-project-{project.pk}.jsonl"


def write_imagefolder(rows: list[dict], out: Path) -> dict[str, int]:
    """``out/<split>/<class folder>/<scan id>.png`` from each scan's de-identified preview
    (single label scans only: a findings scan has no one class folder); ``classes.csv``
    with each folder's class (``folder_names``); ``labels.csv`` with the full rows. Returns
    the count per class."""
    from annotator.storage import media_path

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: export into a new folder")
    labelled = [row for row in rows if row["kind"] == "class" and row["label"]]
    # every image is there before the first is copied (a missing one is the storage's
    # fault, not the output's: say which scans)
    missing = [row for row in labelled if not media_path(row["_preview"]).is_file()]
    if missing:
        raise ExportError(missing_previews_words(missing))
    folders = folder_names(row["label"] for row in labelled)
    counts: dict[str, int] = {}
    for row in labelled:
        folder = out / row["split"] / folders[row["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        source = media_path(row["_preview"])
        try:
            shutil.copyfile(source, folder / f"{row['scan']}.png")
        except FileNotFoundError:
            if source.exists():                         # the output's side, then
                raise
            raise ExportError(missing_previews_words([row])) from None   # gone meanwhile
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    out.mkdir(parents=True, exist_ok=True)
    mapping = io.StringIO()
    writer = csv.writer(mapping)
    writer.writerow(["folder", "class"])
    for name, folder in sorted(folders.items(), key=lambda item: item[1]):
        writer.writerow([folder, csv_cell(name)])
    (out / "classes.csv").write_text(mapping.getvalue())
    (out / "labels.csv").write_text(as_csv(rows))
    return counts


def missing_previews_words(rows: list[dict]) -> str:
    """Which scans' stored images (their de-identified previews) are missing, and what to
    do about it."""
    shown = ", ".join(str(row["scan"]) for row in rows[:10])
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    return (f"the stored image of {'scan' if len(rows) == 1 else 'scans'} {shown}{more} is "
            f"missing from MEDIA_ROOT (e.g. {rows[0]['_preview']}): restore those files from "
            "your backup of MEDIA_ROOT (a `manage.py project_export` archive holds them under "
            "media/), then export again")


def folder_names(names) -> dict[str, str]:
    """Each class name's folder: the name with separators and odd characters as ``_``; two
    classes whose folders would be one (``a/b`` and ``a:b``, or names differing only in case
    on a case-blind file system) each get a short digest of their own name instead, so a
    training script's ImageFolder never merges two classes."""
    names = sorted(set(names))
    plain = {name: _safe(name) for name in names}
    taken: dict[str, int] = {}
    for folder in plain.values():
        taken[folder.casefold()] = taken.get(folder.casefold(), 0) + 1
    return {name: folder if taken[folder.casefold()] == 1
            else f"{folder}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"
            for name, folder in plain.items()}


def _safe(name: str) -> str:
    """A class name as a folder name (no separators, no dot-only names)."""
    cleaned = "".join(c if c.isalnum() or c in "-_ ." else "_" for c in name).strip(" .")
    return cleaned or "class"
