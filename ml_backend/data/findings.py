"""Multi-label ("findings") sources. Pure: no Django.

A findings source gives every scan an answer per finding: 1 present, 0 absent, -1 uncertain
(``ml_backend.metrics.findings.UNCERTAIN``) or NaN unknown. Layouts understood:

- **ChestX-ray14 CSV**: an ``Image Index`` column and ``Finding Labels`` holding
  ``A|B|C`` or ``No Finding``. Findings: the 14 ChestX-ray14 names (ChestMNIST order), then
  any other name the file uses. Every answer is known (the report was read).
- **CheXpert CSV**: a ``Path`` column and one column per finding holding ``1``, ``0``, ``-1``
  or blank (``1.0`` / ``0.0`` / ``-1.0`` too). Blank means "not mentioned": unknown, except
  on a row whose ``No Finding`` is 1, where every blank finding is absent. ``No Finding``
  itself is not a finding (it is the empty set).
- **0/1 CSV**: ``filename,finding1,finding2,...`` with 0/1 (and optionally -1 / blank), read
  as the CheXpert layout.
- **ChestMNIST-style npz**: ``file.npz#split`` whose ``<split>_labels`` is ``(N, F)`` with
  ``F > 1``; ChestMNIST's 14 names when ``F == 14``, else ``finding_0``...

A CSV spec may name a split, ``labels.csv#train``: only rows whose ``split`` column equals
it. Image paths are relative to the CSV's folder (or its ``images/`` subfolder). Columns
that are not findings (age, sex, view, split...) are recognised by their values: a finding
column holds only 1 / 0 / -1 / blank.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ml_backend.data.datasets import (
    SourceError,
    SourceItem,
    _png_encoder,
    _reader,
    csv_dialect,
)
from ml_backend.data.deid import identifier_reason

__all__ = ["CHESTX_RAY14_FINDINGS", "FindingsListing", "is_findings_source",
           "read_findings_source"]

# ChestX-ray14's findings in ChestMNIST's column order (MedMNIST v2 INFO table).
CHESTX_RAY14_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]
NO_FINDING = "No Finding"
_IMAGE_COLUMNS = ("Image Index", "Path", "path", "filename", "file", "image")
_ANSWERS = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
_SPLIT_COLUMN = "split"
# a column naming each row's patient (ChestX-ray14's 'Patient ID', others' spellings)
_PATIENT_COLUMNS = ("Patient ID", "PatientID", "patient_id", "patient")
# ChestX-ray14 names its films <8-digit patient>_<3-digit follow-up>.png; CheXpert's paths
# hold a patientNNNNN folder
_CXR14_NAME = re.compile(r"(?:^|/)(\d{8})_\d{3}\.png$", re.IGNORECASE)
_CHEXPERT_PATIENT = re.compile(r"(?:^|/)(patient\d+)/", re.IGNORECASE)


@dataclass
class FindingsListing:
    items: list[SourceItem]
    findings: list[str]
    targets: np.ndarray                     # (N, F) float: 1, 0, -1 uncertain, NaN unknown
    layout: str                             # chestxray14 | chexpert | npz
    notes: list[str] = field(default_factory=list)
    default_dataset_name: str = ""
    hidden: int = 0     # finding names not used: they look like patient identifiers
    # scans listed more than once with different findings (or patients): those are unknown
    conflicting_rows: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per finding: present / absent / uncertain / unknown counts."""
        t = self.targets
        return {name: {"present": int((t[:, f] == 1).sum()), "absent": int((t[:, f] == 0).sum()),
                       "uncertain": int((t[:, f] == -1).sum()),
                       "unknown": int(np.isnan(t[:, f]).sum())}
                for f, name in enumerate(self.findings)}


def _clean(name: str) -> str:
    """A finding name as the label set stores it (spaces collapsed; compared case-blind)."""
    return " ".join(name.split())


def _split_spec(spec: str) -> tuple[Path, str | None]:
    text = os.fspath(spec)
    path, _, split = text.partition("#")
    return Path(path), (split or None)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise SourceError(f"{path}: no such CSV")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SourceError(f"{path.name}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=csv_dialect(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not header or not rows:
        raise SourceError(f"{path.name}: the CSV has no header or no rows")
    return header, rows


def _answer_columns(header: list[str], rows: list[dict[str, str]], image: str) -> list[str]:
    return [h for h in header
            if h not in (image, _SPLIT_COLUMN) + _PATIENT_COLUMNS
            and all(r.get(h, "") in _ANSWERS for r in rows)]


def _patient_of(row: dict[str, str], name: str, column: str | None) -> str | None:
    """The patient a row's scan belongs to, as the source names them: its patient column,
    else a ChestX-ray14 film name's patient number or a CheXpert path's patient folder."""
    if column is not None:
        return (row.get(column) or "").strip() or None
    match = _CXR14_NAME.search(name) or _CHEXPERT_PATIENT.search(name)
    return match.group(1) if match else None


def is_findings_source(spec: str | os.PathLike) -> bool:
    """True when ``spec`` is a findings source: a CSV with ``Finding Labels`` or with at least
    two finding columns, or an npz split with ``(N, F > 1)`` labels."""
    path, split = _split_spec(os.fspath(spec))
    if path.suffix.lower() == ".npz" and path.is_file() and split:
        with np.load(path, allow_pickle=False) as archive:
            key = f"{split.partition('?')[0]}_labels"
            return key in archive.files and archive[key].ndim == 2 and archive[key].shape[1] > 1
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        header, rows = _read_rows(path)
    except SourceError:
        return False
    if "Finding Labels" in header:
        return True
    image = next((c for c in _IMAGE_COLUMNS if c in header), header[0])
    return len([c for c in _answer_columns(header, rows, image) if c != NO_FINDING]) >= 2


def read_findings_source(spec: str | os.PathLike) -> FindingsListing:
    path, split = _split_spec(os.fspath(spec))
    if path.suffix.lower() == ".npz":
        if not split:
            raise SourceError(f"{path.name}: name the split to import, e.g. {path.name}#train")
        return _read_npz(path, split.partition("?")[0])
    header, rows = _read_rows(path)
    notes = []
    if split is not None:
        if _SPLIT_COLUMN not in header:
            raise SourceError(f"{path.name}#{split}: the CSV has no 'split' column")
        rows = [r for r in rows if r.get(_SPLIT_COLUMN) == split]
        if not rows:
            raise SourceError(f"{path.name}: no row has split {split!r}")
    image = next((c for c in _IMAGE_COLUMNS if c in header), None)
    if image is None:
        raise SourceError(f"{path.name}: no image column (expected one of "
                          f"{', '.join(_IMAGE_COLUMNS)})")
    hidden: set[str] = set()       # names that look like identifiers: never quoted, never used
    if "Finding Labels" in header:
        layout = "chestxray14"
        # one spelling per finding: ChestX-ray14's own, else the first met ('effusion' is
        # Effusion; the label set matches names case-blind too)
        spelling = {n.casefold(): n for n in CHESTX_RAY14_FINDINGS + [NO_FINDING]}
        for raw in sorted({_clean(n) for r in rows for n in r["Finding Labels"].split("|")}):
            if raw and raw.casefold() not in spelling:
                if identifier_reason(raw) is not None:
                    hidden.add(raw.casefold())
                else:
                    spelling[raw.casefold()] = raw
        found = sorted(set(spelling.values()) - set(CHESTX_RAY14_FINDINGS) - {NO_FINDING})
        findings = CHESTX_RAY14_FINDINGS + found
        column = {name: f for f, name in enumerate(findings)}
        targets = np.zeros((len(rows), len(findings)))
        for i, r in enumerate(rows):
            given = {_clean(n).casefold() for n in r["Finding Labels"].split("|")} - {""}
            if not given:
                raise SourceError(f"{path.name}: {r[image]}: empty 'Finding Labels' (write "
                                  f"'{NO_FINDING}' for a scan without findings)")
            names = {spelling[n] for n in given - hidden}   # a repeated name counts once
            if not names:             # only identifier-looking names: the scan gets no answer
                targets[i] = np.nan
                continue
            if NO_FINDING in names and len(names) > 1:
                raise SourceError(f"{path.name}: {r[image]}: '{NO_FINDING}' together with "
                                  "findings")
            for n in names - {NO_FINDING}:
                targets[i, column[n]] = 1.0
        if found:
            notes.append(f"findings beyond ChestX-ray14's 14: {', '.join(found)}")
    else:
        layout = "chexpert"
        answer_columns = []
        for c in _answer_columns(header, rows, image):
            if identifier_reason(c) is None:
                answer_columns.append(c)
            else:                       # a column named after a patient (an MRN, Last^First)
                hidden.add(c)
        findings = [c for c in answer_columns if c != NO_FINDING]
        seen: dict[str, str] = {}
        for c in findings:
            if seen.setdefault(_clean(c).casefold(), c) != c:
                raise SourceError(f"{path.name}: the columns {seen[_clean(c).casefold()]!r} "
                                  f"and {c!r} name the same finding")
        if not findings:
            raise SourceError(f"{path.name}: no finding columns (a finding column holds only "
                              "1, 0, -1 or blank)" + (
                                  f"; {len(hidden)} column(s) not used: their names look "
                                  "like patient identifiers" if hidden else ""))
        targets = np.array([[_ANSWERS[r[c]] for c in findings] for r in rows], dtype=np.float64)
        if NO_FINDING in answer_columns:
            empty = np.array([r[NO_FINDING] in ("1", "1.0") for r in rows])
            contradiction = empty & (targets == 1).any(axis=1)
            if contradiction.any():
                bad = rows[int(np.flatnonzero(contradiction)[0])][image]
                raise SourceError(f"{path.name}: {bad}: '{NO_FINDING}' is 1 but a finding is "
                                  "present")
            targets[empty[:, None] & np.isnan(targets)] = 0.0
            notes.append(f"'{NO_FINDING}' rows: blank findings read as absent")
        ignored = [h for h in header if h not in answer_columns and h not in hidden
                   and h not in (image, _SPLIT_COLUMN) + _PATIENT_COLUMNS
                   and identifier_reason(h) is None]
        if ignored:
            notes.append(f"not findings (values other than 1/0/-1/blank): {', '.join(ignored)}")
        if np.isnan(targets).any():
            notes.append(f"{int(np.isnan(targets).sum())} blank answer(s) read as unknown")
    base = path.parent
    images_dir = base / "images"
    patient_column = next((c for c in _PATIENT_COLUMNS if c in header), None)
    items = []
    for r in rows:
        name = r[image].replace("\\", "/")
        if not name:
            raise SourceError(f"{path.name}: a row without an image name")
        target = (base / name).resolve()
        if not target.is_file() and images_dir.is_dir():
            target = (images_dir / name).resolve()
        if base.resolve() not in target.parents:
            raise SourceError(f"{path.name}: {name!r} points outside the CSV's folder")
        items.append(SourceItem(name=name, label=None, load=_reader(target, name),
                                patient=_patient_of(r, name, patient_column)))
    items, targets, conflicts, repeated = _one_row_per_scan(items, targets)
    if repeated:
        notes.append(f"{repeated} repeated row(s) for a scan already listed, with the same "
                     "findings, read once")
    with_patient = sum(item.patient is not None for item in items)
    if with_patient:
        patients = len({item.patient for item in items if item.patient is not None})
        where = f"the {patient_column!r} column" if patient_column else "the file names"
        notes.append(f"patients from {where}: {patients} patient(s) for {with_patient} of "
                     f"{len(items)} scan(s) (a keyed hash is stored, never the identifier)")
    return FindingsListing(items=items, findings=findings, targets=targets, layout=layout,
                           notes=notes, default_dataset_name=path.stem + (f"-{split}" if split
                                                                          else ""),
                           hidden=len(hidden), conflicting_rows=conflicts)


def _one_row_per_scan(items: list[SourceItem], targets: np.ndarray
                      ) -> tuple[list[SourceItem], np.ndarray, list[str], int]:
    """One item per image name: rows repeating a scan with the same findings (and patient)
    count once; rows that disagree leave the scan's findings unknown (NaN), the scan still
    imported, and name it in the returned conflicts. Returns ``(items, targets, conflicts,
    repeated)``."""
    first: dict[str, int] = {}
    keep: list[int] = []
    conflicts: dict[str, None] = {}
    repeated = 0
    targets = targets.copy()
    for i, item in enumerate(items):
        j = first.get(item.name)
        if j is None:
            first[item.name] = i
            keep.append(i)
            continue
        same = np.array_equal(targets[i], targets[j], equal_nan=True)
        if same and (item.patient is None or items[j].patient in (None, item.patient)):
            repeated += 1
            if items[j].patient is None and item.patient is not None:
                items[j] = replace(items[j], patient=item.patient)
            continue
        conflicts[item.name] = None
        if not same:
            targets[j] = np.nan
        if item.patient is not None and items[j].patient not in (None, item.patient):
            items[j] = replace(items[j], patient=None)
    return [items[i] for i in keep], targets[keep], list(conflicts), repeated


def _read_npz(path: Path, split: str) -> FindingsListing:
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as archive:
        if f"{split}_images" not in archive.files or f"{split}_labels" not in archive.files:
            raise SourceError(f"{path.name}: no {split}_images / {split}_labels arrays")
        images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
    if labels.ndim != 2 or labels.shape[1] < 2 or len(labels) != len(images):
        raise SourceError(f"{path.name}: {split}_labels {labels.shape} is not (N, findings) "
                          f"for {len(images)} images")
    if not np.isin(labels, (0, 1, -1)).all():
        raise SourceError(f"{path.name}: {split}_labels must hold 0, 1 or -1")
    findings = (CHESTX_RAY14_FINDINGS if labels.shape[1] == 14
                else [f"finding_{i}" for i in range(labels.shape[1])])
    width = len(str(len(images)))
    items = [SourceItem(name=f"{path.name}#{split}/{i:0{width}d}", label=None,
                        load=_png_encoder(images[i])) for i in range(len(images))]
    return FindingsListing(items=items, findings=list(findings),
                           targets=labels.astype(np.float64), layout="npz",
                           default_dataset_name=f"{path.stem}-{split}")
